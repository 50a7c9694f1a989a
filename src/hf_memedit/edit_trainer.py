"""`ConstrainedEditTrainer`: the paper's projected fine-tuning as a `transformers.Trainer`."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import datasets
import torch
from transformers import PreTrainedModel, Trainer

from .architectures import eval_mode, model_kind
from .callbacks import OnTrainBegin, StopAtEpochLoss, StopAtLoss
from .checkpointing import SaveTheta0Callback, checkpoint_folder, load_trained_values, read_theta0
from .collators import PRESERVE_INPUT, WEIGHTS_INPUT, FactCollator
from .edit_config import EditConfig
from .evaluation.metrics import MODIFIED_TEST, UNMODIFIED_TEST, edit_metrics, evaluate_splits
from .evaluation.scoring import FactResults
from .fast_paths.heads import head_modules, logit_positions
from .fast_paths.prefix import PrefixCache, fast_forward, first_editable_block
from .fisher import diagonal_fisher
from .keys import KeyStatistics, collect_keys, corpus_texts, key_layers, keys_corpus, preserved_keys
from .loss import ObjectTokenLoss, Theta0References
from .model import EditModel, get_edit_model, values_at
from .projection import KeyProjector, NormBallProjector, check_resolution


logger = logging.getLogger(__name__)

REFERENCE_INPUT = "theta0_log_probs"  # a batch's θ0 log-probabilities at its KL rows' object positions


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
    effective batch (transformers' `fixed_cross_entropy`, as the models' own losses), so gradient accumulation matches
    the equal large batch exactly. Two fast paths leave it unchanged up to float rounding:
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
        edit_keys: token ids of texts whose computation at the edited layers an update must leave alone beside the
            preserved keys' (a stream's earlier edits: AlphaEdit's sequential rule); `key_constraint: nullspace`.
            Their keys are taken at θ0.
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
        edit_keys: Sequence[Sequence[int]] | None = None,
        **kwargs,
    ):
        if not isinstance(args, EditConfig):
            raise TypeError(f"ConstrainedEditTrainer needs an EditConfig, got {type(args).__name__}.")
        edit_model = model if isinstance(model, EditModel) else get_edit_model(model, args.block_selector_config())
        base = edit_model.model
        if data_collator is None and processing_class is not None:
            data_collator = FactCollator(
                processing_class,
                kind=model_kind(base),
                append_eos=args.eos_target,
                target_suffix=args.target_suffix or "",
            )
        kind = model_kind(base)
        # Object-only logits need to know the loss: only with the trainer's own loss function.
        object_only = args.object_logits_only and compute_loss_func is None and head_modules(base) is not None
        if args.object_logits_only and compute_loss_func is None and not object_only:
            logger.warning(
                "object_logits_only: hf_memedit's block table does not hold the LM head of %s (a blocks_path layout "
                "names the blocks only; some configurations build another head than the table's), so the full head "
                "runs: the same loss, without the speed-up.",
                type(base).__name__,
            )
        self._loss = None  # the trainer's own loss (None: the caller's compute_loss_func)
        if compute_loss_func is None:
            compute_loss_func = self._loss = ObjectTokenLoss(kind, args.loss_reduction)
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
                f"The prefix cache given holds the inputs of block {prefix_cache.block}, but this edit trains from "
                f"block {first_editable_block(base, layout)}: build one for this selection (PrefixCache.for_model)."
            )
        self.prefix_cache = prefix_cache
        if self._loss is not None:  # a sum over the accumulated batch's tokens, or a per-batch mean ('sequence')
            self.loss_is_scaled_for_ga = args.loss_reduction != "sequence"
        if args.norm == "fisher" and fisher is None and (fisher_dataset is None or processing_class is None):
            raise ValueError(
                "norm 'fisher' needs fisher_dataset (unmodified facts, e.g. the benchmark's unmodified_train) "
                "and processing_class (the tokenizer) to estimate the Fisher information at θ0."
            )
        if args.norm == "linf":  # the projector is built later: a δ too fine for the dtype is refused or reported now
            check_resolution(self.edit_model.theta0, args.delta)
        if args.key_constraint != "none" and keys is None and processing_class is None:
            raise ValueError("key_constraint needs processing_class (the tokenizer) to take the preserved keys.")
        if edit_keys and args.key_constraint != "nullspace":
            raise ValueError(
                f"edit_keys are kept in the null space of key_constraint nullspace, and this edit's is "
                f"{args.key_constraint!r}: set key_constraint nullspace, or give no edit_keys."
            )
        self._edit_keys = [list(ids) for ids in edit_keys] if edit_keys else None
        self._given = {"fisher": fisher, "keys": keys}  # statistics the caller estimated (kept on resume)
        self._fisher_dataset, self._preserve_texts = fisher_dataset, preserve_texts
        self.keys = keys
        self._projector: NormBallProjector | None = None  # built at first use, once θ0 is known (see `projector`)
        self._references = Theta0References() if args.preserve_objective == "kl" else None
        self._hooked_optimizer: torch.optim.Optimizer | None = None
        self.before_edit: dict[str, FactResults] | None = None
        self._parameter_count: int | None = None
        self.add_callback(SaveTheta0Callback(edit_model))
        self._stop_at_loss = StopAtLoss(args.stop_at_loss) if args.stop_at_loss is not None else None
        self._stop_at_epoch_loss = (
            StopAtEpochLoss(args.stop_at_epoch_loss) if args.stop_at_epoch_loss is not None else None
        )
        for stop in (self._stop_at_loss, self._stop_at_epoch_loss):
            if stop is not None:
                self.add_callback(stop)
        # The projector follows the parameters as they are when training begins: FSDP2 may have replaced them with
        # sharded ones, by hand or in `train()` (accelerate's plugin shards after the optimizer is made).
        self.add_callback(OnTrainBegin(self._follow_parameters))

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
        estimate = (
            (args.norm == "fisher" and fisher is None)
            or (args.key_constraint != "none" and keys is None)
            or self._edit_keys is not None
        )
        layers = key_layers(self.edit_model.model, list(theta0))
        with values_at(self.edit_model.trainable_parameters(), theta0) if estimate else nullcontext():
            fisher, keys = self._statistics(fisher, keys)
            edits = (
                collect_keys(self.edit_model.model, self.processing_class, self._edit_keys, layers)[0]
                if self._edit_keys is not None
                else None
            )
        key_projector = None
        if args.key_constraint != "none":
            key_projector = KeyProjector(
                args.key_constraint,
                keys.moments,
                layers,
                list(theta0),
                theta0,
                threshold=args.nullspace_threshold,
                energy=args.nullspace_energy,
                rho=args.output_rho,
                edits=edits,
            )
        self.keys = keys
        return NormBallProjector(
            self.edit_model.trainable_parameters(),
            theta0,
            args.norm,
            args.delta,
            args.l2_scope,
            fisher=fisher,
            keys=key_projector,
            iterations=args.projection_iterations,
            tolerance=args.projection_tolerance,
            check_dtype=False,
        )

    def _statistics(self, fisher, keys):
        """The Fisher diagonal and the preserved keys the constraint needs, estimated on the model as it is now."""
        args, base, theta0 = self.args, self.edit_model.model, self.edit_model.theta0
        if args.norm == "fisher" and fisher is None:
            fisher = diagonal_fisher(
                base,
                self.processing_class,
                self._fisher_dataset,
                list(theta0),
                samples=args.fisher_samples,
                seed=args.seed,
                show_progress=not args.disable_tqdm,
            )
        if args.key_constraint != "none" and keys is None:
            corpus = keys_corpus(args.preserve_corpus, base)
            if corpus != args.preserve_corpus and not self._preserve_texts:
                raise ValueError(
                    "A masked LM draws no samples, so its preserved keys are taken on the preservation facts set "
                    "aside (a facts file's keep prompts), and there are none: give keep prompts with their answers, "
                    "or set preserve_corpus to a data file."
                )
            if corpus != args.preserve_corpus:
                logger.info(
                    "preserve_corpus %s: a masked LM draws no samples, its keys are taken on %s.",
                    args.preserve_corpus,
                    corpus,
                )
            texts = corpus_texts(
                corpus, args.preserve_corpus_column, args.preserve_corpus_samples, self._preserve_texts
            )
            spec = {
                "corpus": corpus,
                "samples": args.preserve_corpus_samples,
                "length": args.preserve_corpus_length,
                "seed": args.seed,
            }
            keys = preserved_keys(base, self.processing_class, list(theta0), texts, spec, args.preserve_keys_file)
        return fisher, keys

    def _get_num_items_in_batch(self, batch_samples, device):
        """No token count for a mean per fact: `Trainer` then divides each accumulation group's loss by the
        micro-batches it holds (fewer in an epoch's last group) and does not rescale it by the number of processes."""
        if self._loss is not None and self.args.loss_reduction == "sequence":
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
        inputs = self._with_references(inputs)
        with self._fast_paths(inputs, logits_only=True):
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self._stop_at_loss is not None:
            self._stop_at_loss.add(loss.item())  # judged once the optimizer step is complete
        return loss

    def _with_references(self, inputs):
        """The batch with θ0's log-probabilities at its KL rows' object positions (`preserve_objective: kl`), each
        row's computed once (θ0 without dropout: its own distribution) and kept for the next time it comes round."""
        kl_rows = inputs.get(PRESERVE_INPUT)
        if self._references is None or kl_rows is None or not bool(kl_rows.any()):
            return inputs
        positions = logit_positions(inputs["labels"], self.kind)
        rows = kl_rows.nonzero()[:, 0].tolist()
        keys = [Theta0References.key(inputs["input_ids"][r], inputs["attention_mask"][r], positions[r]) for r in rows]
        missing = [r for r, key in zip(rows, keys) if key not in self._references]
        if missing:
            for key, value in zip([keys[rows.index(r)] for r in missing], self._theta0_log_probs(inputs, missing)):
                self._references.add(key, value)
        return {**inputs, REFERENCE_INPUT: self._references.gather(keys)}

    @torch.no_grad()
    def _theta0_log_probs(self, inputs, rows: list[int]) -> list[torch.Tensor]:
        """θ0's log-probabilities (`[n, vocab]`, float32 or float64) at the object positions of the batch's `rows`."""
        model = self.edit_model.model
        device = next(model.parameters()).device
        index = torch.tensor(rows)
        ids, mask = inputs["input_ids"][index].to(device), inputs["attention_mask"][index].to(device)
        positions = logit_positions(inputs["labels"][index], self.kind).to(device)
        fast = positions if self.object_logits_only else None
        with self.at_theta0(), eval_mode(model), fast_forward(model, self.prefix_cache, ids, mask, fast):
            logits = model(input_ids=ids, attention_mask=mask).logits
        if logits.dim() == 3:
            logits = logits[positions]
        logits = (logits if logits.dtype == torch.float64 else logits.float()).log_softmax(-1)
        return list(logits.split(positions.sum(1).tolist()))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The object-token loss of the batch; a batch's `object_weights` (a preservation mix) weight its rows, and
        with `preserve_objective: kl` its preservation rows are scored by KL(θ0 ‖ θ) instead of cross-entropy."""
        inputs = dict(inputs)
        weights, preserve = inputs.pop(WEIGHTS_INPUT, None), inputs.pop(PRESERVE_INPUT, None)
        reference = inputs.pop(REFERENCE_INPUT, None)
        if self._loss is None:
            if weights is not None or reference is not None:
                raise ValueError(
                    "This batch carries per-fact loss weights or preservation rows (a "
                    "preservation mix), which a custom compute_loss_func cannot see: "
                    "leave compute_loss_func unset, or give batches without them."
                )
            return self._skip_when_low(super().compute_loss(model, inputs, return_outputs, num_items_in_batch))
        if reference is None and model.training and self._references is not None and preserve is not None:
            if bool(preserve.any()):  # scored by cross-entropy instead, they would train toward their labels silently
                raise ValueError(
                    "This batch holds KL preservation rows but not θ0's reference distribution at them, which "
                    "training_step adds: call trainer.training_step(model, inputs), not compute_loss, in train mode."
                )
        kl_rows = preserve if reference is not None and model.training else None
        labels = inputs.pop("labels")
        # With KL rows the batch runs without dropout, as θ0's reference does: θ0 is then a fixed point of the KL term
        # (zero, with zero gradient, at θ = θ0) instead of a random target.
        with eval_mode(model) if kl_rows is not None else nullcontext():
            outputs = model(**inputs)
        loss = self._loss(
            outputs, labels, num_items_in_batch, row_weights=weights, kl_rows=kl_rows, reference=reference
        )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As Trainer's own loss: a sum over the tokens of every rank, whose gradients DDP then averages.
            scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        loss = self._skip_when_low(loss)
        return (loss, outputs) if return_outputs else loss

    def _skip_when_low(self, result):
        """`skip_below_loss`: a training batch already below it gives no gradient (a leaf copy of its loss), so
        the optimizer, which skips parameters without gradients, changes nothing; its loss is still logged."""
        if not self.model.training or (self.args.skip_below_loss is None and self._stop_at_epoch_loss is None):
            return result  # no stop asks for the loss: no device sync on the hot path
        loss = result[0] if isinstance(result, tuple) else result
        value = float(loss.detach())
        if self._stop_at_epoch_loss is not None:
            self._stop_at_epoch_loss.add(value)
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
                self.processing_class,
                self.train_dataset,
                self.args.per_device_eval_batch_size,
                show_progress=not self.args.disable_tqdm,
                collator=self.data_collator if isinstance(self.data_collator, FactCollator) else None,
            )
        if resume_from_checkpoint:
            resume_from_checkpoint = checkpoint_folder(resume_from_checkpoint, self.args.output_dir)
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
            self.edit_model.model,
            self.processing_class,
            splits,
            original=original,
            batch_size=self.args.per_device_eval_batch_size,
            show_progress=not self.args.disable_tqdm,
            prefix=self.prefix_cache,
        )

    def at_theta0(self) -> AbstractContextManager[None]:
        """The trainable parameters at θ0 inside (they are restored after). Usable inside the fast paths, which
        rearrange the block list (the parameters are the projector's, held by reference)."""
        return values_at(self.projector.params, self.projector.theta0_like_params())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: PreTrainedModel | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_trained_values(resume_from_checkpoint, self.edit_model.trainable_parameters(), self.args.edit_blocks)

    def _restore_theta0(self, folder: str) -> None:
        """θ0 from the checkpoint; when the model given differs from it (e.g. the checkpoint's own weights), the
        constraint is built again around the checkpoint's θ0 (its Fisher and keys estimated at θ0)."""
        saved = read_theta0(folder, set(self.edit_model.theta0), self.args.edit_blocks)
        changed = [name for name, value in saved.items() if not torch.equal(value, self.edit_model.theta0[name].cpu())]
        for name, value in saved.items():
            self.edit_model.theta0[name] = value.to(self.edit_model.theta0[name].device)
        if changed:
            logger.warning(
                "θ0 of %d tensors (%s, ...) taken from the checkpoint: the model given differs from it, so "
                "the constraint is built again around θ0.",
                len(changed),
                changed[0],
            )
            self._projector = None

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
