"""A user's facts file read into one record schema (`FactRecord`, `FACT_FEATURES`) whatever its format, and the
benchmark-style splits the edit pipeline trains and scores on (`facts_splits`, or `load_facts` through a cached
`datasets` builder).

Formats, detected from the fields of the first record (one INFO line names it; every record must be of it):

- **CounterFact** (ROME, MEMIT, AlphaEdit): `requested_rewrite` {`prompt` with `{}` for the subject, `subject`,
  `target_new.str`, `target_true.str`, optional `relation_id`}, `paraphrase_prompts`, `neighborhood_prompts`,
  `generation_prompts`, optional `case_id`.
- **zsRE** (MEND's, as EasyEdit, AlphaEdit and LocFT-BF report on): `src` (a question about `subject`), `alt`
  (the new answer), `answers` (the true ones), `rephrase`, `loc` ("nq question: ...") with its answer `loc_ans`.
- **flat**, for facts written by hand: `prompt`, `subject`, `target`; optional `true`, `paraphrases`, `keep`,
  `question`, `id`, `relation`, `generation_prompts`. `FactRecord.to_dict()` is a flat record.

In a prompt, `{}` (or `[X]`) marks the subject, or the subject is written in; `[Y]` marks where the object goes,
else it follows the prompt. Containers: JSONL (`.jsonl`), JSON (`.json`: a list of records, or an object with one
field holding that list), CSV (`.csv`), a dataset folder or Hub dataset id read by `datasets.load_dataset`, or
records already in memory (a list of dicts). A list field given as text (a CSV cell) is a JSON array when it
starts with `[` and parses as one, else its items separated by `|`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import datasets
from transformers import PreTrainedTokenizerBase

from .benchmarks.common import FEATURES, MODIFIED_TEST, MODIFIED_TRAIN, numbered_jsonl, source_hash
from .collators import PLACEHOLDER
from .files import looks_like_path


logger = logging.getLogger(__name__)

SUBJECT = "{}"  # where the subject goes in a prompt template ("[X]" is read as it too)
FALLBACK_KEEP = 10  # keep prompts made for a record that gives none: its prompt with up to this many other subjects
MODIFIED_PARAPHRASE = "modified_paraphrase"  # the paraphrases the edit does not train on, with the new object
KEEP = "keep"  # prompts whose answers must not change
FACT_SPLITS = (MODIFIED_TRAIN, MODIFIED_TEST, MODIFIED_PARAPHRASE, KEEP)
FILE_TYPES = (".jsonl", ".json", ".csv")

_STRING = datasets.Value("string")
FACT_FEATURES = datasets.Features(
    {
        "id": _STRING,  # the file's (case_id, id), else a hash of prompt, subject and target
        "relation": _STRING,  # the file's (relation_id, relation), else the prompt template
        "subject": _STRING,
        "prompt": _STRING,  # SUBJECT where the subject goes, PLACEHOLDER where the object goes
        "target": _STRING,  # the new object
        "true": _STRING,  # the true object, None when the file does not say
        "paraphrases": datasets.List(_STRING),  # subject written in, PLACEHOLDER where the object goes
        "keep": datasets.List({"prompt": _STRING, "answer": _STRING}),  # answer None: θ0's, found by the pipeline
        "question": _STRING,  # the fact asked as a question (for chat models), None when not given
        "generation_prompts": datasets.List(_STRING),  # plain prompts for free generation
    }
)


class FactsFileError(ValueError):
    """A facts file or record the edit cannot use; the message names the record and the fix."""


@dataclass
class KeepPrompt:
    """A prompt whose answer the edit must not change. `answer` when the file gives it (zsRE's `loc_ans`), else None:
    the model's own answer before the edit, found by the pipeline."""

    prompt: str  # PLACEHOLDER where the answer goes
    answer: str | None = None


@dataclass
class FactRecord:
    """One fact to edit, whatever the format it was read from; `FACT_FEATURES` is its `datasets` schema."""

    id: str
    relation: str
    subject: str
    prompt: str  # "The capital of {} is [Y]."
    target: str
    true: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    keep: list[KeepPrompt] = field(default_factory=list)
    question: str | None = None
    generation_prompts: list[str] = field(default_factory=list)
    location: str = field(default="", compare=False, repr=False)  # "facts.jsonl, line 3": where errors point

    @property
    def text(self) -> str:
        """The prompt with the subject written in: the training text, PLACEHOLDER where the new object goes."""
        return self.prompt.replace(SUBJECT, self.subject, 1)

    def to_dict(self) -> dict:
        """The record as `FACT_FEATURES` holds it; also a flat-format record that reads back as this one."""
        row = dataclasses.asdict(self)
        del row["location"]
        return row


# Reading records ------------------------------------------------------------------------------------------------


def _text(value, name: str, location: str) -> str | None:
    """A text field, stripped; None when absent or blank. Numbers (a year) are text too."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise FactsFileError(f"{location}: {name} must be text, not {type(value).__name__}.")
    return value.strip() or None


def _items(value, name: str, location: str) -> list:
    """A list field: a list, or text (a CSV cell) holding a JSON array or items separated by '|'."""
    if value is None:
        return []
    if isinstance(value, str):
        cell = value.strip()
        if cell.startswith("["):
            try:
                parsed = json.loads(cell)
            except json.JSONDecodeError as error:
                if cell.startswith(('["', "[{")):
                    raise FactsFileError(
                        f"{location}: {name} starts as a JSON array but is not one ({error.msg}): "
                        "fix it, or separate the items with |."
                    ) from None
                parsed = None
            if isinstance(parsed, list):
                return parsed
        return [item for item in cell.split("|") if item.strip()]
    if not isinstance(value, (list, tuple)):
        raise FactsFileError(f"{location}: {name} must be a list, not {type(value).__name__}.")
    return list(value)


def _texts(value, name: str, location: str) -> list[str]:
    texts = (_text(item, f"{name} item {i}", location) for i, item in enumerate(_items(value, name, location), 1))
    return [text for text in texts if text]


def _keep(value, name: str, location: str) -> list[KeepPrompt]:
    """Keep prompts: texts, or {"prompt", "answer"} objects."""
    kept = []
    for i, item in enumerate(_items(value, name, location), 1):
        what = f"{name} item {i}"
        answer = None
        if isinstance(item, Mapping):
            if "prompt" not in item:
                raise FactsFileError(
                    f'{location}: {what} has no prompt: write it as text, or as {{"prompt": ..., "answer": ...}}.'
                )
            answer = _text(item.get("answer"), f"{what} answer", location)
            item = item["prompt"]
        prompt = _text(item, what, location)
        if prompt:
            kept.append(KeepPrompt(_object_slot(prompt, what, location), answer))
    return kept


def _object_slot(text: str, what: str, location: str) -> str:
    """The text with PLACEHOLDER once: where it was written, else at the end."""
    count = text.count(PLACEHOLDER)
    if count > 1:
        raise FactsFileError(f"{location}: {what} {text!r} marks the object {count} times: use {PLACEHOLDER} once.")
    return text if count else f"{text} {PLACEHOLDER}"


def _subject_marks(text: str, what: str, location: str) -> str:
    """The text with "[X]" read as SUBJECT, refused when it marks the subject more than once."""
    text = text.replace("[X]", SUBJECT)
    if text.count(SUBJECT) > 1:
        raise FactsFileError(
            f"{location}: {what} {text!r} marks the subject {text.count(SUBJECT)} times: use {SUBJECT} (or [X]) once."
        )
    return text


def _template(prompt: str, subject: str, what: str, location: str) -> str:
    text = _subject_marks(prompt, what, location)
    if SUBJECT not in text:
        if subject not in text:
            raise FactsFileError(
                f"{location}: the subject {subject!r} is not in its {what} {prompt!r}: write it in "
                f"as it is spelled, or mark its place with {SUBJECT}."
            )
        text = text.replace(subject, SUBJECT, 1)
    return _object_slot(text, what, location)


def _same_answer(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def content_id(prompt: str, subject: str, target: str) -> str:
    """A fact's id when its file gives none: fixed by what it edits, the same on every machine."""
    return hashlib.sha256(json.dumps([prompt, subject, target], ensure_ascii=False).encode()).hexdigest()[:16]


def _record(raw: Mapping, names: Mapping[str, str], location: str, also_true: Sequence[str] = ()) -> FactRecord:
    """A record from the flat-named fields of any format; `names` gives the fields as the format spells them."""

    def name(key: str) -> str:
        return names.get(key, key)

    def text(key: str) -> str | None:
        return _text(raw.get(key), name(key), location)

    subject = text("subject")
    if not subject:
        raise FactsFileError(f"{location}: {name('subject')} is empty: write the subject the fact is about.")
    prompt = text("prompt")
    if not prompt:
        raise FactsFileError(f"{location}: {name('prompt')} is empty: write the prompt the new object completes.")
    template = _template(prompt, subject, name("prompt"), location)
    target = text("target")
    if not target:
        raise FactsFileError(f"{location}: {name('target')} is empty: write the new object there.")
    true = text("true")
    if any(_same_answer(target, answer) for answer in ([true] if true else []) + list(also_true)):
        raise FactsFileError(
            f"{location}: the target {target!r} is the true object already, so there is nothing to "
            f"edit: give another {name('target')}, or remove the record."
        )
    paraphrases = [
        _object_slot(
            _subject_marks(p, f"{name('paraphrases')} item {i}", location).replace(SUBJECT, subject),
            f"{name('paraphrases')} item {i}",
            location,
        )
        for i, p in enumerate(_texts(raw.get("paraphrases"), name("paraphrases"), location), 1)
    ]
    return FactRecord(
        id=text("id") or content_id(template, subject, target),
        relation=text("relation") or template,
        subject=subject,
        prompt=template,
        target=target,
        true=true,
        paraphrases=paraphrases,
        keep=_keep(raw.get("keep"), name("keep"), location),
        question=text("question"),
        generation_prompts=_texts(raw.get("generation_prompts"), name("generation_prompts"), location),
        location=location,
    )


def _mapping(value, name: str, location: str) -> Mapping:
    """An object field: an object, or text (a CSV cell) holding a JSON object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise FactsFileError(f"{location}: {name} is not a JSON object ({error.msg}).") from None
    if not isinstance(value, Mapping):
        raise FactsFileError(f"{location}: {name} must be an object, not {type(value).__name__}.")
    return value


def _counterfact(record: Mapping, location: str) -> FactRecord:
    rewrite = _mapping(record["requested_rewrite"], "requested_rewrite", location)
    missing = [f"requested_rewrite.{key}" for key in ("prompt", "subject", "target_new") if key not in rewrite]
    if missing:
        raise FactsFileError(f"{location}: lacks {', '.join(missing)} (CounterFact format): add them.")

    def string(value):  # {"str": "Rome", "id": "Q220"}, or the text itself
        return value.get("str") if isinstance(value, Mapping) else value

    raw = {
        "id": record.get("case_id"),
        "relation": rewrite.get("relation_id"),
        "subject": rewrite["subject"],
        "prompt": rewrite["prompt"],
        "target": string(rewrite["target_new"]),
        "true": string(rewrite.get("target_true")),
        "paraphrases": record.get("paraphrase_prompts"),
        "keep": record.get("neighborhood_prompts"),
        "generation_prompts": record.get("generation_prompts"),
    }
    names = {
        "id": "case_id",
        "relation": "requested_rewrite.relation_id",
        "subject": "requested_rewrite.subject",
        "prompt": "requested_rewrite.prompt",
        "target": "requested_rewrite.target_new.str",
        "true": "requested_rewrite.target_true.str",
        "paraphrases": "paraphrase_prompts",
        "keep": "neighborhood_prompts",
    }
    return _record(raw, names, location)


def _zsre(record: Mapping, location: str) -> FactRecord:
    answers = _texts(record.get("answers"), "answers", location)
    loc = _text(record.get("loc"), "loc", location)
    raw = {
        "id": record.get("case_id"),
        "relation": record.get("relation"),
        "subject": record["subject"],
        "prompt": record["src"],
        "target": record["alt"],
        "true": answers[0] if answers else None,
        "paraphrases": record.get("rephrase"),
        "question": record["src"],
        "keep": [{"prompt": loc, "answer": record.get("loc_ans")}] if loc else [],
    }
    names = {
        "id": "case_id",
        "prompt": "src",
        "target": "alt",
        "true": "answers",
        "paraphrases": "rephrase",
        "keep": "loc",
    }
    return _record(raw, names, location, also_true=answers)


def _flat(record: Mapping, location: str) -> FactRecord:
    return _record(record, {}, location)


@dataclass(frozen=True)
class _Format:
    name: str
    required: tuple[str, ...]
    parse: Callable[[Mapping, str], FactRecord]
    fields: frozenset[str] | None = None  # all the fields it reads, where others are worth a warning (hand-written)


FORMATS = (
    _Format("CounterFact", ("requested_rewrite",), _counterfact),
    _Format("zsRE", ("src", "alt", "subject"), _zsre),
    _Format("flat", ("prompt", "subject", "target"), _flat, frozenset(FACT_FEATURES)),
)


def _detect(record: Mapping, location: str) -> _Format:
    for fmt in FORMATS:
        if all(key in record for key in fmt.required):
            return fmt
    needs = "; ".join(f"{fmt.name} needs {', '.join(fmt.required)}" for fmt in FORMATS)
    raise FactsFileError(
        f"{location}: fits no facts format (its fields: {', '.join(sorted(map(str, record))) or 'none'}). {needs}."
    )


# Containers -----------------------------------------------------------------------------------------------------

Rows = Iterator[tuple[str, object]]  # (where a record is, the record)


def _read_errors(path: str, error: Exception) -> FactsFileError:
    if isinstance(error, UnicodeDecodeError):
        return FactsFileError(f"{path}: not UTF-8 text ({error.reason}): re-save it as UTF-8.")
    return FactsFileError(f"{path}: cannot be read ({error.strerror or error}).")


def _jsonl_rows(path: str) -> Rows:
    try:
        for number, record in numbered_jsonl(path):
            yield f"{path}, line {number}", record
    except OSError as error:
        raise _read_errors(path, error) from None
    except ValueError as error:  # a malformed line, named with its number
        raise FactsFileError(str(error)) from None


def _json_rows(path: str) -> Rows:
    try:
        with open(path, encoding="utf-8") as handle:
            content = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise _read_errors(path, error) from None
    if not content.strip():
        return
    try:
        data = json.loads(content)
    except json.JSONDecodeError as error:
        raise FactsFileError(
            f"{path}: malformed JSON at line {error.lineno}, column {error.colno} ({error.msg}). "
            "A file of one record a line is JSONL: name it .jsonl."
        ) from None
    if isinstance(data, dict):
        if len(data) != 1 or not isinstance(next(iter(data.values())), list):
            raise FactsFileError(
                f"{path}: a JSON object with the fields {', '.join(data)}: give a list of records, "
                "or an object with one field holding that list."
            )
        data = next(iter(data.values()))
    if not isinstance(data, list):
        raise FactsFileError(f"{path}: holds a JSON {type(data).__name__}, not a list of records.")
    for number, record in enumerate(data, 1):
        yield f"{path}, record {number}", record


def _csv_rows(path: str) -> Rows:
    """The rows of a CSV file with a header; row 1 is the header, so the first record is row 2 (as a spreadsheet
    numbers them)."""
    number = 1
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            repeated = sorted({name for name in header if header.count(name) > 1})
            if repeated:
                raise FactsFileError(f"{path}: the header names {', '.join(repeated)} twice: name each column once.")
            for number, row in enumerate(reader, 2):
                location = f"{path}, row {number}"
                if None in row:
                    raise FactsFileError(
                        f"{location}: more cells than the header's {len(header)}: quote the cells "
                        'that hold a comma ("a, b").'
                    )
                short = [name for name, value in row.items() if value is None]
                if short:
                    raise FactsFileError(
                        f"{location}: fewer cells than the header (none for {', '.join(short)}): "
                        "add the missing cells, empty if need be."
                    )
                yield location, row
    except (OSError, UnicodeDecodeError) as error:
        raise _read_errors(path, error) from None
    except csv.Error as error:
        raise FactsFileError(f"{path}, row {number + 1}: unreadable CSV ({error}).") from None


def _dataset_rows(source: str, split: str | None) -> Rows:
    """The rows of a dataset folder or Hub dataset, streamed (no arrow cache is written before the records are
    checked)."""
    try:
        loaded = datasets.load_dataset(source, split=split, streaming=True)
        if isinstance(loaded, datasets.IterableDatasetDict):
            if len(loaded) != 1:
                raise FactsFileError(f"{source} holds the splits {', '.join(loaded)}: choose one (split=...).")
            split, loaded = next(iter(loaded.items()))
        for number, row in enumerate(loaded, 1):
            yield f"{source} ({split}), row {number}", row
    except FactsFileError:
        raise
    except Exception as error:  # datasets raises many kinds (missing repo, offline, bad files): one line that says so
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise FactsFileError(
            f"{source}: datasets.load_dataset cannot read it ({type(error).__name__}: {message}). "
            f"Give a facts file ({', '.join(FILE_TYPES)}), a dataset folder or a Hub dataset id."
        ) from None


def _rows(source, split: str | None) -> tuple[str, Rows]:
    """(a name for the source, its rows)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        extension = os.path.splitext(path)[1].lower()
        if os.path.isdir(path) or (
            not os.path.exists(path) and not extension and path.count("/") == 1 and not looks_like_path(path)
        ):
            return path, _dataset_rows(path, split)
        if split is not None:
            raise FactsFileError(f"split={split!r} chooses a split of a dataset folder or Hub dataset, not of {path}.")
        if not os.path.isfile(path):
            raise FactsFileError(
                f"{path}: no such file or folder. Give a facts file ({', '.join(FILE_TYPES)}), a "
                "dataset folder or a Hub dataset id."
            )
        readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows}
        if extension not in readers:
            raise FactsFileError(
                f"{path}: unknown file type {extension or '(no extension)'}: name the file for what "
                f"it holds, {', '.join(FILE_TYPES)}."
            )
        return path, readers[extension](path)
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        if split is not None:
            raise FactsFileError(f"split={split!r} chooses a split of a dataset folder or Hub dataset, not of a list.")
        return "the records given", ((f"record {number}", row) for number, row in enumerate(source, 1))
    raise FactsFileError(
        f"facts must be a file, a dataset folder, a Hub dataset id or a list of records, not {type(source).__name__}."
    )


