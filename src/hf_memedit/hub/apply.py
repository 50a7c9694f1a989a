"""Apply a shared edit to a model, or revert it, after checking everything (`verify`); edits stack in order.

Both are all or nothing: every check runs before the first write, only the declared tensors are
written, and a write that fails puts the model back as it was; `config.memedit_chain` changes only
after all writes succeeded, so it never disagrees with the weights.
"""

from __future__ import annotations

import os

import torch
from transformers import PreTrainedModel

from ..files import edit_folder
from ..model import CHAIN_ATTRIBUTE, chain_of, write_values
from .verify import verify_package


__all__ = ["CHAIN_ATTRIBUTE", "apply_edit", "chain_of", "revert_edit"]


@torch.no_grad()
def apply_edit(
    model: PreTrainedModel,
    repo_or_dir: str,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> PreTrainedModel:
    """Apply a shared edit (folder or Hub repo) to `model` in place, after checking everything; returns `model`."""
    folder = edit_folder(repo_or_dir, revision, token, endpoint)
    declared, after, _ = verify_package(model, folder, os.fspath(repo_or_dir), applying=True)
    write_values(dict(model.named_parameters()), after)
    setattr(model.config, CHAIN_ATTRIBUTE, chain_of(model) + [declared.id])
    return model


@torch.no_grad()
def revert_edit(
    model: PreTrainedModel,
    repo_or_dir: str,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> PreTrainedModel:
    """Undo the top applied edit: restores the exact base values it replaced; returns `model`."""
    folder = edit_folder(repo_or_dir, revision, token, endpoint)
    _, _, base = verify_package(model, folder, os.fspath(repo_or_dir), applying=False)
    write_values(dict(model.named_parameters()), base)
    setattr(model.config, CHAIN_ATTRIBUTE, chain_of(model)[:-1])
    return model
