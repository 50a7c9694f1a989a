"""An edit stream (`memedit stream`, `edit_stream`): T facts in batches of b, in arrival order, each batch trained
once; the model after batch k is where batch k+1 starts.

The stream is a user of the one pipeline: one `Theta0Context` (θ0, the facts drawn on it, the disjoint locality
split, the preservation objective), each batch's training set from `settings.edit_train_dataset`, each batch trained
by `ConstrainedEditTrainer`, and one `EditModel` holding the true θ0, so the cumulative edit is saved, verified and
reverted as a run's. What the stream adds:
- the ball's centre (`StreamOptions.stream_center`): θ0 for the whole stream (‖θ_T − θ0‖ ≤ δ), or the state before each
  batch (each batch's step bounded, the stream's drift not);
- earlier edits kept alive: each later batch mixes facts of the earlier batches, their training phrasings with their
  NEW objects, into its batches as preservation rows scored by cross-entropy (KL to the trainer's centre would pull
  them back to θ0's answers when the centre is θ0);
- a replay track (`replay`, LocFT-BF's breadth-first re-training: batch k trains on the facts of batches 1..k);
- `stream.json`, written atomically after each batch with the state it reached (`stream/state-<k>.safetensors`):
  a killed stream resumes from its last finished batch, and a finished one is extended by a facts file that starts
  with the facts it edited, in their order.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import datasets
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..architectures import model_kind
from ..benchmarks.common import CONSISTENCY, MODIFIED_TEST, MODIFIED_TRAIN, UNMODIFIED_TEST, UNMODIFIED_TRAIN
from ..collators import PRESERVE_KEY, WEIGHT_KEY, FactCollator
from ..edit_config import EditConfig, constraint_record
from ..edit_trainer import ConstrainedEditTrainer
from ..evaluation.metrics import (
    edit_metrics,
    evaluate_splits,
    fact_rows,
    generate_splits,
    generated_correct,
    generation_metrics,
    lost_facts,
    next_token_drift,
    per_fact,
    preference_metrics,
)
from ..evaluation.results import ResultsRecord, plotting
from ..evaluation.scoring import FactResults, evaluate_facts, generate_answers, generation_scoring
from ..facts import FALLBACK_KEEP, MODIFIED_PARAPHRASE
from ..files import atomic_directory, atomic_write_text, load_tensors, read_json, save_tensors, tensor_sha256
from ..model import EditModel, get_edit_model, write_values
from ..preservation import NeighbourRisk, preservation_batches
from ..run_folder import begin_outputs, claim_run_folder, seal_run
from .context import FactsSource, Theta0Context, job_facts
from .facts_edit import facts_job
from .facts_source import QUESTIONS, FactsFile, facts_answers, facts_metrics, facts_scoring
from .job_config import JobConfig
from .loading import load_config, load_tokenizer
from .run import fact_examples, run_config
from .settings import edit_train_dataset, refuse_pick_on_test


STREAM_RECORD = "stream.json"
STATE_FOLDER = "stream"  # the state after the last finished batch: what a resumed stream starts from
STREAM_PLOT = "stream.png"
CENTERS = ("theta0", "previous")
# The fields of the job and of the training args that decide a stream's result: a resume must give the same.
JOB_KEYS = (
    "model_name_or_path",
    "gguf_file",
    "revision",
    "setting",
    "benchmark",
    "benchmark_seed",
    "data_dir",
    "benchmark_options",
    "modify_known",
    "train_on_paraphrases",
    "torch_dtype",
)
TRAINING_KEYS = (
    "edit_blocks",
    "edit_modules",
    "learning_rate",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "lr_scheduler_type",
    "weight_decay",
    "preserve_objective",
    "preserve_ratio",
    "preserve_weight",
    "preserve_fraction",
    "preserve_risk",
    "preserve_same_relation",
    "eos_target",
    "loss_reduction",
    "stop_at_loss",
    "skip_below_loss",
    "stop_at_epoch_loss",
    "nullspace_threshold",
    "nullspace_energy",
    "output_rho",
    "preserve_corpus_length",
)


@dataclass
class StreamOptions:
    """How a stream runs, beside the recipe (`EditConfig`): its batches, the ball's centre, the earlier edits.
    `memedit stream`'s own options, from the command line or as keys of its --config YAML."""

    batch_size: int = field(metadata={"help": "Facts per batch of the stream (b)."})
    stream_center: str = field(
        default="theta0",
        metadata={
            "help": "The ball's centre: theta0 (‖θ_T − θ0‖ ≤ δ for the whole stream) or previous (the state before "
            "each batch: each batch's step bounded, the stream's drift not).",
            "choices": CENTERS,
        },
    )
    stream_preserve_earlier: bool = field(
        default=True, metadata={"help": "Mix earlier batches' facts, with their new objects, into later batches."}
    )
    stream_earlier_ratio: float = field(
        default=1.0, metadata={"help": "Earlier facts per fact of the batch in every training batch."}
    )
    stream_replay: bool = field(
        default=False,
        metadata={"help": "LocFT-BF's breadth-first track: batch k trains on the facts of batches 1..k."},
    )
    stream_earlier_keys: bool = field(
        default=False,
        metadata={
            "help": "AlphaEdit's sequential rule: the earlier batches' keys join the null space, so each later "
            "batch's update leaves the edited layers' outputs on the earlier facts alone. Needs key_constraint "
            "nullspace and stream_center previous (around θ0 the cumulative update must act on those keys)."
        },
    )

    def __post_init__(self):
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(
                f"batch_size {self.batch_size}: a stream edits batches of at least one fact; give "
                "--batch_size 1 or more."
            )
        if self.stream_center not in CENTERS:
            raise ValueError(f"Unknown stream_center {self.stream_center!r}: choose one of {', '.join(CENTERS)}.")
        if not self.stream_earlier_ratio > 0:
            raise ValueError(
                f"stream_earlier_ratio must be positive, got {self.stream_earlier_ratio}: to mix in no earlier "
                "facts, set stream_preserve_earlier false."
            )

    @property
    def track(self) -> str:
        return "replay (LocFT-BF breadth-first)" if self.stream_replay else "strict (each batch trained once)"


