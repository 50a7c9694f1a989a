"""`EditModel`: a transformers model with only the selected blocks trainable, and the edit as a diff.

Mirrors PEFT: `get_edit_model(model, config)` wraps, `save_pretrained` writes only what changed,
`EditModel.from_pretrained(base, dir)` re-applies it, `merge_and_unload()` hands back a plain
transformers model that keeps the edit, and `unload()` one that does not (θ0 bit for bit).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel

from .architectures import architecture_config
from .blocks import BlockSelectorConfig, selected_parameter_names
from .edit_files import (
    BASE_CONFIG_KEY,
    BASE_HASHES_KEY,
    BASE_WEIGHTS_NAME,
    CHAIN_ATTRIBUTE,
    EDIT_HASHES_KEY,
    WEIGHTS_NAME,
    chain_of,
)
from .files import edit_folder, save_tensors, tensor_sha256
from .sharding import like, whole


@torch.no_grad()
def write_values(params: Mapping[str, nn.Parameter], values: Mapping[str, torch.Tensor]) -> None:
    """Copy `values` into `params`, all or nothing: if a copy fails, the parameters written so far get their
    values back."""
    before = {name: params[name].detach().clone() for name in values}
    written = []
    try:
        for name, value in values.items():
            params[name].copy_(value)
            written.append(name)
    except BaseException:
        for name in written:
            params[name].copy_(before[name])
        raise


@contextmanager
def values_at(params: Mapping[str, nn.Parameter], values: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """`params` hold `values` inside (each already like its parameter), their own values again after, also on an
    error: e.g. θ0's outputs beside the edit's on the same batches."""
    current = {name: param.detach().clone() for name, param in params.items()}
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(values[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(current[name])


class EditModel(nn.Module):
    """Wraps a transformers model; holds θ0 of the trainable parameters so an edit can be undone."""

    def __init__(self, model: PreTrainedModel, config: BlockSelectorConfig):
        super().__init__()
        self.model = model
        self.selector_config = config
        names = selected_parameter_names(model, config)
        params = dict(model.named_parameters())
        offloaded = [name for name in names if params[name].device.type == "meta"]
        if offloaded:
            placed = getattr(model, "hf_device_map", None) or {}
            where = sorted(
                {device for module, device in placed.items() if any(n.startswith(f"{module}.") for n in offloaded)}
            )
            raise ValueError(
                f"{len(offloaded)} of the tensors to edit ({offloaded[0]}, ...) are offloaded by the "
                f"device_map (to {', '.join(map(str, where)) or 'meta'}): accelerate keeps only a copy of "
                "them outside the model, which training cannot update. Give the edited blocks a device "
                "in device_map (offload other blocks), or give the model more memory (max_memory)."
            )
        self._requires_grad = {name: param.requires_grad for name, param in params.items()}
        for name, param in params.items():
            param.requires_grad_(False)
        for name in names:
            params[name].requires_grad_(True)
        self.theta0: dict[str, torch.Tensor] = {name: params[name].detach().clone() for name in names}
        self.applied_id: str | None = None  # the package `from_pretrained` applied, on the model's chain
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(model.config, "_name_or_path", None) or None

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters the edit may change, by name, in the order of θ0."""
        params = dict(self.model.named_parameters())
        return {name: params[name] for name in self.theta0}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.trainable_parameters().values())
        total = sum(p.numel() for p in self.model.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def changed_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable tensors whose values differ from θ0 (whole: under FSDP2 a collective, for every rank)."""
        values = {name: whole(param.detach()) for name, param in self.trainable_parameters().items()}
        return {
            name: value
            for name, value in values.items()
            if not torch.equal(value.to(self.theta0[name].device), self.theta0[name])
        }

    @torch.no_grad()
    def revert(self) -> None:
        """Restore θ0 exactly (and take a package applied by `from_pretrained` off the model's chain); the model
        stays wrapped and can be edited again."""
        for name, param in self.trainable_parameters().items():
            param.copy_(like(param, self.theta0[name]))
        chain = chain_of(self.model)
        if self.applied_id is not None and chain[-1:] == [self.applied_id]:
            setattr(self.model.config, CHAIN_ATTRIBUTE, chain[:-1])
        self.applied_id = None

    def at_theta0(self) -> AbstractContextManager[None]:
        """The edited tensors at θ0 inside, the edit restored after (`values_at`)."""
        params = self.trainable_parameters()
        return values_at(params, {name: like(param, self.theta0[name]) for name, param in params.items()})

    def _restore_requires_grad(self) -> PreTrainedModel:
        for name, param in self.model.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, True))
        return self.model

    def merge_and_unload(self) -> PreTrainedModel:
        """The plain transformers model with the edit in its weights."""
        return self._restore_requires_grad()

    def unload(self) -> PreTrainedModel:
        """The plain transformers model with the edit undone (bit-identical θ0)."""
        self.revert()
        return self._restore_requires_grad()

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True) -> None:
        """Write the changed tensors (edited values, and their base values for revert) and the selection config.

        Under FSDP2 every rank calls it (the shards are gathered) and only `is_main_process` writes, as in PEFT.

        The edit file's metadata records the sha256 of each changed tensor's base value and of its
        edited value, and the base model's architecture config, so `from_pretrained` refuses a base
        model the edit was not made for, and an edit file whose bytes changed since it was written.
        """
        changed = self.changed_tensors()
        if not is_main_process:
            return
        base_hashes = {name: tensor_sha256(self.theta0[name]) for name in changed}
        edit_hashes = {name: tensor_sha256(value) for name, value in changed.items()}
        os.makedirs(save_directory, exist_ok=True)
        save_tensors(
            changed,
            os.path.join(save_directory, WEIGHTS_NAME),
            metadata={
                BASE_HASHES_KEY: json.dumps(base_hashes, sort_keys=True),
                EDIT_HASHES_KEY: json.dumps(edit_hashes, sort_keys=True),
                BASE_CONFIG_KEY: json.dumps(architecture_config(self.model.config), sort_keys=True),
            },
        )
        save_tensors({name: self.theta0[name] for name in changed}, os.path.join(save_directory, BASE_WEIGHTS_NAME))
        self.selector_config.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(
        cls,
        model: PreTrainedModel,
        edit_directory: str | os.PathLike,
        revision: str | None = None,
        token: str | None = None,
        endpoint: str | None = None,
    ) -> EditModel:
        """Apply a saved edit to `model`, after `hub.verify` checked all of it; nothing changes on a refusal.

        `edit_directory` is a run's `edit/` folder (`save_pretrained`), a `delta` package, or, when no
        such folder exists, the Hub id of a package pushed by `memedit push`, downloaded as PEFT
        downloads an adapter. A package's manifest decides what may change, and its id joins
        `model.config.memedit_chain` (`revert` and `unload` take it out again).
        """
        from .hub.manifest import MANIFEST_NAME
        from .hub.verify import verify_package, verify_run_edit

        where = os.fspath(edit_directory)
        folder = edit_folder(edit_directory, revision, token, endpoint)
        if os.path.lexists(os.path.join(folder, MANIFEST_NAME)):
            declared, after, _ = verify_package(model, folder, where, applying=True, formats=("delta",))
        else:
            declared, after, _ = verify_run_edit(model, folder, where)
        edit = cls(model, declared.scope)
        try:
            write_values(edit.trainable_parameters(), after)
        except BaseException:
            edit._restore_requires_grad()
            raise
        if declared.id is not None:
            setattr(model.config, CHAIN_ATTRIBUTE, chain_of(model) + [declared.id])
            edit.applied_id = declared.id
        return edit


def get_edit_model(model: PreTrainedModel, config: BlockSelectorConfig | None = None) -> EditModel:
    """Freeze everything in `model` but the blocks `config` selects (default: block 0)."""
    if isinstance(model, EditModel):
        raise ValueError("The model is already an EditModel: call merge_and_unload() or unload() first.")
    return EditModel(model, config or BlockSelectorConfig())