def _check_unique(records: list[FactRecord]) -> None:
    """One record per fact (prompt and subject) and per id."""
    by_fact: dict[tuple[str, str], FactRecord] = {}
    by_id: dict[str, FactRecord] = {}
    for record in records:
        first = by_fact.setdefault((record.prompt, record.subject), record)
        if first is not record:
            if first.target != record.target:
                raise FactsFileError(
                    f"{record.location}: the same prompt and subject as {first.location} ({record.text!r}) "
                    f"with another target ({first.target!r} there, {record.target!r} here): keep one of them."
                )
            raise FactsFileError(
                f"{record.location}: repeats the fact of {first.location} ({record.text!r} -> "
                f"{record.target!r}): remove one, or merge their paraphrases and keep prompts."
            )
        first = by_id.setdefault(record.id, record)
        if first is not record:
            raise FactsFileError(
                f"{record.location}: its id {record.id!r} is also the id of {first.location}: give "
                "each fact its own id."
            )


def _read(source, split: str | None) -> tuple[list[FactRecord], str, str]:
    """(the records, their format's name, the source's name), every record checked."""
    name, rows = _rows(source, split)
    records: list[FactRecord] = []
    fmt: _Format | None = None
    unknown: set[str] = set()
    for location, row in rows:
        if not isinstance(row, Mapping):
            raise FactsFileError(f"{location}: expected a record (an object with fields), got {type(row).__name__}.")
        if fmt is None:
            fmt = _detect(row, location)
        missing = [key for key in fmt.required if key not in row]
        if missing:
            raise FactsFileError(
                f"{location}: lacks {', '.join(missing)}: the file's first record is in {fmt.name} "
                f"format, which needs {', '.join(fmt.required)}."
            )
        if fmt.fields is not None:
            unknown |= set(map(str, row)) - fmt.fields
        records.append(fmt.parse(row, location))
    if not records:
        raise FactsFileError(f"{name} holds no facts: write one record at least (see docs/facts.md).")
    if unknown:
        logger.warning("%s: fields ignored (not in the %s format): %s", name, fmt.name, ", ".join(sorted(unknown)))
    _check_unique(records)
    return records, fmt.name, name