@dataclass
class StreamOutcome:
    record: ResultsRecord  # results.json: every edit so far, scored at the end
    stream: dict  # stream.json: the per-batch record
    edit_model: EditModel  # the cumulative edit against θ0 (revert gives θ0)


@dataclass(frozen=True)
class Fact:
    """One fact of the stream, in arrival order: its id, prompt (subject written in) and new object."""

    uuid: str
    subject: str
    text: str
    object: str


@dataclass
class _Batch:
    index: int
    facts: list[Fact] = field(default_factory=list)


def stream_key(job: JobConfig, args: EditConfig, options: StreamOptions) -> dict[str, Any]:
    """What decides a stream's result besides its facts: a resume or an extension must give the same."""
    key = {name: getattr(job, name) for name in JOB_KEYS}
    key.update({name: getattr(args, name, None) for name in TRAINING_KEYS}, **constraint_record(vars(args)))
    key.update(  # the names stream.json has always held
        batch_size=options.batch_size,
        center=options.stream_center,
        preserve_earlier=options.stream_preserve_earlier,
        earlier_ratio=options.stream_earlier_ratio,
        replay=options.stream_replay,
    )
    if options.stream_earlier_keys:  # named only when on: a stream started before the option resumes as it was
        key["earlier_keys"] = True
    if job.fallback_keep not in (None, FALLBACK_KEEP):  # likewise, named only when it changes the edit
        key["fallback_keep"] = job.fallback_keep
    if args.target_suffix is not None:
        key["target_suffix"] = args.target_suffix
    return json.loads(json.dumps(key, default=str))  # as stream.json holds it


def stream_facts(splits: Mapping[str, datasets.Dataset]) -> list[Fact]:
    """The facts in arrival order: the order of their first test phrasing (a facts file's record order; a
    benchmark's seeded order)."""
    facts: dict[str, Fact] = {}
    for row in splits[MODIFIED_TEST]:
        facts.setdefault(row["uuid"], Fact(row["uuid"], row["subject"], row["text"], row["object"]))
    return list(facts.values())


