"""Apply a shared edit to a model, or revert it, after checking everything; edits stack in order."""

from __future__ import annotations

from typing import Any

import torch
from safetensors import safe_open
from transformers import PreTrainedModel

from ..io import edit_folder, load_tensors, tensor_sha256
from ..model import BASE_WEIGHTS_NAME, WEIGHTS_NAME, check_fits
from .manifest import ManifestError, read_manifest, safe_path


CHAIN_ATTRIBUTE = "memedit_chain"


def chain_of(model: PreTrainedModel) -> list[str]:
    return list(getattr(model.config, CHAIN_ATTRIBUTE, None) or [])


def _tensors_of(folder: str, manifest: dict[str, Any], names) -> dict[str, torch.Tensor]:
    """The edited values of `names`, from the file the format keeps them in, each checked against the manifest."""
    if manifest["format"] == "delta":
        sources = [WEIGHTS_NAME]
    elif manifest["format"] == "full":
        sources = [name for name in manifest["files"] if name.endswith(".safetensors") and name != BASE_WEIGHTS_NAME]
    else:
        raise ValueError(
            "This edit is a PEFT adapter: apply it with PeftModel.from_pretrained(base, repo).merge_and_unload(), "
            "or share it as 'delta' or 'full' for apply_edit."
        )
    tensors: dict[str, torch.Tensor] = {}
    for source in sources:
        with safe_open(safe_path(folder, source), framework="pt") as handle:
            for name in set(names) & set(handle.keys()):
                tensors[name] = handle.get_tensor(name)
    return tensors


def _check(tensors: dict[str, torch.Tensor], expected: dict[str, str], what: str, where: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ManifestError(f"{where} lacks {what} tensor(s) {', '.join(missing[:3])} that the manifest lists.")
    for name, digest in expected.items():
        if tensor_sha256(tensors[name]) != digest:
            raise ManifestError(f"{what} tensor {name!r} in {where} does not match the manifest's sha256: refused.")


@torch.no_grad()
def apply_edit(
    model: PreTrainedModel, repo_or_dir: str, revision: str | None = None, token: str | None = None, endpoint: str | None = None
) -> PreTrainedModel:
    """Apply a shared edit (folder or Hub repo) to `model` in place, after checking everything; returns `model`."""
    folder = edit_folder(repo_or_dir, revision, token, endpoint)
    manifest = read_manifest(folder)
    expected_after = {name: entry["sha256"] for name, entry in manifest["tensors"].items()}
    tensors = _tensors_of(folder, manifest, expected_after)
    _check(tensors, expected_after, "edited", folder)
    params = dict(model.named_parameters())
    check_fits(params, tensors, folder, f"the parameters of {type(model).__name__}")
    chain = chain_of(model)
    if manifest["id"] in chain:
        raise ValueError(f"{folder} is already applied to this model (its edits: {chain}): nothing was changed.")
    if chain != manifest["chain"]:
        raise ValueError(
            f"{folder} was made on top of the edits {manifest['chain'] or 'none'}, but this model carries "
            f"{chain or 'none'}: apply (or revert) edits in the order they were made."
        )
    for name, digest in manifest["base_model"]["tensors"].items():
        if tensor_sha256(params[name]) != digest:
            raise ValueError(
                f"{folder} was made for a different base model: {name!r} of this model differs from the base "
                f"the manifest records ({manifest['base_model']['repo_id']!r}). Nothing was changed."
            )
    for name, value in tensors.items():
        params[name].copy_(value)
    setattr(model.config, CHAIN_ATTRIBUTE, chain + [manifest["id"]])
    return model


@torch.no_grad()
def revert_edit(
    model: PreTrainedModel, repo_or_dir: str, revision: str | None = None, token: str | None = None, endpoint: str | None = None
) -> PreTrainedModel:
    """Undo the top applied edit: restores the exact base values it replaced; returns `model`."""
    folder = edit_folder(repo_or_dir, revision, token, endpoint)
    manifest = read_manifest(folder)
    chain = chain_of(model)
    if manifest["id"] not in chain:
        raise ValueError(f"{folder} was never applied to this model (its edits: {chain or 'none'}): nothing to revert.")
    if chain[-1] != manifest["id"]:
        raise ValueError(
            f"{folder} is not the last edit applied to this model (applied: {chain or 'none'}); revert the later edits first."
        )
    params = dict(model.named_parameters())
    for name, entry in manifest["tensors"].items():
        if tensor_sha256(params[name]) != entry["sha256"]:
            raise ValueError(f"{name!r} no longer holds the edited value: the model changed after the edit; cannot revert exactly.")
    base = load_tensors(safe_path(folder, BASE_WEIGHTS_NAME))
    _check(base, manifest["base_model"]["tensors"], "base", folder)
    for name, value in base.items():
        params[name].copy_(value)
    setattr(model.config, CHAIN_ATTRIBUTE, chain[:-1])
    return model


