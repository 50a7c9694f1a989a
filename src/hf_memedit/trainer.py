"""`ConstrainedEditTrainer`: the paper's projected fine-tuning as a `transformers.Trainer`."""

from __future__ import annotations

import logging
import os

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .architectures import model_kind
from .collators import FactCollator
from .config import EditConfig
from .io import load_tensors, save_tensors
from .model import EditModel, get_edit_model
from .projection import NormBallProjector

logger = logging.getLogger(__name__)

THETA0_NAME = "memedit_theta0.safetensors"


class _SaveTheta0Callback(TrainerCallback):
    """Writes θ0 into every checkpoint, so a resumed run projects around the original centre."""

    def __init__(self, edit_model: EditModel):
        self.edit_model = edit_model

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            save_tensors(self.edit_model.theta0, os.path.join(folder, THETA0_NAME))


class ConstrainedEditTrainer(Trainer):
    """Fine-tunes the selected blocks on the edit's facts, keeping ||θ − θ0|| ≤ δ.

    Where the projection happens: transformers' `Trainer` has no optimizer-step method to
    override, so `create_optimizer` registers a torch `Optimizer.register_step_post_hook` on the
    optimizer it builds. That hook runs once per real `optimizer.step()` — after every Adam step,
    as the paper's projected Adam does — and never on gradient-accumulation micro-steps or on
    steps the fp16 grad scaler skips (no step, no hook; a fused optimizer that the scaler steps on
    overflow reports it through `optimizer.found_inf`, and the hook skips those).

    θ0 is the snapshot `get_edit_model` took of the trainable parameters before any training or
    checkpoint loading; it is written into each checkpoint and read back on
    `train(resume_from_checkpoint=...)`.

    The loss is the model's own loss function normalised by the number of object tokens in the
    whole effective batch, so gradient accumulation matches the equal large batch exactly.

    Args:
        model: a transformers masked or causal LM, or an `EditModel` (then `args.edit_blocks` is unused).
        args: an `EditConfig`.
        processing_class: the tokenizer; with no `data_collator`, facts are collated by `FactCollator`.
    """

    def __init__(
        self,
        model: PreTrainedModel | EditModel,
        args: EditConfig,
        data_collator=None,
        processing_class=None,
        compute_loss_func=None,
        **kwargs,
    ):
        if not isinstance(args, EditConfig):
            raise TypeError(f"ConstrainedEditTrainer needs an EditConfig, got {type(args).__name__}.")
        edit_model = model if isinstance(model, EditModel) else get_edit_model(model, args.block_selector_config())
        base = edit_model.model
        if data_collator is None and processing_class is not None:
            data_collator = FactCollator(processing_class, kind=model_kind(base))
        if compute_loss_func is None:
            compute_loss_func = _object_token_loss(base)
        super().__init__(
            model=base,
            args=args,
            data_collator=data_collator,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            **kwargs,
        )
        self.edit_model = edit_model
        self.projector = NormBallProjector(
            edit_model.trainable_parameters(), edit_model.theta0, args.norm, args.delta, args.l2_scope
        )
        self._hooked_optimizer: torch.optim.Optimizer | None = None
        self.add_callback(_SaveTheta0Callback(edit_model))

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if optimizer is not self._hooked_optimizer:
            optimizer.register_step_post_hook(self._project_after_step)
            self._hooked_optimizer = optimizer
        return optimizer

    def _project_after_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        # A fused optimizer under the fp16 grad scaler is stepped even on overflow and skips the
        # update itself; the scaler then sets `optimizer.found_inf` for the duration of the step.
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            return
        self.projector.project_()

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint:
            self._restore_theta0(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _restore_theta0(self, resume_from_checkpoint: str | bool) -> None:
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)
            if folder is None:
                raise ValueError(f"No checkpoint to resume from in {self.args.output_dir}.")
        path = os.path.join(folder, THETA0_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"{folder} has no {THETA0_NAME}: it was not written by ConstrainedEditTrainer, so the "
                "original centre θ0 of the constraint is unknown. Start the edit afresh."
            )
        saved = load_tensors(path)
        if set(saved) != set(self.edit_model.theta0):
            raise ValueError(
                f"{path} holds θ0 for other parameters than this run trains: the checkpoint belongs to an "
                f"edit of other blocks. This run trains {self.args.edit_blocks}."
            )
        for name, value in saved.items():
            current = self.edit_model.theta0[name]
            if not torch.equal(value, current.cpu()):
                logger.info("θ0 of %s taken from the checkpoint (the model given differs from it).", name)
            self.edit_model.theta0[name] = value.to(current.device)
        self.projector.theta0 = {name: self.edit_model.theta0[name] for name in self.projector.params}

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs["constraint_distance"] = self.projector.distance()
        super().log(logs, *args, **kwargs)


def _object_token_loss(model: PreTrainedModel):
    """The model's own LM loss (shifted for causal LMs) summed over object tokens / `num_items_in_batch`."""
    loss_function = model.loss_function

    def compute(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"]
        return loss_function(
            logits=logits, labels=labels, vocab_size=logits.shape[-1], num_items_in_batch=num_items_in_batch
        )

    return compute