def check_continues(done: Sequence[Mapping], facts: Sequence[Fact], where: str) -> None:
    """Refuse facts that do not continue the stream: the facts already edited must come first, in their order, with
    their objects; no later fact may edit one of them again with another object."""
    edited = {fact["text"]: fact for fact in done}
    for position, fact in enumerate(facts):
        earlier = edited.get(fact.text)
        if earlier is not None and earlier["object"] != fact.object:
            raise ValueError(
                f"The fact {fact.text!r} was already edited to {earlier['object']!r} (batch "
                f"{earlier['batch']}) in {where}: a stream cannot edit it again with {fact.object!r}; "
                "remove it, or start a new stream in another --output_dir."
            )
        if position < len(done) and (fact.uuid, fact.text) != (done[position]["uuid"], done[position]["text"]):
            raise ValueError(
                f"The facts do not start with the {len(done)} facts {where} already edited, in their order "
                f"(fact {position + 1} is {fact.text!r}, it was {done[position]['text']!r}): put them first, "
                "or start a new stream in another --output_dir."
            )
    if len(facts) < len(done):
        raise ValueError(
            f"{where} already edited {len(done)} facts and these are only {len(facts)}: give the facts "
            "it was started with (more may follow), or start a new stream in another --output_dir."
        )


def _refuse_other_args(previous: Mapping, key: Mapping, where: str) -> None:
    changed = sorted(name for name in set(previous) | set(key) if previous.get(name) != key.get(name))
    if changed:
        shown = ", ".join(f"{name} ({previous.get(name)!r} there, {key.get(name)!r} now)" for name in changed[:3])
        raise ValueError(
            f"{where} was started with other options: {shown}. Resume or extend it with the options it "
            "was started with, or start a new stream in another --output_dir."
        )


def _rows(split: datasets.Dataset, uuids: set[str]) -> datasets.Dataset:
    return split.select([i for i, uuid in enumerate(split["uuid"]) if uuid in uuids])


def with_earlier(
    groups: datasets.Dataset, earlier: datasets.Dataset, ratio: float, weight: float, seed: int
) -> datasets.Dataset:
    """Each group of a preservation mix with `round(ratio × its edit rows)` earlier facts added, drawn in a seeded
    order that goes round all of them before repeating one: rows trained by cross-entropy on their new object, with
    the preservation weight (not KL rows, whose reference is the trainer's centre)."""
    order = list(range(len(earlier)))
    random.Random(seed).shuffle(order)
    rows, at, out = list(earlier), 0, []
    for group in groups:
        count = min(round(ratio * (len(group[PRESERVE_KEY]) - sum(group[PRESERVE_KEY]))), len(rows))
        drawn = [rows[order[(at + i) % len(order)]] for i in range(count)]
        at += count
        out.append(
            {
                "text": group["text"] + [row["text"] for row in drawn],
                "object": group["object"] + [row["object"] for row in drawn],
                WEIGHT_KEY: group[WEIGHT_KEY] + [float(weight)] * count,
                PRESERVE_KEY: group[PRESERVE_KEY] + [False] * count,
            }
        )
    return datasets.Dataset.from_list(out)


