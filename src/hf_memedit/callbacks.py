"""The trainer's early stops, each holding the losses it judges (the trainer hands them over as it computes them)."""

from __future__ import annotations

from collections.abc import Callable

from transformers import TrainerCallback


class StopAtLoss(TrainerCallback):
    """FT-L's early stop: a whole optimizer step's loss (its micro-batches' shares summed) below `threshold`, so
    gradient accumulation never stops with a step half accumulated."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.step_loss = 0.0

    def add(self, loss: float) -> None:
        """One micro-batch's share of the step's loss."""
        self.step_loss += loss

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_loss < self.threshold:
            control.should_training_stop = True
        self.step_loss = 0.0


class StopAtEpochLoss(TrainerCallback):
    """LocFT-BF's early stop: the mean loss of an epoch's batches below `threshold`."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.losses: list[float] = []

    def add(self, loss: float) -> None:
        """One training batch's loss."""
        self.losses.append(loss)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.losses and sum(self.losses) / len(self.losses) < self.threshold:
            control.should_training_stop = True
        self.losses = []


class OnTrainBegin(TrainerCallback):
    """Calls `action` when training begins (after `train()` has prepared the model, e.g. sharded it)."""

    def __init__(self, action: Callable[[], None]):
        self.action = action

    def on_train_begin(self, args, state, control, **kwargs):
        self.action()
