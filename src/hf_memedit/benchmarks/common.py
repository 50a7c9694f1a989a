"""What every modified-facts benchmark shares: the row schema, the split names, the paper's
modification procedure, JSONL reading with errors that name the file and line, and the cache hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import datasets

from ..collators import PLACEHOLDER


logger = logging.getLogger(__name__)

# The four splits of every benchmark.
MODIFIED_TRAIN = "modified_train"  # training evidence of the m modified facts, with the new object
MODIFIED_TEST = "modified_test"  # test phrasing of the modified facts, with the new object
UNMODIFIED_TRAIN = "unmodified_train"  # training evidence of the other facts (FT, FTA)
UNMODIFIED_TEST = "unmodified_test"  # test phrasing of the other facts (A_F\S)
SPLITS = (MODIFIED_TRAIN, MODIFIED_TEST, UNMODIFIED_TRAIN, UNMODIFIED_TEST)

FEATURES = datasets.Features(
    {
        "uuid": datasets.Value("string"),
        "relation": datasets.Value("string"),
        "subject": datasets.Value("string"),
        "text": datasets.Value("string"),  # subject filled in, PLACEHOLDER where the object goes
        "object": datasets.Value("string"),  # the new object for a modified fact
        "original_object": datasets.Value("string"),
    }
)


@dataclass
class Fact:
    """One (subject, relation, object) fact with its training and test phrasings."""

    uuid: str
    relation: str
    subject: str
    object: str
    train_texts: list[str]
    test_texts: list[str]


@dataclass
class ModBenchmarkConfig(datasets.BuilderConfig):
    """Fields shared by the benchmark builders; every one of them keys the cache."""

    m: int = field(default=32, metadata={"help": "How many facts to modify."})
    seed: int = field(default=0, metadata={"help": "Seed of the modified facts and their new objects."})
    eligible_uuids: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "Only these facts may be modified (e.g. those a model already predicts; see load_benchmark)."},
    )
    relations: tuple[str, ...] | None = field(
        default=None, metadata={"help": "Only these relations (ids for T-REx and geo_mod, names for zsRE); None: all."}
    )
    locality_relations: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "Relations read only as unmodified facts, never modified: more facts to measure locality on "
                  "without changing which facts are edited. Their facts about an edited fact's subject or new object "
                  "are left out, since the edit may rightly change them."},
    )

    def reads(self, relation: str) -> bool:
        """Whether the facts of `relation` are read (`relations`, plus the locality-only ones)."""
        return self.relations is None or relation in self.relations or relation in (self.locality_relations or ())


def read_jsonl(path: str, required: tuple[str, ...] = ()) -> Iterator[dict]:
    """Yield the JSON objects of a JSONL file; a bad line raises an error naming file and line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}, line {number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1}). "
                    "Re-save the file as UTF-8."
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: malformed JSON ({error.msg}). Fix or remove that line.") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}.")
            missing = [key for key in required if key not in record]
            if missing:
                raise ValueError(f"{path}, line {number}: missing field(s) {', '.join(missing)}.")
            yield record


def fill_subject(template: str, subject: str) -> str:
    """A LAMA/ParaRel pattern with [X] = subject and the object placeholder left in."""
    return template.replace("[X]", subject).replace("[Y]", PLACEHOLDER)


def modify_facts(facts: list[Fact], m: int, seed: int, eligible_uuids: tuple[str, ...] | None,
                 locality_relations: tuple[str, ...] | None = None) -> dict[str, str]:
    """Choose m facts and their new objects, as the paper does; returns uuid -> new object.

    New objects come from the same relation, weighted by how often each object occurs among the
    relation's facts, never the original. Relations with a single distinct object cannot be
    modified and are skipped (logged with a count), as are the `locality_relations`.
    """
    if not isinstance(m, int) or isinstance(m, bool) or m <= 0:
        raise ValueError(f"m must be a positive number of facts to modify, got {m!r}.")
    frequency: dict[str, Counter] = {}
    for fact in facts:
        frequency.setdefault(fact.relation, Counter())[fact.object] += 1
    single = sorted(rel for rel, counts in frequency.items() if len(counts) < 2)
    if single:
        logger.warning("Relations with one distinct object cannot be modified, skipped: %s", ", ".join(single))
    allowed = set(eligible_uuids) if eligible_uuids is not None else None
    locality_only = set(locality_relations or ())
    eligible = sorted(
        (f for f in facts if f.relation not in single and f.relation not in locality_only and f.train_texts
         and f.test_texts and (allowed is None or f.uuid in allowed)),
        key=lambda f: f.uuid,
    )
    if m > len(eligible):
        raise ValueError(
            f"m={m} is larger than the {len(eligible)} facts that can be modified (relations with at "
            "least two objects, with training and test text"
            + (", among eligible_uuids" if allowed is not None else "")
            + (f", outside locality_relations {', '.join(sorted(locality_only))}" if locality_only else "")
            + "). Choose a smaller m."
        )
    rng = random.Random(seed)
    chosen = rng.sample(eligible, m)
    new_objects = {}
    for fact in chosen:
        candidates = sorted(o for o in frequency[fact.relation] if o != fact.object)
        weights = [frequency[fact.relation][o] for o in candidates]
        new_objects[fact.uuid] = rng.choices(candidates, weights=weights, k=1)[0]
    return new_objects