class EditStream:
    """One stream in one run folder: its context at θ0, the cumulative `EditModel`, and its record."""

    def __init__(self, context: Theta0Context, options: StreamOptions, key: dict, record: dict | None):
        self.context, self.options, self.key = context, options, key
        self.args, self.folder = context.args, context.args.output_dir
        self.facts = stream_facts(context.splits)
        where = f"The stream in {self.folder}"
        done = [fact for batch in (record or {}).get("batches", []) for fact in batch["facts"]]
        check_continues(done, self.facts, where)
        objective = context.objective
        # What the context finds lazily is found now, at θ0, before the stream's state is loaded into the model.
        context.drift_samples()
        self.known = context.known() if objective == "answers" else None
        self.risk = context.risk(objective)
        self.edit_model = get_edit_model(context.model, self.args.block_selector_config())
        theta0 = {name: tensor_sha256(value) for name, value in self.edit_model.theta0.items()}
        self.record = record or {"key": key, "theta0": theta0, "track": options.track, "batches": []}
        if self.record["theta0"] != theta0:
            raise ValueError(
                f"{where} was made from another base model (θ0 of its edited tensors differs): give the "
                "model it was started with, or start a new stream in another --output_dir."
            )
        if self.record["batches"]:
            state = os.path.join(self.folder, self.record["state"])
            write_values(self.edit_model.trainable_parameters(), load_tensors(state))
        with self.edit_model.at_theta0():  # θ0's answers on the unmodified facts, that retention is judged against
            self.before = (
                evaluate_facts(context.model, context.tokenizer, self._unmodified(), batch_size=context.batch_size)
                if len(self._unmodified())
                else None
            )
        self._keys = None  # the preserved keys at θ0, shared by the batches of a θ0-centred stream

    def _unmodified(self) -> datasets.Dataset:
        return self.context.splits[UNMODIFIED_TEST]

    def pending(self) -> list[_Batch]:
        """The batches still to train: the facts after the last finished batch, in batches of `batch_size`."""
        first = sum(len(batch["facts"]) for batch in self.record["batches"])
        start = len(self.record["batches"])
        rest = self.facts[first:]
        size = self.options.batch_size
        return [_Batch(start + n, rest[i : i + size]) for n, i in enumerate(range(0, len(rest), size))]

    def done_uuids(self) -> set[str]:
        return {fact["uuid"] for batch in self.record["batches"] for fact in batch["facts"]}

    def train_batch(self, batch: _Batch) -> None:
        """Train one batch from the current state, score it, and commit its state and record."""
        start = time.perf_counter()
        context, args, options = self.context, self.args, self.options
        earlier = self.done_uuids()
        now = {fact.uuid for fact in batch.facts}
        trained = now | earlier if options.stream_replay else now
        train = context.splits[MODIFIED_TRAIN]
        index = [i for i, uuid in enumerate(train["uuid"]) if uuid in trained]
        splits = datasets.DatasetDict({**context.splits, MODIFIED_TRAIN: train.select(index)})
        risk = self.risk and NeighbourRisk(self.risk.by_token, tuple(self.risk.column[i] for i in index))
        data_args = dataclasses.replace(args, seed=args.seed + batch.index)  # each batch its own draw of neighbours
        dataset, train_args = edit_train_dataset(splits, context.objective, data_args, self.known, risk)
        if options.stream_preserve_earlier and not options.stream_replay and earlier:
            kept = _rows(train, earlier)
            if context.objective == "none":
                dataset = preservation_batches(
                    splits[MODIFIED_TRAIN],
                    kept,
                    args.per_device_train_batch_size,
                    options.stream_earlier_ratio,
                    args.preserve_weight,
                    args.num_train_epochs,
                    data_args.seed,
                    same_relation=False,
                ).map(lambda group: {PRESERVE_KEY: [False] * len(group[PRESERVE_KEY])})  # edits, not preservation
                train_args = dataclasses.replace(args, per_device_train_batch_size=1, num_train_epochs=1.0)
            else:
                dataset = with_earlier(
                    dataset, kept, options.stream_earlier_ratio, args.preserve_weight, data_args.seed
                )
        train_args = dataclasses.replace(train_args, seed=args.seed, eval_strategy="no", save_strategy="no")
        edit_keys = None
        if options.stream_earlier_keys and earlier:  # as trained: the training phrasings with the new objects
            collator = FactCollator(  # the sequences as they were trained
                context.tokenizer,
                model_kind(context.model),
                append_eos=args.eos_target,
                target_suffix=args.target_suffix or "",
            )
            edit_keys = [collator.encode(row)["input_ids"] for row in _rows(train, earlier)]
        edit_model = (
            self.edit_model
            if options.stream_center == "theta0"
            else EditModel(context.model, self.edit_model.selector_config)
        )
        trainer = ConstrainedEditTrainer(
            edit_model,
            train_args,
            train_dataset=dataset,
            processing_class=context.tokenizer,
            fisher_dataset=context.splits[UNMODIFIED_TRAIN],
            preserve_texts=context.preservation_texts(),
            keys=self._keys,
            edit_keys=edit_keys,
        )
        trainer.train()
        if options.stream_center == "theta0":
            self._keys = trainer.keys
        figures = self.figures(now, earlier)
        figures.update(
            distance_to_theta0=self.distance(),
            step_distance=trainer.projector.distance(),
            train_loss=trainer.state.log_history[-1].get("train_loss"),
            seconds=round(time.perf_counter() - start, 2),
        )
        self.commit(batch, figures)

    def figures(self, now: set[str], earlier: set[str]) -> dict[str, Any]:
        """Right after a batch: the efficacy of this batch's facts and of the earlier ones, teacher-forced and (causal
        LMs, `generation_eval`) by greedy generation under both stop rules, and the retention of the unmodified facts
        θ0 knew (teacher-forced)."""
        model, tokenizer, batch_size = self.context.model, self.context.tokenizer, self.context.batch_size
        test = self.context.splits[MODIFIED_TEST]
        generate = self.args.generation_eval and model_kind(model).generates
        out: dict[str, Any] = {"earlier_efficacy": None}
        if generate:
            out.update(gen_earlier_efficacy=None, gen_earlier_efficacy_comma=None)
        for name, uuids in (("efficacy", now), ("earlier_efficacy", earlier)):
            if uuids:
                split = _rows(test, uuids)
                out[name] = _share(
                    per_fact(evaluate_facts(model, tokenizer, split, batch_size=batch_size), fact_rows(split)).correct
                )
                if generate:
                    answers = generate_answers(model, tokenizer, split, batch_size=batch_size)
                    out[f"gen_{name}"] = _share(generated_correct(split, answers))
                    out[f"gen_{name}_comma"] = _share(generated_correct(split, answers, comma=True))
        out["retention"], out["n_known"] = self.retention()
        return out

    def retention(self) -> tuple[float | None, int]:
        """The share of the unmodified facts θ0 knew that the model still knows (teacher-forced, per fact), and how
        many θ0 knew."""
        split = self._unmodified()
        if not len(split):
            return None, 0
        facts = fact_rows(split)
        after = per_fact(
            evaluate_facts(self.context.model, self.context.tokenizer, split, batch_size=self.context.batch_size),
            facts,
        ).correct
        kept = [now for before, now in zip(per_fact(self.before, facts).correct, after) if before]
        return _share(kept), len(kept)

    def distance(self) -> float:
        """max |θ − θ0| over the edited tensors: the L∞ distance of the cumulative edit."""
        params = self.edit_model.trainable_parameters()
        return max(
            (
                float((params[name].detach() - value.to(params[name].device)).abs().max())
                for name, value in self.edit_model.theta0.items()
            ),
            default=0.0,
        )

    def commit(self, batch: _Batch, figures: dict) -> None:
        """The batch's state, then its record (the commit point), then the older state removed."""
        state = os.path.join(STATE_FOLDER, f"state-{batch.index + 1}.safetensors")
        os.makedirs(os.path.join(self.folder, STATE_FOLDER), exist_ok=True)
        save_tensors(self.edit_model.trainable_parameters(), os.path.join(self.folder, state))
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        facts = [{**dataclasses.asdict(fact), "batch": batch.index + 1} for fact in batch.facts]
        self.record["batches"].append({"batch": batch.index + 1, "finished": when, "facts": facts, **figures})
        self.record.update(state=state, finished=False)
        self.save()
        for name in os.listdir(os.path.join(self.folder, STATE_FOLDER)):
            if os.path.join(STATE_FOLDER, name) != state:
                os.unlink(os.path.join(self.folder, STATE_FOLDER, name))

    def save(self) -> None:
        atomic_write_text(os.path.join(self.folder, STREAM_RECORD), json.dumps(self.record, indent=2) + "\n")

    def finish(self, start: float) -> ResultsRecord:
        """Every edit so far scored (`score`), the run's outputs written and sealed, the curve drawn."""
        metrics, examples, lost, results, generated = self.score()
        context, args, job = self.context, self.args, self.context.job
        facts = isinstance(context.source, FactsFile)
        config = {
            **run_config(context),
            "stream": {
                name: self.key.get(name, False)
                for name in ("batch_size", "center", "preserve_earlier", "earlier_ratio", "replay", "earlier_keys")
            },
        }
        config["m"] = len(examples)
        record = ResultsRecord(
            metrics=metrics,
            config=config,
            seed=args.seed,
            model=job.model_name_or_path,
            benchmark=context.source.describe()
            if facts
            else {"name": job.benchmark, "m": job.m, "seed": job.benchmark_seed, **(job.benchmark_options or {})},
            scoring=facts_scoring(metrics) if facts else generation_scoring(metrics),
            facts=examples,
            locality=context.locality.to_dict(),
            lost=lost,
            seconds=round(time.perf_counter() - start, 2),
        )
        begin_outputs(self.folder)
        with atomic_directory(os.path.join(self.folder, "edit")) as staging:
            self.edit_model.save_pretrained(staging)
        record.save(self.folder)
        seal_run(self.folder)
        self.record.update(finished=True, final={k: v for k, v in metrics.items() if not isinstance(v, (dict, list))})
        for stale in ("gen_final_by_batch", "gen_final_by_batch_comma"):  # an extension may score without generation
            self.record.pop(stale, None)
        self.record.update(self.final_by_batch(results, generated))
        self.save()
        draw_curve(self.record, os.path.join(self.folder, STREAM_PLOT))
        return record

    def final_by_batch(self, results: FactResults, generated: Sequence[str] | None) -> dict[str, list[float | None]]:
        """Each batch's efficacy now, beside its efficacy right after it (what the stream kept), from the end's
        scores of every edit's test phrasings (`score`): teacher-forced (`final_by_batch`) and, given the answers, by
        generation under both stop rules (`gen_final_by_batch`, `gen_final_by_batch_comma`)."""
        test = _rows(self.context.splits[MODIFIED_TEST], self.done_uuids())
        out: dict[str, list[float | None]] = {"final_by_batch": []}
        if generated is not None:
            out.update(gen_final_by_batch=[], gen_final_by_batch_comma=[])
        for batch in self.record["batches"]:
            uuids = {fact["uuid"] for fact in batch["facts"]}
            index = [i for i, uuid in enumerate(test["uuid"]) if uuid in uuids]
            split = test.select(index)
            rows = FactResults([results.correct[i] for i in index], [results.predicted[i] for i in index])
            out["final_by_batch"].append(_share(per_fact(rows, fact_rows(split)).correct))
            if generated is not None:
                answers = [generated[i] for i in index]
                out["gen_final_by_batch"].append(_share(generated_correct(split, answers)))
                out["gen_final_by_batch_comma"].append(_share(generated_correct(split, answers, comma=True)))
        return out

    def score(self) -> tuple[dict, list[dict], list[dict], FactResults, list[str] | None]:
        """Every edit made so far, teacher-forced and (causal LMs, `generation_eval`) by greedy generation with the
        stop rule; the unmodified facts disjoint from all preservation data; drift against θ0. Returns the metrics,
        the edited facts, the facts lost, and the results and answers (None without generation) of the edits' test
        phrasings."""
        context, model, tokenizer = self.context, self.context.model, self.context.tokenizer
        done = self.done_uuids()
        splits = {name: _rows(context.splits[name], done) for name in (MODIFIED_TRAIN, MODIFIED_TEST)}
        splits.update(
            {name: context.splits[name] for name in (UNMODIFIED_TEST, CONSISTENCY) if name in context.splits}
        )
        splits = datasets.DatasetDict(splits)
        kind = model_kind(model)
        generate = self.args.generation_eval and kind.generates
        with self.edit_model.at_theta0():
            before = theta0_results(model, tokenizer, splits, context.batch_size)
            generated_before = generate_splits(model, tokenizer, splits, context.batch_size) if generate else None
        after = evaluate_splits(model, tokenizer, splits, batch_size=context.batch_size)
        metrics = edit_metrics(splits, after, before, tokenizer, kind)
        metrics.update(preference_metrics(model, tokenizer, splits, context.batch_size))
        generated = None
        if generate:
            generated = generate_splits(model, tokenizer, splits, context.batch_size)
            metrics.update(generation_metrics(splits, generated, generated_before))
        if isinstance(context.source, FactsFile):
            extra = {
                name: _rows(context.splits[name], done)
                for name in (MODIFIED_PARAPHRASE, QUESTIONS)
                if name in context.splits
            }
            answers = facts_answers(model, tokenizer, extra, context.batch_size) if generate else None
            metrics.update(facts_metrics(model, tokenizer, extra, context.batch_size, answers))
        held_out = context.drift_samples()
        if held_out is not None:
            metrics.update(next_token_drift(model, tokenizer, held_out, self.edit_model.at_theta0))
        batch_of = {fact["uuid"]: batch["batch"] for batch in self.record["batches"] for fact in batch["facts"]}
        examples = [
            {"batch": batch_of[example["uuid"]], **example}
            for example in fact_examples(
                splits[MODIFIED_TEST], after[MODIFIED_TEST], tokenizer, generated_before, generated
            )
        ]
        lost = lost_facts(splits, after, before, tokenizer, kind)
        return metrics, examples, lost, after[MODIFIED_TEST], generated.get(MODIFIED_TEST) if generated else None


