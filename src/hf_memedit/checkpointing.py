"""An edit's checkpoints: what the trainer adds to Trainer's own, and how a resumed run finds and reads them.

Every checkpoint holds the trained values (by the names the trainer uses: transformers may save a model under its
original checkpoint's names, e.g. BERT's LayerNorm gamma/beta, which Trainer's resume then silently skips) and θ0,
written last: a checkpoint without θ0 was cut short while saving. A resumed run projects around the original centre,
whatever model it was given.
"""

from __future__ import annotations

import logging
import os
import re

import torch
from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .files import load_tensors, save_tensors
from .model import EditModel


logger = logging.getLogger(__name__)

THETA0_NAME = "memedit_theta0.safetensors"
PARAMS_NAME = "memedit_params.safetensors"


class SaveTheta0Callback(TrainerCallback):
    """Writes the trainable parameters and θ0 into every checkpoint, θ0 last."""

    def __init__(self, edit_model: EditModel):
        self.edit_model = edit_model

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            save_tensors(self.edit_model.trainable_parameters(), os.path.join(folder, PARAMS_NAME))
            save_tensors(self.edit_model.theta0, os.path.join(folder, THETA0_NAME))


def is_complete_checkpoint(folder: str) -> bool:
    """Whether a checkpoint folder was written to the end (trainer state, trained values, θ0)."""
    return all(os.path.isfile(os.path.join(folder, name)) for name in (TRAINER_STATE_NAME, PARAMS_NAME, THETA0_NAME))


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint in `output_dir` that was saved completely; cut-short ones are skipped, with a warning."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(match.group(1)), name)
        for name in os.listdir(output_dir)
        if (match := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name))
        and os.path.isdir(os.path.join(output_dir, name))
    )
    for _, name in reversed(steps):
        folder = os.path.join(output_dir, name)
        if is_complete_checkpoint(folder):
            return folder
        logger.warning(
            "Skipping %s: it was cut short while saving (no %s or %s).", folder, TRAINER_STATE_NAME, THETA0_NAME
        )
    return None


def checkpoint_folder(resume_from_checkpoint: str | bool, output_dir: str) -> str:
    """The checkpoint to resume from: the newest complete one in `output_dir` for `True`, else the folder given."""
    if resume_from_checkpoint is True:
        folder = last_complete_checkpoint(output_dir)
        if folder is None:
            raise ValueError(f"No complete checkpoint to resume from in {output_dir}.")
        return folder
    folder = os.fspath(resume_from_checkpoint)
    if not os.path.isdir(folder):
        raise ValueError(
            f"resume_from_checkpoint {folder} does not exist: give a checkpoint-N folder, or true for the last one."
        )
    return folder


def read_theta0(folder: str, names: set[str], edit_blocks) -> dict[str, torch.Tensor]:
    """θ0 as the checkpoint recorded it, for exactly the parameters `names` this run trains."""
    path = os.path.join(folder, THETA0_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"{folder} has no {THETA0_NAME}: it was not written by ConstrainedEditTrainer, so the "
            "original centre θ0 of the constraint is unknown. Start the edit afresh."
        )
    saved = load_tensors(path)
    if set(saved) != names:
        raise ValueError(
            f"{path} holds θ0 for other parameters than this run trains: the checkpoint belongs to an "
            f"edit of other blocks. This run trains {edit_blocks}."
        )
    return saved


@torch.no_grad()
def load_trained_values(folder: str, params: dict[str, torch.nn.Parameter], edit_blocks) -> None:
    """Write the checkpoint's trained values into `params` (by the trainer's own names)."""
    path = os.path.join(folder, PARAMS_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"{folder} has no {PARAMS_NAME}: it was cut short while saving. Resume from an earlier checkpoint."
        )
    saved = load_tensors(path)
    if set(saved) != set(params):
        raise ValueError(f"{path} holds other parameters than this run trains ({edit_blocks}).")
    for name, param in params.items():
        param.copy_(saved[name])
