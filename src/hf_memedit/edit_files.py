"""What an edit folder holds, by name: its safetensors files, the metadata keys of the edit file, and the chain of
shared edits a model's config records. `model` writes them and `hub.verify` checks them, so they live below both."""

from __future__ import annotations

from transformers import PreTrainedModel


WEIGHTS_NAME = "memedit_edit.safetensors"
BASE_WEIGHTS_NAME = (
    "memedit_base.safetensors"  # the base values of the changed tensors: revert without the base checkpoint
)
# Metadata keys of the edit file: the sha256 of each changed tensor at the base and edited, and the base config.
BASE_HASHES_KEY = "memedit_base_sha256"
EDIT_HASHES_KEY = "memedit_edit_sha256"
BASE_CONFIG_KEY = "memedit_base_config"  # the base model's `architecture_config`
CHAIN_ATTRIBUTE = "memedit_chain"  # config attribute: the ids of the shared edits applied, oldest first


def chain_of(model: PreTrainedModel) -> list[str]:
    """The ids of the shared edits applied to `model`, oldest first."""
    return list(getattr(model.config, CHAIN_ATTRIBUTE, None) or [])
