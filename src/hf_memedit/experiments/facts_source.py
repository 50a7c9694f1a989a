"""A user's facts file as a job's `FactsSource`: the benchmark splits the one pipeline trains and scores on, made
from the facts (`hf_memedit.facts`) and from θ0 itself.

What a benchmark provided, a facts file gives or θ0 finds:
- the modified facts: each record's prompt (modified_train, modified_test), its paraphrases held out for scoring
  generalisation (modified_paraphrase) or trained on (`train_on_paraphrases`);
- what to keep: the records' keep prompts (CounterFact's neighbourhood, zsRE's loc, flat `keep`), each labelled with
  θ0's own greedy answer (`STOP_RULE`), as the unmodified facts: the preservation objective (KL, answers) trains on
  a `preserve_fraction` of them and locality is scored on the others (`preservation.disjoint_split`). A record with
  no keep prompt gets up to `FALLBACK_KEEP` of its own form with other subjects of the file (`with_fallback_keep`);
- the facts' questions asked through the chat template (`QUESTIONS`), where a record has one and the tokenizer a
  template.
The preserved keys come from the model's own samples, as for a benchmark (`preserve_corpus: samples`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import datasets
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..architectures import model_kind
from ..benchmarks.common import FEATURES, MODIFIED_TEST, MODIFIED_TRAIN, UNMODIFIED_TEST, UNMODIFIED_TRAIN
from ..collators import PLACEHOLDER, FactEncoder, filter_encodable
from ..evaluation.scoring import (
    answer_contains,
    answer_matches,
    evaluate_facts,
    generate_answers,
    generation_scoring,
)
from ..facts import (
    FALLBACK_KEEP,
    KEEP,
    MODIFIED_PARAPHRASE,
    SUBJECT,
    FactRecord,
    FactsFileError,
    KeepPrompt,
    check_lengths,
    fact_rows,
    read_facts,
)


logger = logging.getLogger(__name__)

KEEP_ANSWER_TOKENS = 8  # θ0's greedy answer to a keep prompt: at most this many tokens, then the stop rule
QUESTIONS = "questions"  # split: the facts' questions through the chat template, with the new object
QUESTION_TOKENS = 24  # a chat model answers in a sentence: the object's tokens + this many, then the stop rule


def context_length(config: PretrainedConfig) -> int | None:
    """The longest input the model reads (its position table), None when the config does not say."""
    text = config.get_text_config()
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)


def with_fallback_keep(records: Sequence[FactRecord], limit: int = FALLBACK_KEEP) -> tuple[list[FactRecord], int]:
    """The records, each without keep prompts given up to `limit` of its own form with other subjects of the file
    (in file order; never a prompt the edit changes), and how many were made (0: none made)."""
    edited = {(r.prompt, r.subject) for r in records}
    subjects = list(dict.fromkeys(r.subject for r in records))
    out, made = [], 0
    for record in records:
        if record.keep:
            out.append(record)
            continue
        others = [s for s in subjects if s != record.subject and (record.prompt, s) not in edited][:limit]
        out.append(
            dataclasses.replace(record, keep=[KeepPrompt(record.prompt.replace(SUBJECT, s, 1)) for s in others])
        )
        made += len(others)
    return out, made


def checked_facts(
    source, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, limit: int = FALLBACK_KEEP
) -> tuple[list[FactRecord], int]:
    """The records of `source` (a file, dataset folder, Hub id or list of records), each refused with one line when
    bad (`read_facts`, `check_lengths` against the model's context), up to `limit` keep prompts made where a record
    has none, and how many were made. What `--dry_run` checks, before any weight is loaded."""
    records = read_facts(source)
    check_lengths(records, tokenizer, context_length(config))
    records, made = with_fallback_keep(records, limit)
    if not any(record.keep for record in records):
        refuse_no_keep(source, given=0, made=0, lost=0, limit=limit)
    return records, made


def refuse_no_keep(source, given: int, made: int, lost: int, limit: int) -> None:
    """An edit of facts with no keep prompt left would preserve nothing and score no locality: refused, with what
    became of the keep prompts and the fix."""
    name = source if isinstance(source, str) else "the records given"
    fix = "add `keep` prompts (prompts whose answers must not change) to the records"
    if limit == 0:
        fix += ", or let fallback_keep make some (it is 0)"
    raise FactsFileError(
        f"{name}: no keep prompt is left to preserve and to score locality on (the records give {given}, "
        f"fallback_keep {limit} made {made}, {lost} left out: phrasings the edit changes, not encodable, or "
        f"answered with nothing by θ0): {fix}."
    )


def _prefix(text: str) -> str:
    return " ".join(text.split(PLACEHOLDER, 1)[0].split())


def _split(rows: Sequence[Mapping]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({name: [row[name] for row in rows] for name in FEATURES}, features=FEATURES)


def theta0_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[Mapping], batch_size: int
) -> list[str]:
    """θ0's own greedy answer to each row's prompt: at most `KEEP_ANSWER_TOKENS` tokens, cut by the stop rule."""
    return generate_answers(
        model,
        tokenizer,
        [{**row, "object": ""} for row in rows],
        batch_size=batch_size,
        extra_tokens=KEEP_ANSWER_TOKENS,
    )


def keep_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[Mapping], batch_size: int
) -> list[dict]:
    """The keep rows labelled with θ0's own answer (`object`; the file's answer, if any, stays in `original_object`),
    those without one dropped. A causal LM's answer is its greedy continuation under `STOP_RULE`; a masked LM cannot
    generate one, so the file's answer is used where it gives one."""
    if not rows:
        return []
    if model_kind(model).generates:
        answers = theta0_answers(model, tokenizer, rows, batch_size)
    else:
        answers = [row["original_object"] for row in rows]
    kept = [{**row, "object": answer} for row, answer in zip(rows, answers) if answer]
    if len(kept) < len(rows):
        why = (
            "θ0 answers nothing before the stop rule"
            if model_kind(model).generates
            else "a masked LM's own answer needs the file to give it"
        )
        logger.warning("%d of %d keep prompts are not used (%s).", len(rows) - len(kept), len(rows), why)
    return kept