def read_facts(source: str | os.PathLike | Sequence[Mapping], split: str | None = None) -> list[FactRecord]:
    """The facts of a file (.jsonl, .json, .csv), a dataset folder or Hub dataset id (`split` chooses one of
    several), or a list of records, in any of the formats (`FORMATS`), every record checked.

    Raises `FactsFileError`, naming the record and the fix, for: no facts; a malformed line; a record that fits no
    format or lacks a field of the file's format; a subject not in its prompt; an empty target; a target equal to
    the true object; two records for one prompt and subject; two records with one id.
    """
    records, fmt, name = _read(source, split)
    logger.info("read %d facts in %s format from %s", len(records), fmt, name)
    return records


def check_lengths(
    records: Sequence[FactRecord], tokenizer: PreTrainedTokenizerBase, max_length: int | None = None
) -> None:
    """Refuse a record with a phrasing longer than the model reads: its prompt and paraphrases with the target
    written in, its keep prompts (with their answer when given), its question and generation prompts.

    `max_length`: the model's context (e.g. `config.max_position_embeddings`); None: the tokenizer's
    `model_max_length`, when it sets one.
    """
    limit = max_length if max_length is not None else tokenizer.model_max_length
    if not isinstance(limit, int) or limit <= 0 or limit >= 10**9:  # transformers' "no limit" is 1e30
        raise ValueError(
            "The tokenizer names no context length: pass max_length (the model's config.max_position_embeddings)."
        )
    for record in records:
        phrasings = [("prompt", record.text.replace(PLACEHOLDER, record.target))]
        phrasings += [
            (f"paraphrase {i}", p.replace(PLACEHOLDER, record.target)) for i, p in enumerate(record.paraphrases, 1)
        ]
        phrasings += [
            (f"keep prompt {i}", k.prompt.replace(PLACEHOLDER, k.answer or "")) for i, k in enumerate(record.keep, 1)
        ]
        phrasings += [("question", record.question)] if record.question else []
        phrasings += [(f"generation prompt {i}", p) for i, p in enumerate(record.generation_prompts, 1)]
        lengths = [len(ids) for ids in tokenizer([text for _, text in phrasings])["input_ids"]]
        for (what, _), length in zip(phrasings, lengths):
            if length > limit:
                raise FactsFileError(
                    f"{record.location or record.id}: its {what} is {length} tokens, more than the "
                    f"model's context of {limit}: shorten it or remove it."
                )


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def describe_facts(records: Sequence[FactRecord]) -> str:
    """What an edit of these records changes, as a markdown table (the dry run's): subject, prompt,
    true -> target, and how many paraphrases and keep prompts each has."""
    answered = sum(k.answer is not None for r in records for k in r.keep)
    lines = [
        f"{len(records)} facts to edit, {sum(len(r.paraphrases) for r in records)} paraphrases, "
        f"{sum(len(r.keep) for r in records)} keep prompts ({answered} with their answer in the file)",
        "",
        "| # | subject | prompt | true → target | paraphrases | keep |",
        "|---|---|---|---|---|---|",
    ]
    for number, r in enumerate(records, 1):
        lines.append(
            f"| {number} | {_cell(r.subject)} | {_cell(r.text)} | {_cell(r.true or '?')} → {_cell(r.target)} "
            f"| {len(r.paraphrases)} | {len(r.keep)} |"
        )
    return "\n".join(lines)


