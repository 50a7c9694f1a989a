"""`ConstrainedEditTrainer`: the paper's projected fine-tuning as a `transformers.Trainer`."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import datasets
import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .architectures import eval_mode, model_kind
from .collators import PRESERVE_INPUT, WEIGHTS_INPUT, FactCollator
from .edit_config import EditConfig
from .evaluation.metrics import MODIFIED_TEST, UNMODIFIED_TEST, edit_metrics, evaluate_splits
from .evaluation.scoring import FactResults
from .fast_paths.heads import head_modules, logit_positions, object_targets
from .fast_paths.prefix import PrefixCache, fast_forward, first_editable_block
from .fisher import diagonal_fisher
from .io import load_tensors, save_tensors
from .keys import KeyStatistics, corpus_texts, key_layers, preserved_keys
from .model import EditModel, get_edit_model, values_at
from .projection import KeyProjector, NormBallProjector


logger = logging.getLogger(__name__)

THETA0_NAME = "memedit_theta0.safetensors"
PARAMS_NAME = "memedit_params.safetensors"


class _SaveTheta0Callback(TrainerCallback):
    """Writes the trainable parameters and θ0 into every checkpoint, θ0 last: a checkpoint without
    it was cut short while saving. A resumed run projects around the original centre and takes the
    trained values from our own file, by the names the trainer uses (transformers may save a model
    under its original checkpoint's names, e.g. BERT's LayerNorm gamma/beta, which Trainer's resume
    then silently skips)."""

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
        (int(match.group(1)), name) for name in os.listdir(output_dir)
        if (match := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    for _, name in reversed(steps):
        folder = os.path.join(output_dir, name)
        if is_complete_checkpoint(folder):
            return folder
        logger.warning("Skipping %s: it was cut short while saving (no %s or %s).", folder, TRAINER_STATE_NAME, THETA0_NAME)
    return None


class _StopAtLossCallback(TrainerCallback):
    """FT-L's early stop, judged on a whole optimizer step's loss (the sum of its micro-batches' shares),
    so gradient accumulation never stops with a step half accumulated."""

    def __init__(self, trainer: ConstrainedEditTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if args.stop_at_loss is not None and self.trainer._step_loss < args.stop_at_loss:
            control.should_training_stop = True
        self.trainer._step_loss = 0.0


class _StopAtEpochLossCallback(TrainerCallback):
    """LocFT-BF's early stop: the mean loss of an epoch's batches below `stop_at_epoch_loss`."""

    def __init__(self, trainer: ConstrainedEditTrainer):
        self.trainer = trainer

    def on_epoch_end(self, args, state, control, **kwargs):
        losses = self.trainer._epoch_losses
        if args.stop_at_epoch_loss is not None and losses and sum(losses) / len(losses) < args.stop_at_epoch_loss:
            control.should_training_stop = True
        self.trainer._epoch_losses = []


class _FollowParametersCallback(TrainerCallback):
    """The projector follows the parameters before the first step: FSDP2 may have replaced them with sharded ones,
    by hand or in `train()` (accelerate's plugin shards after the optimizer is made and hands it the new ones)."""

    def __init__(self, trainer: ConstrainedEditTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._follow_parameters()


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

    The loss is cross-entropy on the object tokens normalised by their number in the whole
    effective batch (transformers' `fixed_cross_entropy`, as the models' own losses), so gradient accumulation matches the equal
    large batch exactly. Two fast paths leave it unchanged up to float rounding:
    `object_logits_only` runs the LM head only at object positions (`hf_memedit.fast_paths.heads`), and
    `prefix_cache` runs only the blocks from the lowest edited one on (`hf_memedit.fast_paths.prefix`; the
    frozen blocks below then run without dropout).

    Given benchmark splits as `eval_dataset` (a dict or `DatasetDict` holding `modified_test`
    and/or `unmodified_test`, optionally `modified_train`), `evaluate()` reports the fact
    metrics of `hf_memedit.evaluation.metrics.avg_acc` (eval_a_m, eval_a_fs, eval_avg_acc, ...) through the
    Trainer's own evaluation schedule and loggers (TensorBoard, ...). With
    `args.eval_before_edit`, `train()` first evaluates θ0, so retention and agreement are reported.

    Args:
        model: a transformers masked or causal LM, or an `EditModel` (then `args.edit_blocks` is unused).
        args: an `EditConfig`.
        processing_class: the tokenizer; with no `data_collator`, facts are collated by `FactCollator`.
        fisher_dataset: unmodified facts for the diagonal Fisher of `norm: fisher`.
        fisher: that Fisher already estimated (`diagonal_fisher`), e.g. shared by a sweep's points.
        prefix_cache: a `PrefixCache` to reuse (a sweep shares one across its δ), else one is built
            when `args.prefix_cache` is set and something below the edited blocks is frozen.
        keys: the preserved keys (`hf_memedit.keys.preserved_keys`) of `args.key_constraint`, else they are
            taken (or read from the cache) on `args.preserve_corpus`.
        preserve_texts: the texts of `preserve_corpus: benchmark` (the unmodified facts set aside).
    """

    def __init__(
        self,
        model: PreTrainedModel | EditModel,
        args: EditConfig,
        data_collator=None,
        processing_class=None,
        compute_loss_func=None,
        fisher_dataset=None,
        fisher: dict[str, torch.Tensor] | None = None,
        prefix_cache: PrefixCache | None = None,
        keys: KeyStatistics | None = None,
        preserve_texts: Sequence[str] | None = None,
        **kwargs,
    ):
        if not isinstance(args, EditConfig):
            raise TypeError(f"ConstrainedEditTrainer needs an EditConfig, got {type(args).__name__}.")
        edit_model = model if isinstance(model, EditModel) else get_edit_model(model, args.block_selector_config())
        base = edit_model.model
        if data_collator is None and processing_class is not None:
            data_collator = FactCollator(processing_class, kind=model_kind(base), append_eos=args.eos_target)
        kind = model_kind(base)
        # Object-only logits need to know the loss: only with the trainer's own loss function.
        object_only = args.object_logits_only and compute_loss_func is None and head_modules(base) is not None
        if args.object_logits_only and compute_loss_func is None and not object_only:
            logger.warning(
                "object_logits_only: hf_memedit's block table does not hold the LM head of %s (a blocks_path layout "
                "names the blocks only; some configurations build another head than the table's), so the full head "
                "runs: the same loss, without the speed-up.", type(base).__name__,
            )
        self._weighted_loss = None
        if compute_loss_func is None:
            compute_loss_func = self._weighted_loss = ObjectTokenLoss(kind, args.loss_reduction)
        super().__init__(
            model=base,
            args=args,
            data_collator=data_collator,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            **kwargs,
        )
        self.edit_model = edit_model
        self.kind = kind
        self.object_logits_only = object_only
        layout = edit_model.selector_config.layout(base)
        if prefix_cache is None and args.prefix_cache:
            prefix_cache = PrefixCache.for_model(base, args.prefix_cache_dtype, layout)
        elif prefix_cache is not None and prefix_cache.block != first_editable_block(base, layout):
            raise ValueError(
                f"The prefix cache given holds the inputs of block {prefix_cache.block}, but this edit trains "
                f"from block {first_editable_block(base, layout)}: build one for this selection (PrefixCache.for_model)."
            )
        self.prefix_cache = prefix_cache
        if self._weighted_loss is not None and args.loss_reduction == "sequence":
            self.loss_is_scaled_for_ga = False  # a per-batch mean: Trainer divides it by the micro-batches accumulated
        if args.norm == "fisher" and fisher is None and (fisher_dataset is None or processing_class is None):
            raise ValueError(
                "norm 'fisher' needs fisher_dataset (unmodified facts, e.g. the benchmark's unmodified_train) "
                "and processing_class (the tokenizer) to estimate the Fisher information at θ0."
            )
        if args.key_constraint != "none" and keys is None and processing_class is None:
            raise ValueError("key_constraint needs processing_class (the tokenizer) to take the preserved keys.")
        self._given = {"fisher": fisher, "keys": keys}  # statistics the caller estimated (kept on resume)
        self._fisher_dataset, self._preserve_texts = fisher_dataset, preserve_texts
        self.keys = keys
        self._projector: NormBallProjector | None = None  # built at first use, once θ0 is known (see `projector`)
        self._hooked_optimizer: torch.optim.Optimizer | None = None
        self.before_edit: dict[str, FactResults] | None = None
        self._step_loss = 0.0
        self._parameter_count: int | None = None
        self.add_callback(_SaveTheta0Callback(edit_model))
        self._epoch_losses: list[float] = []
        self.add_callback(_StopAtLossCallback(self))
        self.add_callback(_StopAtEpochLossCallback(self))
        self.add_callback(_FollowParametersCallback(self))

    @property
    def projector(self) -> NormBallProjector:
        """The ball (∩ key set) around θ0. Built at first use (at the latest when training begins), so that a run
        resumed from a checkpoint's weights builds it around the checkpoint's θ0, not around the weights given."""
        if self._projector is None:
            self._projector = self._constraint()
        return self._projector

    def _constraint(self) -> NormBallProjector:
        """The projector, with the Fisher and the preserved keys it needs estimated with the trainable parameters at
        θ0 (whatever they hold now)."""
        args, theta0 = self.args, self.edit_model.theta0
        fisher, keys = self._given["fisher"], self._given["keys"]
        estimate = (args.norm == "fisher" and fisher is None) or (args.key_constraint != "none" and keys is None)
        with values_at(self.edit_model.trainable_parameters(), theta0) if estimate else nullcontext():
            fisher, keys = self._statistics(fisher, keys)
        key_projector = None
        if args.key_constraint != "none":
            key_projector = KeyProjector(
                args.key_constraint, keys.moments, key_layers(self.edit_model.model, list(theta0)), list(theta0), theta0,
                threshold=args.nullspace_threshold, energy=args.nullspace_energy, rho=args.output_rho,
            )
        self.keys = keys
        return NormBallProjector(
            self.edit_model.trainable_parameters(), theta0, args.norm, args.delta, args.l2_scope, fisher=fisher,
            keys=key_projector, iterations=args.projection_iterations, tolerance=args.projection_tolerance,
        )

    def _statistics(self, fisher, keys):
        """The Fisher diagonal and the preserved keys the constraint needs, estimated on the model as it is now."""
        args, base, theta0 = self.args, self.edit_model.model, self.edit_model.theta0
        if args.norm == "fisher" and fisher is None:
            fisher = diagonal_fisher(
                base, self.processing_class, self._fisher_dataset, list(theta0), samples=args.fisher_samples,
                seed=args.seed, show_progress=not args.disable_tqdm,
            )
        if args.key_constraint != "none" and keys is None:
            texts = corpus_texts(args.preserve_corpus, args.preserve_corpus_column, args.preserve_corpus_samples,
                                 self._preserve_texts)
            spec = {"corpus": args.preserve_corpus, "samples": args.preserve_corpus_samples,
                    "length": args.preserve_corpus_length, "seed": args.seed}
            keys = preserved_keys(base, self.processing_class, list(theta0), texts, spec, args.preserve_keys_file)
        return fisher, keys

    def _get_num_items_in_batch(self, batch_samples, device):
        """No token count for a mean per fact: `Trainer` then divides each accumulation group's loss by the micro-batches
        it holds (fewer in an epoch's last group) and does not rescale it by the number of processes."""
        if self._weighted_loss is not None and self.args.loss_reduction == "sequence":
            return None
        return super()._get_num_items_in_batch(batch_samples, device)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if optimizer is not self._hooked_optimizer:
            optimizer.register_step_post_hook(self._project_after_step)
            self._hooked_optimizer = optimizer
        return optimizer

    def _follow_parameters(self) -> None:
        """Project the model's parameters as they are when training begins: FSDP2's `fully_shard` replaces them with
        sharded ones, by hand before `train()` or in it (accelerate's plugin, after the optimizer is made)."""
        current = dict(self.model.named_parameters())
        if any(current.get(name) is not param for name, param in self.projector.params.items()):
            self.projector.rebind(current)

    def _project_after_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        # A fused optimizer under the fp16 grad scaler is stepped even on overflow and skips the
        # update itself; the scaler then sets `optimizer.found_inf` for the duration of the step.
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            return
        self.projector.project_()

    @contextmanager
    def _fast_paths(self, inputs, logits_only: bool) -> Iterator[None]:
        """The prefix cache and (when only the loss is needed) object-position-only logits for this batch.

        Held over forward *and* backward, so gradient checkpointing, which runs blocks again during
        backward, runs them the same way.
        """
        positions = None
        if self.object_logits_only and logits_only and "labels" in inputs:
            positions = logit_positions(inputs["labels"], self.kind)
        with fast_forward(
            self.edit_model.model, self.prefix_cache, inputs.get("input_ids"), inputs.get("attention_mask"), positions
        ):
            yield

    def training_step(self, model, inputs, num_items_in_batch=None):
        with self._fast_paths(inputs, logits_only=True):
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self.args.stop_at_loss is not None:
            self._step_loss += loss.item()  # judged once the optimizer step is complete (_StopAtLossCallback)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's loss; a batch's `object_weights` (a preservation mix) weight its rows in the object-token loss,
        and with `preserve_objective: kl` its preservation rows are scored by KL(θ0 ‖ θ) instead of cross-entropy."""
        weights = inputs.pop(WEIGHTS_INPUT, None)
        preserve = inputs.pop(PRESERVE_INPUT, None)
        kl_rows = preserve if self.args.preserve_objective == "kl" and model.training else None
        if weights is None and kl_rows is None:
            return self._maybe_skip(super().compute_loss(model, inputs, return_outputs, num_items_in_batch))
        if self._weighted_loss is None:
            raise ValueError(
                "This batch carries per-fact loss weights or preservation rows (a preservation mix), which a custom "
                "compute_loss_func cannot see: leave compute_loss_func unset, or give batches without them."
            )
        self._weighted_loss.row_weights = weights
        if kl_rows is not None:
            self._weighted_loss.kl_rows = kl_rows
            self._weighted_loss.reference = self._theta0_log_probs(model, inputs)
        try:
            # With KL rows the batch runs without dropout, as θ0's reference does: θ0 is then a fixed point of the
            # KL term (zero, with zero gradient, at θ = θ0) instead of a random target.
            with eval_mode(model) if kl_rows is not None else nullcontext():
                return self._maybe_skip(super().compute_loss(model, inputs, return_outputs, num_items_in_batch))
        finally:
            self._weighted_loss.row_weights = self._weighted_loss.kl_rows = self._weighted_loss.reference = None

    @torch.no_grad()
    def _theta0_log_probs(self, model, inputs) -> torch.Tensor:
        """θ0's log-probabilities at the batch's object positions (`[n, vocab]`, float32 or float64), for the KL:
        θ0's own distribution, so without dropout, the same on every call."""
        with self.at_theta0(), eval_mode(model):
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        if logits.dim() == 3:
            logits = logits[logit_positions(inputs["labels"], self.kind).to(logits.device)]
        return (logits if logits.dtype == torch.float64 else logits.float()).log_softmax(-1)

    def _maybe_skip(self, result):
        """`skip_below_loss`: a training batch already below it gives no gradient (a leaf copy of its loss), so
        the optimizer, which skips parameters without gradients, changes nothing; its loss is still logged."""
        if not self.model.training or (self.args.skip_below_loss is None and self.args.stop_at_epoch_loss is None):
            return result  # no stop asks for the loss: no device sync on the hot path
        loss = result[0] if isinstance(result, tuple) else result
        value = float(loss.detach())
        self._epoch_losses.append(value)
        if self.args.skip_below_loss is None or value >= self.args.skip_below_loss:
            return result
        skipped = loss.detach().clone().requires_grad_()
        return (skipped, *result[1:]) if isinstance(result, tuple) else skipped

    def floating_point_ops(self, inputs) -> int:
        """Trainer's estimate, 6 × tokens × non-embedding parameters, with the parameters counted once:
        counting walks every module, which on a step of one cached block is a noticeable cost."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs:
            return 0
        if self._parameter_count is None:
            self._parameter_count = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._parameter_count

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with self._fast_paths(inputs, logits_only=prediction_loss_only):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        columns = getattr(self.train_dataset, "column_names", None) or []
        if self.prefix_cache is not None and "text" in columns and self.processing_class is not None:
            # Up front, with a memory check and a progress bar; other datasets fill the cache batch by batch.
            self.prefix_cache.add_facts(
                self.processing_class, self.train_dataset, self.args.per_device_eval_batch_size,
                show_progress=not self.args.disable_tqdm,
            )
        if resume_from_checkpoint:
            resume_from_checkpoint = self._checkpoint_folder(resume_from_checkpoint)
            self._restore_theta0(resume_from_checkpoint)
            logger.warning("Resuming the edit from %s.", resume_from_checkpoint)
        if self.args.eval_before_edit and self.before_edit is None and _fact_splits(self.eval_dataset):
            with self.at_theta0():  # a resumed run reports A_F before, retention and agreement too
                self.before_edit = self.fact_results(self.eval_dataset, original=True)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Fact metrics on benchmark splits; any other eval dataset goes to `Trainer.evaluate`."""
        splits = eval_dataset if eval_dataset is not None else self.eval_dataset
        if not _fact_splits(splits):
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        logged = {
            f"{metric_key_prefix}_{key}": value
            for key, value in self.fact_metrics(splits).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        self.log(logged)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, logged)
        return logged

    def fact_metrics(self, splits: Mapping[str, datasets.Dataset]) -> dict:
        """Every `avg_acc` metric (per relation included) of the model now, against `before_edit`."""
        return edit_metrics(splits, self.fact_results(splits), self.before_edit, self.processing_class, self.kind)

    def fact_results(self, splits: Mapping[str, datasets.Dataset], original: bool = False) -> dict[str, FactResults]:
        """Per-fact results on the benchmark splits (`original=True`: modified facts on their old object)."""
        if self.processing_class is None:
            raise ValueError("Fact evaluation needs the tokenizer: pass processing_class=tokenizer to the trainer.")
        return evaluate_splits(
            self.edit_model.model, self.processing_class, splits, original=original,
            batch_size=self.args.per_device_eval_batch_size, show_progress=not self.args.disable_tqdm,
            prefix=self.prefix_cache,
        )

    def _checkpoint_folder(self, resume_from_checkpoint: str | bool) -> str:
        """The checkpoint to resume from: the newest complete one for `True`, else the folder given, checked."""
        if resume_from_checkpoint is True:
            folder = last_complete_checkpoint(self.args.output_dir)
            if folder is None:
                raise ValueError(f"No complete checkpoint to resume from in {self.args.output_dir}.")
            return folder
        folder = os.fspath(resume_from_checkpoint)
        if not os.path.isdir(folder):
            raise ValueError(f"resume_from_checkpoint {folder} does not exist: give a checkpoint-N folder, or true for the last one.")
        return folder

    def at_theta0(self) -> AbstractContextManager[None]:
        """The trainable parameters at θ0 inside (they are restored after). Usable inside the fast paths, which
        rearrange the block list (the parameters are the projector's, held by reference)."""
        return values_at(self.projector.params, self.projector.theta0_like_params())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: PreTrainedModel | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, PARAMS_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{resume_from_checkpoint} has no {PARAMS_NAME}: it was cut short while saving. Resume from an earlier checkpoint.")
        saved = load_tensors(path)
        params = self.edit_model.trainable_parameters()
        if set(saved) != set(params):
            raise ValueError(f"{path} holds other parameters than this run trains ({self.args.edit_blocks}).")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved[name])

    def _restore_theta0(self, folder: str) -> None:
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
        changed = [name for name, value in saved.items() if not torch.equal(value, self.edit_model.theta0[name].cpu())]
        for name, value in saved.items():
            self.edit_model.theta0[name] = value.to(self.edit_model.theta0[name].device)
        if changed:
            # The model given is not θ0 (e.g. the checkpoint's own weights): the constraint is built again around the
            # checkpoint's θ0, its Fisher and preserved keys estimated with the trainable parameters at θ0.
            logger.warning("θ0 of %d tensors (%s, ...) taken from the checkpoint: the model given differs from it, so "
                           "the constraint is built again around θ0.", len(changed), changed[0])
            self._projector = None  # built again, around the checkpoint's θ0

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs["constraint_distance"] = self.projector.distance()
            if self.projector.keys is not None and self.args.norm != "none":
                # The last projection's Dykstra run; `dykstra_capped` counts the projections that hit the cap.
                logs["dykstra_iterations"] = self.projector.dykstra_iterations
                logs["dykstra_pull_in"] = self.projector.dykstra_pull_in
                logs["dykstra_capped"] = self.projector.capped_projections
        super().log(logs, *args, **kwargs)


def _fact_splits(dataset) -> bool:
    """Whether an eval dataset is a set of benchmark splits (scored by fact metrics, not by loss)."""
    return isinstance(dataset, Mapping) and bool({MODIFIED_TEST, UNMODIFIED_TEST} & set(dataset))


class ObjectTokenLoss:
    """Cross-entropy summed over the object tokens / `num_items_in_batch` (transformers' `fixed_cross_entropy`).

    Full logits (`[batch, length, vocab]`) are cut to the object positions first, so both fast and
    straightforward forwards reduce the same `[n, vocab]` rows in the same order. Half-precision
    logits are upcast to float32 as transformers' LM losses do; float64 logits keep their precision
    (transformers' losses would round them to float32). With `row_weights` (set by the trainer for
    one batch) each row's tokens count with its weight: Σ w·CE / num_items. `reduction` 'sequence'
    is LocFT-BF's loss instead: the (weighted) mean over facts of each fact's mean token loss, a per-batch mean
    that the trainer has `Trainer` divide by the micro-batches each step accumulates. With `kl_rows` and `reference`
    (θ0's log-probabilities at the same positions) those rows' tokens contribute KL(θ0 ‖ θ) instead of CE.
    """

    def __init__(self, kind: str, reduction: str = "token"):
        self.kind, self.reduction = kind, reduction
        self.row_weights: torch.Tensor | None = None
        self.kl_rows: torch.Tensor | None = None  # rows scored by KL(θ0 ‖ θ) against `reference` instead of CE
        self.reference: torch.Tensor | None = None

    def __call__(self, outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"]
        positions = logit_positions(labels, self.kind).to(logits.device)
        if logits.dim() == 3:
            logits = logits[positions]
        if logits.dtype != torch.float64:
            logits = logits.float()
        targets = object_targets(labels, self.kind).to(logits.device)
        if self.row_weights is None and self.reduction == "token" and self.kl_rows is None:
            return fixed_cross_entropy(logits, targets, num_items_in_batch=num_items_in_batch)
        rows = positions.nonzero()[:, 0]
        weights = torch.ones(len(positions), dtype=logits.dtype, device=logits.device) if self.row_weights is None else (
            self.row_weights.to(device=logits.device, dtype=logits.dtype))
        per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        if self.kl_rows is not None:
            reference = self.reference.to(device=logits.device, dtype=logits.dtype)
            kl = (reference.exp() * (reference - logits.log_softmax(-1))).sum(-1)
            per_token = torch.where(self.kl_rows.to(logits.device)[rows], kl, per_token)
        if self.reduction == "sequence":  # each fact's mean token loss, averaged over the batch's facts
            sums = torch.zeros(len(positions), dtype=per_token.dtype, device=per_token.device).index_add_(0, rows, per_token)
            counts = positions.sum(1).to(per_token.dtype)
            present = counts > 0
            means = sums[present] / counts[present]
            return (means * weights[present]).sum() / weights[present].sum()
        total = (per_token * weights[rows]).sum()
        count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
        if torch.is_tensor(count):
            count = count.to(total.device)
        return total / count