def choose_evidence(items: list[str], count: int | None, seed: int, uuid: str) -> list[str]:
    """Up to `count` training phrasings of one fact, chosen deterministically on every machine
    (a string seed is hashed with SHA-512, not with Python's salted hash)."""
    if count is None or len(items) <= count:
        return list(items)
    return random.Random(f"{seed}:{uuid}").sample(items, count)


def drop_implied(facts: list[Fact], new_objects: dict[str, str], locality_relations: tuple[str, ...] | None) -> list[Fact]:
    """The facts less those of the locality-only relations about an entity an edit speaks of, its subject or
    its new object: "Tokyo is in Japan" is no locality test of an edit that makes Tokyo the capital of Kenya,
    nor "Cairo is in Egypt" of one that makes Cairo the capital of Japan."""
    if not locality_relations:
        return facts
    edited = {f.subject for f in facts if f.uuid in new_objects} | set(new_objects.values())
    return [f for f in facts if f.relation not in locality_relations or f.subject not in edited]


def split_rows(facts: list[Fact], new_objects: dict[str, str]) -> dict[str, list[dict]]:
    """The four splits' rows, in the facts' order (deterministic keys follow from it)."""
    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for fact in facts:
        modified = fact.uuid in new_objects
        obj = new_objects.get(fact.uuid, fact.object)
        base = {"uuid": fact.uuid, "relation": fact.relation, "subject": fact.subject, "object": obj, "original_object": fact.object}
        train, test = (MODIFIED_TRAIN, MODIFIED_TEST) if modified else (UNMODIFIED_TRAIN, UNMODIFIED_TEST)
        rows[train] += [{**base, "text": text} for text in fact.train_texts]
        rows[test] += [{**base, "text": text} for text in fact.test_texts]
    return rows


class ModBenchmarkBuilder(datasets.GeneratorBasedBuilder):
    """A benchmark builder: subclasses say how to read their facts; modification and splits are shared."""

    BUILDER_CONFIG_CLASS = ModBenchmarkConfig
    VERSION = datasets.Version("1.0.0")
    CITATION = ""

    @classmethod
    def read_facts(cls, config: ModBenchmarkConfig, dl_manager=None) -> list[Fact]:
        raise NotImplementedError

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(description=self.__doc__, features=FEATURES, citation=self.CITATION)

    def _split_generators(self, dl_manager):
        config = self.config
        facts = self.read_facts(config, dl_manager)
        missing = sorted(set(config.locality_relations or ()) - {f.relation for f in facts})
        if missing:
            raise ValueError(f"locality_relations {', '.join(missing)}: no facts of theirs were read; "
                             f"choose among {', '.join(sorted({f.relation for f in facts}))}.")
        new_objects = modify_facts(facts, config.m, config.seed, config.eligible_uuids, config.locality_relations)
        rows = split_rows(drop_implied(facts, new_objects, config.locality_relations), new_objects)
        return [datasets.SplitGenerator(name=split, gen_kwargs={"rows": rows[split]}) for split in SPLITS]

    def _generate_examples(self, rows):
        for index, row in enumerate(rows):
            yield f"{row['uuid']}-{index}", row


def source_hash(*modules) -> str:
    """Package version + hash of the builder modules' source and of this file, so a code change never
    reuses a stale cache."""
    from .. import __version__

    digest = hashlib.sha256(__version__.encode())
    for module in modules:
        with open(module.__file__, "rb") as handle:
            digest.update(handle.read())
    with open(__file__, "rb") as handle:
        digest.update(handle.read())
    return digest.hexdigest()[:16]


def data_fingerprint(data_dir: str | None) -> str:
    """sha256 of what `data_dir` holds (every file's relative path and content), so the cache never
    returns facts from files that have changed since it was built."""
    digest = hashlib.sha256()
    if data_dir is None:
        return ""
    paths = [data_dir] if os.path.isfile(data_dir) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(data_dir) for name in names
    )
    for path in paths:
        digest.update(os.path.relpath(path, data_dir).encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def require_dir(data_dir: str | None, what: str) -> str:
    if not data_dir or not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir {data_dir!r} is not a folder: {what}")
    return data_dir