def question_rows(records: Sequence[FactRecord], tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """The records' questions as the chat template asks them, the new object as the assistant's answer; none
    where the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    rows = []
    for record in records:
        if record.question:
            asked = tokenizer.apply_chat_template(
                [{"role": "user", "content": record.question}], tokenize=False, add_generation_prompt=True
            )
            rows.append(
                {
                    "uuid": record.id,
                    "relation": record.relation,
                    "subject": record.subject,
                    "text": asked + PLACEHOLDER,
                    "object": record.target,
                    "original_object": record.true or "",
                }
            )
    return rows


@dataclass
class FactsFile:
    """A facts source (`FactsSource`) of a file, dataset folder, Hub dataset id or list of records."""

    source: str | Sequence[Mapping]
    train_on_paraphrases: bool = False
    batch_size: int = 64
    fallback_keep: int | None = None  # keep prompts made per record giving none (None: FALLBACK_KEEP; 0: none)
    records: list[FactRecord] = field(default_factory=list, init=False)  # as edited (fallback keep prompts in)
    n_fallback_keep: int = field(default=0, init=False)

    @property
    def limit(self) -> int:
        """How many keep prompts are made per record that gives none (`with_fallback_keep`)."""
        return FALLBACK_KEEP if self.fallback_keep is None else self.fallback_keep

    def check(self, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> None:
        """Read and check the records (`checked_facts`): a bad one is refused in one line."""
        self.records, self.n_fallback_keep = checked_facts(self.source, tokenizer, config, self.limit)

    def splits(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> datasets.DatasetDict:
        """The benchmark's splits (`benchmarks.SPLITS`) of the facts, plus modified_paraphrase and `QUESTIONS`: the
        keep prompts, with θ0's answers, are the unmodified facts (training evidence and test phrasing both, so the
        locality split sets each on one side by its prompt)."""
        self.check(tokenizer, model.config)
        if self.n_fallback_keep:
            logger.info(
                "%d keep prompts made from other subjects of the file, for the facts that give none.",
                self.n_fallback_keep,
            )
        rows = self._with_theta0_answers(fact_rows(self.records, self.train_on_paraphrases), model, tokenizer)
        encoder = FactEncoder(tokenizer, model_kind(model))
        self._refuse_unencodable(rows[MODIFIED_TEST], encoder)  # a fact's prompt; a paraphrase it cannot is dropped
        edited = {_prefix(row["text"]) for split in (MODIFIED_TRAIN, MODIFIED_PARAPHRASE) for row in rows[split]}
        keep = [{**row, "subject": row["text"]} for row in rows[KEEP] if _prefix(row["text"]) not in edited]
        if len(keep) < len(rows[KEEP]):
            logger.warning("%d keep prompts are phrasings the edit changes, so not kept.", len(rows[KEEP]) - len(keep))
        keep, _ = filter_encodable(keep_answers(model, tokenizer, keep, self.batch_size), encoder)
        if not keep:
            total = len(rows[KEEP])
            refuse_no_keep(self.source, total - self.n_fallback_keep, self.n_fallback_keep, total, self.limit)
        trained, _ = filter_encodable(rows[MODIFIED_TRAIN], encoder)
        paraphrases, _ = filter_encodable(rows[MODIFIED_PARAPHRASE], encoder)
        questions, _ = filter_encodable(question_rows(self.records, tokenizer), encoder)
        return datasets.DatasetDict(
            {
                MODIFIED_TRAIN: _split(trained),
                MODIFIED_TEST: _split(rows[MODIFIED_TEST]),
                UNMODIFIED_TRAIN: _split(keep),
                UNMODIFIED_TEST: _split(keep),
                MODIFIED_PARAPHRASE: _split(paraphrases),
                QUESTIONS: _split(questions),
            }
        )

    def _with_theta0_answers(
        self, rows: dict[str, list[dict]], model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> dict[str, list[dict]]:
        """A record without `true` gets θ0's own greedy answer to its prompt as its old object (what the edit
        changes, scored before the edit); a masked LM cannot answer for itself, nor can θ0 when it says nothing."""
        missing = [row for row in rows[MODIFIED_TEST] if not row["original_object"]]
        if not missing:
            return rows
        where = {record.id: record.location or record.id for record in self.records}
        if not model_kind(model).generates:
            raise FactsFileError(
                f"{where[missing[0]['uuid']]}: the record gives no `true` object, and a masked LM cannot answer "
                "its prompt for itself: add `true` (the object the model holds now)."
            )
        answers = theta0_answers(model, tokenizer, missing, self.batch_size)
        found = {row["uuid"]: answer for row, answer in zip(missing, answers)}
        silent = [uuid for uuid, answer in found.items() if not answer]
        if silent:
            raise FactsFileError(
                f"{where[silent[0]]}: the record gives no `true` object, and the model answers its prompt with "
                "nothing before the stop rule: add `true` (the object the model holds now)."
            )
        logger.info("%d records without `true`: their old object is θ0's own greedy answer.", len(found))
        return {
            split: [
                {**row, "original_object": found[row["uuid"]]}
                if not row["original_object"] and row["uuid"] in found
                else row
                for row in split_rows
            ]
            for split, split_rows in rows.items()
        }

    def _refuse_unencodable(self, rows: Sequence[Mapping], encoder: FactEncoder) -> None:
        where = {record.id: record.location or record.id for record in self.records}
        for row in rows:
            problem = encoder.problem(row["text"], row["object"])
            if problem:
                raise FactsFileError(
                    f"{where[row['uuid']]}: this model cannot be trained on it ({problem}): rephrase "
                    "the prompt or the target."
                )

    def describe(self) -> dict:
        """What results.json records of the facts (its `benchmark` entry)."""
        return {
            "name": "facts",
            "source": self.source if isinstance(self.source, str) else "the records given",
            "m": len(self.records),
            "train_on_paraphrases": self.train_on_paraphrases,
            "fallback_keep": self.limit,
            "fallback_keep_prompts": self.n_fallback_keep,
        }


def facts_scoring(metrics: Mapping) -> dict[str, str]:
    """How each figure of a facts run was scored (results.md's "How it was scored", and the screen's)."""
    notes = {
        "efficacy (A_M)": "each fact's prompt, teacher-forced: every token of the new object the argmax",
        "neighbourhood kept (retention, agreement)": "the keep prompts, labelled with θ0's greedy answer (at most "
        f"{KEEP_ANSWER_TOKENS} tokens, then the stop rule); a share of them trains the preservation term and "
        "the others are scored (see Locality). Teacher-forced: of those whose answer θ0 predicts token by token "
        "(A_F\\S before; a greedy answer can tokenize otherwise when written in), the share still predicting it "
        "(retention); agreement, the share whose predicted tokens did not change. By generation: of those θ0 answers "
        "so again under the scoring's budget (an answer cut by the token limit, not the stop rule, runs on), the "
        "share still answered so (gen_retention)",
    }
    if "paraphrase_a_m" in metrics:
        notes["generalisation"] = "the paraphrases the edit never trained on, each scored on its own, teacher-forced"
    if "question_a_m" in metrics:
        notes["questions"] = (
            "each fact's question through the tokenizer's chat template, the new object as the "
            "assistant's answer; by generation: the greedy answer (at most the object's tokens + "
            f"{QUESTION_TOKENS}, cut as below) holds the new object as whole words"
        )
    notes.update(generation_scoring(metrics))
    if "perplexity_ratio" in metrics:
        notes["drift"] = "θ0's own held-out samples (seed + 1), next-token KL(θ0 ‖ θ) per token and ppl(θ) / ppl(θ0)"
    return notes


def facts_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, splits: Mapping[str, datasets.Dataset], batch_size: int
) -> dict[str, list[str]]:
    """The model's greedy answers to the paraphrases and the questions (causal LMs)."""
    if not model_kind(model).generates:
        return {}
    extra = {MODIFIED_PARAPHRASE: 4, QUESTIONS: QUESTION_TOKENS}
    return {
        name: generate_answers(model, tokenizer, splits[name], batch_size=batch_size, extra_tokens=extra[name])
        for name in extra
        if name in splits and len(splits[name])
    }


def facts_metrics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    splits: Mapping[str, datasets.Dataset],
    batch_size: int,
    answers: Mapping[str, Sequence[str]] | None,
) -> dict:
    """Generalisation on the unseen paraphrases and the questions' scores, teacher-forced and, with the greedy
    `answers` (`facts_answers`), by generation: shares of phrasings (`facts_scoring` says how)."""
    metrics: dict = {}
    for name, key, match in (
        (MODIFIED_PARAPHRASE, "paraphrase", answer_matches),
        (QUESTIONS, "question", answer_contains),
    ):
        if name not in splits or not len(splits[name]):
            continue
        metrics[f"{key}_a_m"] = evaluate_facts(model, tokenizer, splits[name], batch_size=batch_size).accuracy
        metrics[f"n_{key}s"] = len(splits[name])
        if answers and name in answers:
            right = [match(answer, row["object"]) for answer, row in zip(answers[name], splits[name])]
            metrics[f"gen_{key}_a_m"] = sum(right) / len(right)
    return metrics
