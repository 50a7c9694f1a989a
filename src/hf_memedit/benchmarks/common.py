"""What every modified-facts benchmark shares: the row schema, the split names, the paper's
modification procedure, JSONL reading with errors that name the file and line, and the cache hash.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version

import datasets

from ..collators import PLACEHOLDER
from .relations import INVERSE


logger = logging.getLogger(__name__)

# The four splits of every benchmark.
MODIFIED_TRAIN = "modified_train"  # training evidence of the m modified facts, with the new object
MODIFIED_TEST = "modified_test"  # test phrasing of the modified facts, with the new object
UNMODIFIED_TRAIN = "unmodified_train"  # training evidence of the other facts (FT, FTA)
UNMODIFIED_TEST = "unmodified_test"  # test phrasing of the other facts (A_F\S)
SPLITS = (MODIFIED_TRAIN, MODIFIED_TEST, UNMODIFIED_TRAIN, UNMODIFIED_TEST)
# Made by the locality split (hf_memedit.preservation), not by the builders: the test phrasing of the unmodified facts
# an edit changes logically, with the object the edit implies ("Bucharest is the capital of [Y]" -> Japan).
CONSISTENCY = "consistency"

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
    per_relation: bool = field(
        default=False,
        metadata={
            "help": "Draw the m facts relation by relation in turn (as evenly as each relation's modifiable facts "
            "allow) instead of uniformly (the paper): held-out-relation folds (relation_folds) then each hold their "
            "share of the edits, where a uniform draw among the facts a model knows falls mostly in one relation."
        },
    )
    eligible_uuids: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "Only these facts may be modified (e.g. those a model already predicts; see load_benchmark)."
        },
    )
    relations: tuple[str, ...] | None = field(
        default=None, metadata={"help": "Only these relations (ids for T-REx and geo_mod, names for zsRE); None: all."}
    )
    locality_relations: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "Relations read only as unmodified facts, never modified: more facts to measure locality on "
            "without changing which facts are edited. Facts an edit changes logically (hf_memedit.benchmarks."
            "relations) are not scored as locality, whatever their relation."
        },
    )
    excluded_objects: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "Objects never drawn as a new object: those the model's tokenizer cannot encode "
            "(load_benchmark sets them when given an encoder)."
        },
    )

    def reads(self, relation: str) -> bool:
        """Whether the facts of `relation` are read (`relations`, plus the locality-only ones)."""
        return self.relations is None or relation in self.relations or relation in (self.locality_relations or ())


def read_jsonl(path: str, required: tuple[str, ...] = ()) -> Iterator[dict]:
    """Yield the JSON objects of a JSONL file; a bad line raises an error naming file and line."""
    for _, record in numbered_jsonl(path, required):
        yield record


def numbered_jsonl(path: str, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """Yield (line number, JSON object) of a JSONL file, blank lines skipped; a bad line raises an error naming
    file and line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}, line {number}: not UTF-8 text (byte 0x{raw[error.start]:02x} "
                    f"at column {error.start + 1}). Re-save the file as UTF-8."
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}, line {number}: malformed JSON ({error.msg}). Fix or remove that line."
                ) from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}.")
            missing = [key for key in required if key not in record]
            if missing:
                raise ValueError(f"{path}, line {number}: missing field(s) {', '.join(missing)}.")
            yield number, record


def fill_subject(template: str, subject: str) -> str:
    """A LAMA/ParaRel pattern with [X] = subject and the object placeholder left in."""
    return template.replace("[X]", subject).replace("[Y]", PLACEHOLDER)


