"""What an edit must keep: an honest locality split, the neighbours θ0 knows, and batches that mix them in.

An edit that trains on preservation data from the benchmark (FTA's unmodified evidence, θ0's own
answers on neighbour facts, a Fisher estimated on unmodified facts) would flatter its own retention
if that were measured on the same facts. `disjoint_split` therefore sets the facts of a seeded share of the
subjects aside as the only preservation data (`preserve_fraction`, by a hash of the subject) and measures
locality on the others, minus every fact a preservation fact states too, read backwards or implied
(`benchmarks.relations`). Neither side holds a fact an edit changes logically (`no_split`): those whose new
object the edit implies are scored apart, as its consistency. Every results file records the `Locality` it was
measured on: how many facts were not scored, by reason, and which.

Preservation objectives (`EditConfig.preserve_objective`), mixed into every batch of the edit:
- `evidence`: the unmodified facts' training evidence with their benchmark objects (the paper's FTA);
- `answers`: evidence of unmodified facts that θ0 predicts right, so the label is θ0's own answer:
  the objective keeps behaviour rather than teaching labels.
- `kl`: the unmodified evidence with KL(θ0 ‖ θ) of the whole next-token distribution at its object
  positions as the loss (the trainer runs θ0 on those rows): it also keeps the edit's new objects
  as unlikely there as θ0 had them, where a hard label only pushes the right token up.
`answers` and `kl` draw from the edit facts' own relations (`preserve_same_relation`), where an
edit's new objects most easily leak. With `preserve_risk` a share of each edit fact's neighbours is
drawn by risk instead of uniformly: in proportion to θ0's probability of that fact's new object
(its first token) on the neighbour's prompt (`neighbour_risk`). Most facts an edit loses are taken
over by a new object whose first token θ0 already ranked high there, so those are the neighbours
worth holding down; the uniform share keeps the rest of the relation covered.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .benchmarks.common import (
    CONSISTENCY,
    FEATURES,
    MODIFIED_TEST,
    MODIFIED_TRAIN,
    UNMODIFIED_TEST,
    UNMODIFIED_TRAIN,
    hash_share,
)
from .benchmarks.relations import CHANGE_REASONS, Edit, Triple, edit_changes, linked_to
from .collators import PRESERVE_KEY, WEIGHT_KEY
from .evaluation.scoring import evaluate_facts, object_logits


PRESERVE_OBJECTIVES = ("none", "evidence", "answers", "kl")


DROP_REASONS = {
    **CHANGE_REASONS,
    "linked_to_preservation": "a preservation fact read backwards or implied, or sharing its prompt",
}
"""Why an unmodified fact is not scored as locality (nor, for an edit's changes, preserved), as reports list it."""


@dataclass(frozen=True)
class Locality:
    """Which unmodified facts locality (A_F\\S, retention, agreement, bleed) was measured on, and which were not
    scored and why: `dropped` counts them by reason (`DROP_REASONS`), `dropped_facts` names each one."""

    disjoint: bool  # no preservation data touched a scored fact, its subject, or what it states
    preserve_fraction: float  # share of the subjects whose unmodified facts are set aside as preservation data
    n_preservation_facts: int
    n_locality_facts: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> unmodified facts neither scored nor preserved
    n_consistency_facts: int = 0  # facts an edit changes whose new object it implies: scored apart (consistency)
    dropped_facts: tuple[dict, ...] = ()  # uuid, relation, subject, object and reason of each one

    def describe(self) -> str:
        notes = ", ".join(f"{n} {DROP_REASONS[reason]}" for reason, n in sorted(self.dropped.items()))
        tail = f"; not scored: {notes}" if notes else ""
        if self.disjoint and self.preserve_fraction == 0:
            return (
                f"all {self.n_locality_facts} unmodified facts that no edit "
                f"changes (no preservation data from the benchmark{tail})"
            )
        if not self.disjoint:
            return (
                f"{self.n_locality_facts} unmodified facts, NOT disjoint from the preservation data "
                f"(preserve_fraction 0{tail}): retention is overstated"
            )
        return (
            f"{self.n_locality_facts} unmodified facts disjoint from the {self.n_preservation_facts} preservation "
            f"facts, their subjects and what they state (preserve_fraction {self.preserve_fraction}{tail})"
        )

    def to_dict(self) -> dict:
        """As results.json holds it (lists, not tuples), with the description."""
        return {
            **asdict(self),
            "dropped_facts": [dict(fact) for fact in self.dropped_facts],
            "description": self.describe(),
        }


def disjoint_split(
    splits: Mapping[str, datasets.Dataset], fraction: float, seed: int
) -> tuple[datasets.DatasetDict, Locality]:
    """Unmodified facts split by a seeded hash of their subject: the facts of a `fraction` of the subjects keep their
    training evidence as the only preservation data; the others keep their test phrasing for locality, less those
    a preservation fact states too, read backwards or implied, or whose prompt it shares (`relations.linked_to`).
    A fact's side depends on its subject alone, never on the other facts present. The facts an edit changes
    are neither (see `no_split`). `fraction` 0 keeps everything on both sides, flagged not disjoint."""
    if not 0 <= fraction < 1:
        raise ValueError(f"preserve_fraction must lie in [0, 1), got {fraction}.")
    return _split(splits, fraction, seed)


def no_split(splits: Mapping[str, datasets.Dataset]) -> tuple[datasets.DatasetDict, Locality]:
    """The splits for an edit that uses no preservation data from the benchmark: every unmodified fact is scored,
    less those an edit changes logically (`relations.edit_changes`); of these, the ones whose new object the edit
    implies become the `consistency` split, scored on that object."""
    return _split(splits, None, 0)


def _columns(split: datasets.Dataset, *names: str) -> list[tuple]:
    """The rows of a split as tuples of these columns (read as whole columns: row by row is slow)."""
    columns = split.select_columns(list(names)).to_dict()
    return list(zip(*(columns[name] for name in names)))


def _facts(split: datasets.Dataset) -> dict[str, Triple]:
    return {uuid: (s, r, o) for uuid, s, r, o in _columns(split, "uuid", "subject", "relation", "object")}


def _split(
    splits: Mapping[str, datasets.Dataset], fraction: float | None, seed: int
) -> tuple[datasets.DatasetDict, Locality]:
    """`fraction` None: no preservation data; 0: all of it, not disjoint; else the subjects' share set aside."""
    out = datasets.DatasetDict(dict(splits))
    train, test = splits[UNMODIFIED_TRAIN], splits[UNMODIFIED_TEST]
    edits = {
        Edit(*row)
        for split in (MODIFIED_TEST, MODIFIED_TRAIN)
        for row in _columns(splits[split], "subject", "relation", "original_object", "object")
    }
    facts = {**_facts(train), **_facts(test)}
    changes = edit_changes(edits, facts)
    kept = [uuid for uuid in facts if uuid not in changes]
    if fraction is None:
        pool: set[str] = set()
    elif fraction == 0:
        pool = set(kept)
    else:
        pool = {uuid for uuid in kept if hash_share(facts[uuid][0], seed, "preserve") < fraction}
    candidates = {uuid: facts[uuid] for uuid in kept if uuid not in pool or fraction == 0}
    linked = linked_to([facts[uuid] for uuid in pool], candidates) if fraction else set()
    reasons = {
        **{uuid: change.reason for uuid, change in changes.items()},
        **dict.fromkeys(linked, "linked_to_preservation"),
    }
    scored = set(candidates) - linked
    preserved = pool if fraction is not None else set(kept)
    train_uuids, test_uuids = [row[0] for row in _columns(train, "uuid")], [row[0] for row in _columns(test, "uuid")]
    out[UNMODIFIED_TRAIN] = train.select([i for i, uuid in enumerate(train_uuids) if uuid in preserved])
    out[UNMODIFIED_TEST] = test.select([i for i, uuid in enumerate(test_uuids) if uuid in scored])
    implied: dict[tuple[str, str], dict] = {}
    for row in test.select([i for i, uuid in enumerate(test_uuids) if uuid in changes and changes[uuid].implied]):
        change = changes[row["uuid"]]
        implied.setdefault(
            (row["text"], change.implied), {**row, "object": change.implied, "original_object": row["object"]}
        )
    out[CONSISTENCY] = datasets.Dataset.from_dict(
        {name: [row[name] for row in implied.values()] for name in FEATURES}, features=FEATURES
    )
    dropped = tuple(
        {
            "uuid": uuid,
            "relation": facts[uuid][1],
            "subject": facts[uuid][0],
            "object": facts[uuid][2],
            "reason": reason,
        }
        for uuid, reason in sorted(reasons.items())
    )
    return out, Locality(
        disjoint=fraction != 0,
        preserve_fraction=fraction or 0.0,
        n_preservation_facts=len(pool & set(train_uuids)),
        n_locality_facts=len(scored & set(test_uuids)),
        dropped=dict(sorted(Counter(reasons.values()).items())),
        n_consistency_facts=len({row["uuid"] for row in implied.values()}),
        dropped_facts=dropped,
    )


def known_evidence(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, evidence: datasets.Dataset, batch_size: int = 64
) -> datasets.Dataset:
    """The evidence rows `model` predicts right: their objects are the model's own answers."""
    if len(evidence) == 0:
        return evidence
    correct = evaluate_facts(model, tokenizer, evidence, batch_size=batch_size, show_progress=True).correct
    return evidence.select([i for i, ok in enumerate(correct) if ok])


@dataclass(frozen=True)
class NeighbourRisk:
    """θ0's probability of each edit row's new object (its first token) at each neighbour's first object
    position: how readily the edit's new object would take the neighbour over. Stored per distinct token."""

    by_token: torch.Tensor  # [neighbours, distinct first tokens of the new objects]
    column: tuple[int, ...]  # edit row → its first token's column

    def weights(self, neighbours: Sequence[int], row: int) -> list[float]:
        return self.by_token[list(neighbours), self.column[row]].tolist()


@torch.no_grad()
def neighbour_risk(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    neighbours: datasets.Dataset,
    edit: datasets.Dataset,
    batch_size: int = 64,
) -> NeighbourRisk:
    """One teacher-forced pass over the edit rows (their new objects' first tokens) and one over the neighbours."""
    first = [0] * len(edit)
    for index, _, targets in object_logits(model, tokenizer, list(edit), batch_size):
        first[index] = int(targets[0])
    tokens = sorted(set(first))
    wanted = torch.tensor(tokens, dtype=torch.long)
    by_token = torch.zeros(len(neighbours), len(tokens))
    if len(neighbours):
        for index, logits, _ in object_logits(
            model, tokenizer, list(neighbours), batch_size, show_progress=True, desc="ranking neighbours by risk"
        ):
            by_token[index] = logits[0].float().softmax(-1)[wanted.to(logits.device)].cpu()
    return NeighbourRisk(by_token, tuple(tokens.index(t) for t in first))


def preservation_batches(
    edit: datasets.Dataset,
    neighbours: datasets.Dataset,
    per_batch: int,
    ratio: float,
    weight: float,
    epochs: float,
    seed: int,
    same_relation: bool,
    risk: NeighbourRisk | None = None,
    risk_share: float = 0.0,
) -> datasets.Dataset:
    """Groups of `per_batch` edit facts plus `round(ratio × per_batch)` neighbours, each collated as one batch.

    Neighbours carry the loss weight `weight` (edit facts 1). With `same_relation` each edit fact
    brings neighbours of its own relation (any relation where it has none). A `risk_share` of the
    neighbour slots is drawn in proportion to θ0's probability of the row's new object there (`risk`), the
    others uniformly. Deterministic in `seed`.
    """
    if len(neighbours) == 0:
        raise ValueError(
            "The preservation objective has no neighbour facts to mix in (no unmodified evidence, or none that the "
            "model predicts right): set preserve_objective none, or a larger preserve_fraction."
        )
    if risk_share > 0 and (risk is None or risk.by_token.shape[0] != len(neighbours) or len(risk.column) != len(edit)):
        raise ValueError(
            f"preserve_risk {risk_share} needs the neighbour_risk of these {len(neighbours)} neighbours "
            f"and {len(edit)} edit rows."
        )
    rng = random.Random(seed)
    rows = list(neighbours)
    by_relation: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_relation[row["relation"]].append(index)
    count = round(ratio * per_batch)
    groups = []
    for _ in range(max(1, round(epochs))):
        order = list(range(len(edit)))
        rng.shuffle(order)
        for start in range(0, len(order), per_batch):
            chosen = order[start : start + per_batch]
            relations = [edit[i]["relation"] for i in chosen] if same_relation else None
            drawn = _draw(
                rng, chosen, relations, by_relation, len(rows), count, risk if risk_share > 0 else None, risk_share
            )
            facts = [edit[i] for i in chosen] + [rows[i] for i in drawn]
            groups.append(
                {
                    "text": [row["text"] for row in facts],
                    "object": [row["object"] for row in facts],
                    WEIGHT_KEY: [1.0] * len(chosen) + [float(weight)] * len(drawn),
                    PRESERVE_KEY: [False] * len(chosen) + [True] * len(drawn),
                }
            )
    return datasets.Dataset.from_list(groups)


def _draw(
    rng: random.Random,
    chosen: Sequence[int],
    relations: Sequence[str] | None,
    by_relation: Mapping[str, list[int]],
    total: int,
    count: int,
    risk: NeighbourRisk | None,
    risk_share: float,
) -> list[int]:
    """`count` distinct neighbour indices (fewer when there are fewer), spread over the chosen edit rows:
    from each row's relation when `relations` are given, a `risk_share` of them by that row's risk."""
    if relations is None and risk is None:
        return rng.sample(range(total), min(count, total))
    drawn: list[int] = []
    taken: set[int] = set()
    everyone = range(total)
    for slot in range(min(count, total)):
        pool = by_relation.get(relations[slot % len(chosen)], ()) if relations is not None else everyone
        free = [i for i in pool if i not in taken] or [i for i in everyone if i not in taken]
        if risk is not None and rng.random() < risk_share:
            mass = risk.weights(free, chosen[slot % len(chosen)])
            pick = rng.choices(free, weights=mass)[0] if sum(mass) > 0 else rng.choice(free)
        else:
            pick = rng.choice(free)
        taken.add(pick)
        drawn.append(pick)
    return drawn
