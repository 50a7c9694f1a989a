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
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel

from .blocks import CONFIG_NAME, BlockSelectorConfig, selected_parameter_names
from .io import edit_folder, load_tensors, save_tensors, tensor_sha256
from .sharding import like, whole


WEIGHTS_NAME = "memedit_edit.safetensors"
BASE_WEIGHTS_NAME = "memedit_base.safetensors"  # the base values of the changed tensors: revert without the base checkpoint
_BASE_HASHES_KEY = "memedit_base_sha256"
_EDIT_HASHES_KEY = "memedit_edit_sha256"


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
            where = sorted({device for module, device in placed.items() if any(n.startswith(f"{module}.") for n in offloaded)})
            raise ValueError(
                f"{len(offloaded)} of the tensors to edit ({offloaded[0]}, ...) are offloaded by the device_map "
                f"(to {', '.join(map(str, where)) or 'meta'}): accelerate keeps only a copy of them outside the model, "
                "which training cannot update. Give the edited blocks a device in device_map (offload other blocks), "
                "or give the model more memory (max_memory)."
            )
        self._requires_grad = {name: param.requires_grad for name, param in params.items()}
        for name, param in params.items():
            param.requires_grad_(False)
        for name in names:
            params[name].requires_grad_(True)
        self.theta0: dict[str, torch.Tensor] = {name: params[name].detach().clone() for name in names}
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
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    def changed_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable tensors whose values differ from θ0 (whole: under FSDP2 a collective, for every rank)."""
        values = {name: whole(param.detach()) for name, param in self.trainable_parameters().items()}
        return {
            name: value for name, value in values.items()
            if not torch.equal(value.to(self.theta0[name].device), self.theta0[name])
        }

    @torch.no_grad()
    def revert(self) -> None:
        """Restore θ0 exactly; the model stays wrapped and can be edited again."""
        for name, param in self.trainable_parameters().items():
            param.copy_(like(param, self.theta0[name]))

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
        edited value, so `from_pretrained` refuses a base model the edit was not made for, and an
        edit file whose bytes changed since it was written.
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
            metadata={_BASE_HASHES_KEY: json.dumps(base_hashes, sort_keys=True),
                      _EDIT_HASHES_KEY: json.dumps(edit_hashes, sort_keys=True)},
        )
        save_tensors({name: self.theta0[name] for name in changed}, os.path.join(save_directory, BASE_WEIGHTS_NAME))
        self.selector_config.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(
        cls, model: PreTrainedModel, edit_directory: str | os.PathLike, revision: str | None = None,
        token: str | None = None, endpoint: str | None = None,
    ) -> EditModel:
        """Apply a saved edit to `model`; checks every tensor before changing any.

        `edit_directory` is a local folder if it exists, otherwise a Hub repo id (a `delta` package
        pushed by `memedit push`), downloaded as PEFT downloads an adapter.
        """
        edit_directory = edit_folder(edit_directory, revision, token, endpoint, allow_patterns=[WEIGHTS_NAME, CONFIG_NAME])
        config = BlockSelectorConfig.from_pretrained(edit_directory)
        path = os.path.join(edit_directory, WEIGHTS_NAME)
        tensors = load_tensors(path)
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        base_hashes = json.loads(metadata.get(_BASE_HASHES_KEY, "{}"))
        _check_edited_values(tensors, json.loads(metadata.get(_EDIT_HASHES_KEY, "null")), path)
        edit = cls(model, config)
        try:
            edit._check_applicable(tensors, base_hashes, path)
        except ValueError:
            edit._restore_requires_grad()
            raise
        params = edit.trainable_parameters()
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
        return edit

    def _check_applicable(self, tensors: dict[str, torch.Tensor], base_hashes: dict[str, str], path: str) -> None:
        params = self.trainable_parameters()
        check_fits(params, tensors, path, f"the blocks {self.selector_config.blocks} of {type(self.model).__name__}")
        for name in tensors:
            if base_hashes.get(name) != tensor_sha256(self.theta0[name]) and all(
                torch.equal(params[other].detach().cpu(), edited) for other, edited in tensors.items()
            ):
                raise ValueError(f"{path} is already applied to the given model: its weights hold the edited values.")
            if base_hashes.get(name) != tensor_sha256(self.theta0[name]):
                raise ValueError(
                    f"{path} was made for a different base model: {name!r} of the given model differs "
                    f"from the base the edit recorded ({self.selector_config.base_model_name_or_path!r}). Load that "
                    "base model, or revert an edit already applied to this one."
                )


def check_fits(params: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], where: str, what: str) -> None:
    """Every edited tensor names one of `params` (`what` they are), with its shape and dtype."""
    for name, value in tensors.items():
        if name not in params:
            raise ValueError(f"{where} changes {name!r}, which {what} do not have: the edit was made for another architecture.")
        if tuple(value.shape) != tuple(params[name].shape) or value.dtype != params[name].dtype:
            raise ValueError(
                f"{where}: {name!r} is {value.dtype} {tuple(value.shape)} but the model's is "
                f"{params[name].dtype} {tuple(params[name].shape)}: the edit was made for another model."
            )


def _check_edited_values(tensors: dict[str, torch.Tensor], hashes: dict[str, str] | None, path: str) -> None:
    """Every edited tensor as it was saved: its sha256 against the one recorded when saving."""
    if hashes is None:
        raise ValueError(
            f"{path} records no hashes of its edited tensors, so a damaged file could not be told apart: "
            "save the edit again with this version of hf_memedit."
        )
    if set(hashes) != set(tensors):
        raise ValueError(f"{path} holds other tensors than its recorded hashes list: the file was altered. Refused.")
    for name, value in tensors.items():
        if tensor_sha256(value) != hashes[name]:
            raise ValueError(f"{path}: the edited tensor {name!r} differs from the one saved (damaged or altered file). Refused.")


def get_edit_model(model: PreTrainedModel, config: BlockSelectorConfig | None = None) -> EditModel:
    """Freeze everything in `model` but the blocks `config` selects (default: block 0)."""
    if isinstance(model, EditModel):
        raise ValueError("The model is already an EditModel: call merge_and_unload() or unload() first.")
    return EditModel(model, config or BlockSelectorConfig())