def hash_share(key: str, seed: int, purpose: str) -> float:
    """A number in [0, 1) fixed by (purpose, seed, key) on every machine (SHA-256, not Python's salted `hash`).

    A split puts a fact on one side when its subject's share is below the side's fraction: the side depends on
    that subject alone, never on which other facts are present (a rank cut would move facts when others come or go).
    """
    digest = hashlib.sha256(f"{purpose}:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def fact_groups(facts: list[Fact]) -> list[list[int]]:
    """The indices of the facts that are modified together or not at all: facts sharing subject and relation (one
    prompt, several true objects, e.g. the countries bordering Germany) or any phrasing (one text, two facts),
    linked transitively. Each group in the facts' order; groups ordered by their first fact."""
    parent = list(range(len(facts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple, int] = {}
    for index, fact in enumerate(facts):
        for key in [
            ("prompt", fact.subject, fact.relation),
            *(("text", t) for t in fact.train_texts + fact.test_texts),
        ]:
            other = first.setdefault(key, index)
            a, b = root(other), root(index)
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for index in range(len(facts)):
        groups.setdefault(root(index), []).append(index)
    return list(groups.values())


def modify_facts(
    facts: list[Fact],
    m: int,
    seed: int,
    eligible_uuids: tuple[str, ...] | None,
    locality_relations: tuple[str, ...] | None = None,
    excluded_objects: tuple[str, ...] | None = None,
    per_relation: bool = False,
) -> dict[str, str]:
    """Choose exactly m facts and their new objects, as the paper does; returns uuid -> new object.

    Facts are drawn uniformly (`per_relation`: from each relation in turn, relations in a seeded order), each with
    its group (`fact_groups`: a group is modified whole or not at all, and only when every one of its facts may be).
    New objects come from the same relation, weighted by how often each object occurs among the relation's facts,
    never a true object of the same prompt (any object of the group, or of a fact that is this one read backwards)
    nor another new object of the group, nor one of `excluded_objects` (objects the model's tokenizer cannot
    encode). Relations with a single distinct object cannot be modified and are skipped (logged with a count), as
    are the `locality_relations`. Fewer than m is an error, never a shrug.
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
    excluded = set(excluded_objects or ())
    backwards: dict[tuple[str, str], set[str]] = {}  # (subject, relation) -> objects true by a fact read backwards
    for fact in facts:
        if fact.relation in INVERSE:
            backwards.setdefault((fact.object, INVERSE[fact.relation]), set()).add(fact.subject)

    def blocked(group: list[Fact]) -> set[str]:
        objects = {f.object for f in group}
        for f in group:
            objects |= backwards.get((f.subject, f.relation), set())
        return objects | excluded

    def modifiable(group: list[Fact]) -> bool:
        if not all(
            f.relation not in single
            and f.relation not in locality_only
            and f.train_texts
            and f.test_texts
            and (allowed is None or f.uuid in allowed)
            for f in group
        ):
            return False
        taken = blocked(group)
        needed = Counter(f.relation for f in group)
        return all(len(set(frequency[relation]) - taken) >= n for relation, n in needed.items())

    groups = [[facts[i] for i in members] for members in fact_groups(facts)]
    usable = [group for group in groups if modifiable(group)]
    available = sum(len(group) for group in usable)
    if m > available:
        raise ValueError(
            f"m={m} is larger than the {available} facts that can be modified (relations with at "
            "least two objects, with training and test text"
            + (", among eligible_uuids" if allowed is not None else "")
            + (f", outside locality_relations {', '.join(sorted(locality_only))}" if locality_only else "")
            + ", whole groups of facts sharing a prompt). Choose a smaller m."
        )
    group_of = {fact.uuid: index for index, group in enumerate(usable) for fact in group}
    rng = random.Random(seed)
    order = rng.sample(sorted(group_of), len(group_of))  # facts uniformly; a drawn fact brings its group
    if per_relation:  # the same shuffle dealt relation by relation: one fact of each relation, then the next round
        relation_of = {fact.uuid: fact.relation for group in usable for fact in group}
        queues: dict[str, list[str]] = {}
        for uuid in order:
            queues.setdefault(relation_of[uuid], []).append(uuid)
        turns = [queues[relation] for relation in rng.sample(sorted(queues), len(queues))]
        order = [uuid for round_ in itertools.zip_longest(*turns) for uuid in round_ if uuid is not None]
    chosen, seen, remaining = [], set(), m
    for uuid in order:
        index = group_of[uuid]
        if index in seen:
            continue
        seen.add(index)
        if len(usable[index]) <= remaining:
            chosen.append(usable[index])
            remaining -= len(usable[index])
            if remaining == 0:
                break
    if remaining:
        raise ValueError(
            f"m={m} cannot be made of whole groups of facts sharing a prompt (seed {seed}): {m - remaining} "
            "could; choose another m or seed."
        )
    new_objects = {}
    for group in chosen:
        taken = blocked(group)
        for fact in sorted(group, key=lambda f: f.uuid):
            candidates = sorted(o for o in frequency[fact.relation] if o not in taken)
            weights = [frequency[fact.relation][o] for o in candidates]
            new_objects[fact.uuid] = rng.choices(candidates, weights=weights, k=1)[0]
            taken.add(new_objects[fact.uuid])
    return new_objects


def choose_evidence(items: list[str], count: int | None, seed: int, uuid: str) -> list[str]:
    """Up to `count` training phrasings of one fact, chosen deterministically on every machine
    (a string seed is hashed with SHA-512, not with Python's salted hash)."""
    if count is None or len(items) <= count:
        return list(items)
    return random.Random(f"{seed}:{uuid}").sample(items, count)


def split_rows(facts: list[Fact], new_objects: dict[str, str]) -> dict[str, list[dict]]:
    """The four splits' rows, in the facts' order (deterministic keys follow from it)."""
    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for fact in facts:
        modified = fact.uuid in new_objects
        obj = new_objects.get(fact.uuid, fact.object)
        base = {
            "uuid": fact.uuid,
            "relation": fact.relation,
            "subject": fact.subject,
            "object": obj,
            "original_object": fact.object,
        }
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
            raise ValueError(
                f"locality_relations {', '.join(missing)}: no facts of theirs were read; "
                f"choose among {', '.join(sorted({f.relation for f in facts}))}."
            )
        new_objects = modify_facts(
            facts,
            config.m,
            config.seed,
            config.eligible_uuids,
            config.locality_relations,
            config.excluded_objects,
            config.per_relation,
        )
        rows = split_rows(facts, new_objects)
        return [datasets.SplitGenerator(name=split, gen_kwargs={"rows": rows[split]}) for split in SPLITS]

    def _generate_examples(self, rows):
        for index, row in enumerate(rows):
            yield f"{row['uuid']}-{index}", row


def source_hash(*modules) -> str:
    """Package version + hash of the builder modules' source and of this file, so a code change never
    reuses a stale cache."""
    digest = hashlib.sha256(version("hf_memedit").encode())
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
    paths = (
        [data_dir]
        if os.path.isfile(data_dir)
        else sorted(os.path.join(root, name) for root, _, names in os.walk(data_dir) for name in names)
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