# Benchmark-style splits -----------------------------------------------------------------------------------------


def fact_rows(records: Sequence[FactRecord], train_on_paraphrases: bool = False) -> dict[str, list[dict]]:
    """The rows of `FACT_SPLITS`, with the benchmarks' columns (`benchmarks.common.FEATURES`), in record order.

    modified_train: each prompt (and its paraphrases with `train_on_paraphrases`), with the new object;
    modified_test: each prompt, with the new object; modified_paraphrase: the paraphrases not trained on;
    keep: the keep prompts, uuid "<fact id>-keep-<n>", subject empty, object and original_object their answer
    when the file gives it, else empty (the pipeline fills in θ0's answer). original_object is the true object,
    empty when the file does not say.
    """
    rows: dict[str, list[dict]] = {split: [] for split in FACT_SPLITS}
    for record in records:
        base = {
            "uuid": record.id,
            "relation": record.relation,
            "subject": record.subject,
            "object": record.target,
            "original_object": record.true or "",
        }
        rows[MODIFIED_TRAIN].append({**base, "text": record.text})
        rows[MODIFIED_TEST].append({**base, "text": record.text})
        paraphrase_split = MODIFIED_TRAIN if train_on_paraphrases else MODIFIED_PARAPHRASE
        rows[paraphrase_split] += [{**base, "text": text} for text in record.paraphrases]
        rows[KEEP] += [
            {
                "uuid": f"{record.id}-keep-{n}",
                "relation": record.relation,
                "subject": "",
                "text": keep.prompt,
                "object": keep.answer or "",
                "original_object": keep.answer or "",
            }
            for n, keep in enumerate(record.keep, 1)
        ]
    return rows