def theta0_results(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, splits: Mapping[str, datasets.Dataset], batch_size: int
) -> dict[str, FactResults]:
    """θ0's results (`evaluate_splits(original=True)`), where a facts file may not give a fact's true object: such a
    fact is scored as not known before the edit."""
    results = {}
    for name, split in splits.items():
        if name not in (MODIFIED_TRAIN, MODIFIED_TEST):
            results.update(
                evaluate_splits(model, tokenizer, {name: split}, batch_size=batch_size) if len(split) else {}
            )
            continue
        known = [i for i, answer in enumerate(split["original_object"]) if answer]
        scored = (
            evaluate_facts(model, tokenizer, split.select(known), batch_size=batch_size, object_key="original_object")
            if known
            else FactResults([], [])
        )
        correct, predicted = [False] * len(split), [[] for _ in range(len(split))]
        for j, i in enumerate(known):
            correct[i], predicted[i] = scored.correct[j], scored.predicted[j]
        results[name] = FactResults(correct, predicted)
    return results


def _share(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def draw_curve(record: Mapping, path: str) -> None:
    """The per-batch curve: each batch's efficacy right after it, the earlier batches' efficacy, the retention, and
    (once the stream is scored) each batch's efficacy at the end; teacher-forced, and beside it by greedy generation
    stopped at EOS, newline, '.' or ',' where the stream generated; written atomically."""
    plt = plotting()
    batches = record["batches"]
    x = [batch["batch"] for batch in batches]
    panels = [("", "teacher-forced")]
    if any(batch.get("gen_efficacy_comma") is not None for batch in batches):
        panels.append(("gen_", "greedy generation, stop at EOS, newline, '.' or ','"))
    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False)
    for axis, (prefix, scored) in zip(axes[0], panels):
        suffix = "_comma" if prefix else ""
        for key, label in (
            ("efficacy", "this batch, right after it"),
            ("earlier_efficacy", "earlier batches, after it"),
        ):
            points = [
                (n, b[f"{prefix}{key}{suffix}"])
                for n, b in zip(x, batches)
                if b.get(f"{prefix}{key}{suffix}") is not None
            ]
            if points:
                axis.plot(*zip(*points), marker="o", label=label)
        points = [(n, batch["retention"]) for n, batch in zip(x, batches) if batch.get("retention") is not None]
        if points:
            axis.plot(*zip(*points), marker="o", label="retention (unmodified facts, teacher-forced)")
        final = record.get(f"{prefix}final_by_batch{suffix}")
        if final and len(final) == len(x):
            axis.plot(x, final, marker="x", linestyle="--", label="each batch at the end")
        axis.set(xlabel="batch", ylabel="share", ylim=(-0.02, 1.02), title=f"{record['track']}: {scored}")
        axis.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    staging = f"{path}.partial.png"
    figure.savefig(staging, dpi=100)
    plt.close(figure)
    os.replace(staging, path)