def _split(rows: list[dict]) -> datasets.Dataset:
    """Rows as a split with the benchmarks' features, made by columns: an empty split keeps its columns."""
    return datasets.Dataset.from_dict({name: [row[name] for row in rows] for name in FEATURES}, features=FEATURES)


def facts_splits(records: Sequence[FactRecord], train_on_paraphrases: bool = False) -> datasets.DatasetDict:
    """`fact_rows` as a `DatasetDict` in memory (for records read from a list; `load_facts` caches a file's)."""
    rows = fact_rows(records, train_on_paraphrases)
    return datasets.DatasetDict({split: _split(rows[split]) for split in FACT_SPLITS})


@dataclass
class FactsConfig(datasets.BuilderConfig):
    """A facts source and how to split it; every field keys the cache, with the records' hash (`load_facts`)."""

    source: str | None = field(default=None, metadata={"help": "The facts file, dataset folder or Hub dataset id."})
    source_split: str | None = field(default=None, metadata={"help": "The split of a dataset source holding several."})
    train_on_paraphrases: bool = field(default=False, metadata={"help": "Train on the paraphrases too."})


class FactsBuilder(datasets.GeneratorBasedBuilder):
    """A user's facts as benchmark-style splits (`FACT_SPLITS`, with the benchmarks' columns)."""

    BUILDER_CONFIG_CLASS = FactsConfig
    VERSION = datasets.Version("1.0.0")

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(description=self.__doc__, features=FEATURES)

    def _split_generators(self, dl_manager):
        if self.config.source is None:
            raise ValueError("FactsBuilder needs source=<facts file, dataset folder or Hub dataset id>.")
        records, _, _ = _read(self.config.source, self.config.source_split)
        rows = fact_rows(records, self.config.train_on_paraphrases)
        # `datasets` cannot load an empty generated split: those are left out here and made by `load_facts`
        return [
            datasets.SplitGenerator(name=split, gen_kwargs={"rows": rows[split]})
            for split in FACT_SPLITS
            if rows[split]
        ]

    def _generate_examples(self, rows):
        for index, row in enumerate(rows):
            yield f"{row['uuid']}-{index}", row


def records_hash(records: Sequence[FactRecord]) -> str:
    """sha256 of the records' content: the cache key of what a source holds, whatever the source."""
    text = json.dumps([r.to_dict() for r in records], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_facts(
    source: str | os.PathLike,
    train_on_paraphrases: bool = False,
    split: str | None = None,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """A facts file, dataset folder or Hub dataset id as benchmark-style splits (`fact_rows`), built by
    `FactsBuilder` and cached; the records are read and checked first (nothing is written when they are bad),
    and their hash keys the cache, so a changed file is never served from a stale one."""
    if not isinstance(source, (str, os.PathLike)):
        raise FactsFileError(
            "load_facts reads a file, a dataset folder or a Hub dataset id; records in memory "
            "become splits with facts_splits(read_facts(records))."
        )
    records = read_facts(source, split)
    path = os.fspath(source)
    digest = source_hash(sys.modules[__name__]) + records_hash(records)
    builder = FactsBuilder(
        cache_dir=cache_dir,
        hash=digest,
        source=os.path.abspath(path) if os.path.exists(path) else path,
        source_split=split,
        train_on_paraphrases=train_on_paraphrases,
    )
    builder.download_and_prepare()
    built = builder.as_dataset()
    return datasets.DatasetDict({split: built[split] if split in built else _split([]) for split in FACT_SPLITS})


__all__ = [
    "FACT_FEATURES",
    "FACT_SPLITS",
    "FORMATS",
    "KEEP",
    "MODIFIED_PARAPHRASE",
    "FactRecord",
    "FactsBuilder",
    "FactsConfig",
    "FactsFileError",
    "KeepPrompt",
    "check_lengths",
    "content_id",
    "describe_facts",
    "fact_rows",
    "facts_splits",
    "load_facts",
    "read_facts",
    "records_hash",
]