def read_stream(folder: str) -> dict | None:
    """The stream record of `folder`, None where it holds no stream."""
    path = os.path.join(folder, STREAM_RECORD)
    if not os.path.isfile(path):
        return None
    record = read_json(path, f"{path} cannot be read.")
    if not isinstance(record, dict) or "key" not in record or "batches" not in record:
        raise ValueError(f"{path} is not an hf_memedit stream record: move it away, or choose another --output_dir.")
    return record


def run_stream(
    job: JobConfig,
    args: EditConfig,
    options: StreamOptions,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    facts: FactsSource | None = None,
) -> StreamOutcome:
    """Run (or resume, or extend) the stream of `job`'s facts in `args.output_dir`: every pending batch trained and
    committed in turn, then every edit so far scored and the run folder sealed."""
    if job.setting not in ("ftm", "fta"):
        raise ValueError(
            f"setting {job.setting!r}: a stream edits the model as loaded, batch after batch; use setting "
            "ftm (or fta)."
        )
    refuse_pick_on_test(args)
    if options.stream_earlier_keys:
        missing = [
            need
            for need, met in (
                (f"stream_center previous (not {options.stream_center})", options.stream_center == "previous"),
                (f"key_constraint nullspace (not {args.key_constraint})", args.key_constraint == "nullspace"),
                ("the strict track (stream_replay false)", not options.stream_replay),
            )
            if not met
        ]
        if missing:
            raise ValueError(
                "stream_earlier_keys adds the earlier edits' keys to the null space of each batch's step: it needs "
                f"{' and '.join(missing)}."
            )
    source = facts or job_facts(job, args)
    if isinstance(source, FactsFile):  # a bad facts file is refused before the folder is touched
        source.check(
            tokenizer if tokenizer is not None else load_tokenizer(job),
            model.config if model is not None else load_config(job)[0],
        )
    key = stream_key(job, args, options)
    folder = os.path.abspath(args.output_dir)
    record = read_stream(folder) if os.path.isdir(folder) else None
    if record is not None:
        _refuse_other_args(record["key"], key, f"The stream in {folder}")
    with claim_run_folder(folder, args.overwrite_output_dir and record is None, resuming=record is not None):
        start = time.perf_counter()
        context = Theta0Context(job, args, model, tokenizer, source)
        stream = EditStream(context, options, key, record)
        for batch in stream.pending():
            stream.train_batch(batch)
        result = stream.finish(start)
        return StreamOutcome(result, stream.record, stream.edit_model)


def edit_stream(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: str | os.PathLike | Sequence[Mapping],
    batch_size: int,
    output_dir: str,
    **options: Any,
) -> StreamOutcome:
    """Edit `facts` (a facts file, dataset folder, Hub dataset id or records, `hf_memedit.facts`) into `model` as a
    stream of batches of `batch_size`, in their order, as `memedit stream --facts` does; `output_dir` holds the stream
    (run it again to resume it, or with more facts to extend it).

    `options` are the stream's (`stream_center`, `stream_preserve_earlier`, `stream_earlier_ratio`, `stream_replay`)
    and fields of `EditConfig` or `JobConfig` over `FACTS_RECIPE`, as for `edit_facts`.
    """
    own = [f.name for f in fields(StreamOptions) if f.name != "batch_size"]
    stream = StreamOptions(batch_size, **{name: options.pop(name) for name in own if name in options})
    job, edit_options, source = facts_job(model, facts, options, "edit_stream", tuple(own))
    args = EditConfig(output_dir=output_dir, **edit_options)
    return run_stream(job, args, stream, model, tokenizer, source)
