"""kNN-LM for modification, the paper's Appendix F baseline: no training, a datastore instead.

Keys are the contextual embeddings (the base model's last hidden state at θ0) at the position that
predicts the object — the first mask of a masked LM, the last prompt token of a causal LM — of
the modified facts' training evidence; values are their new objects' token ids. At test time a
fact takes its nearest key's object when the *distance* to it is below ε, else the model's own
prediction. Distances: L2, or cosine distance 1 − cos (a distance, never a similarity: the authors'
script compared a similarity against a distance threshold).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .architectures import eval_mode, model_kind
from .collators import FactCollator
from .evaluation.scoring import FactResults, evaluate_facts


METRICS = ("l2", "cosine")


@torch.no_grad()
def object_states(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, facts: Sequence[Mapping], batch_size: int = 64
) -> torch.Tensor:
    """[len(facts), hidden]: the last hidden state at the position that predicts each fact's first object token."""
    kind = model_kind(model)
    collator = FactCollator(tokenizer, kind)
    device = next(model.parameters()).device
    states = []
    with eval_mode(model):
        for start in range(0, len(facts), batch_size):
            batch = {k: v.to(device) for k, v in collator(list(facts[start : start + batch_size])).items()}
            labels = batch.pop("labels")
            hidden = model.base_model(**batch, **kind.forward_kwargs).last_hidden_state
            first = (labels != -100).int().argmax(dim=1) - kind.logit_shift
            states.append(hidden[torch.arange(len(first), device=device), first].float().cpu())
    return torch.cat(states)


def pairwise_distance(queries: torch.Tensor, keys: torch.Tensor, metric: str) -> torch.Tensor:
    """[queries, keys] distances: L2, or cosine distance 1 − cos(q, k) (0 = same direction)."""
    if metric == "l2":
        return torch.cdist(queries.double(), keys.double())
    if metric == "cosine":
        q = torch.nn.functional.normalize(queries.double(), dim=1)
        k = torch.nn.functional.normalize(keys.double(), dim=1)
        return 1 - q @ k.T
    raise ValueError(f"Unknown metric {metric!r}: choose one of {', '.join(METRICS)}.")


@dataclass
class KnnDatastore:
    """Keys (contextual embeddings at θ0) and values (object token ids) of the modified facts' evidence."""

    keys: torch.Tensor
    values: list[list[int]]
    metric: str = "l2"

    @classmethod
    def build(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        evidence: Iterable[Mapping],
        metric: str = "l2",
    ) -> KnnDatastore:
        if metric not in METRICS:
            raise ValueError(f"Unknown metric {metric!r}: choose one of {', '.join(METRICS)}.")
        rows = list(evidence)
        if not rows:
            raise ValueError("The kNN datastore needs the modified facts' training evidence, and none was given.")
        collator = FactCollator(tokenizer, model_kind(model))
        values = [[t for t in collator.encode(row)["labels"] if t != -100] for row in rows]
        return cls(object_states(model, tokenizer, rows), values, metric)

    def lookup(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        facts: Sequence[Mapping],
        object_key: str = "object",
    ) -> KnnLookup:
        """What every ε needs: the model's own predictions, each fact's nearest key and its distance."""
        facts = list(facts)
        own = evaluate_facts(model, tokenizer, facts, object_key=object_key)
        distances = pairwise_distance(object_states(model, tokenizer, facts), self.keys, self.metric)
        best, index = distances.min(dim=1)
        collator = FactCollator(tokenizer, model_kind(model), object_key=object_key)
        targets = [[t for t in collator.encode(f)["labels"] if t != -100] for f in facts]
        return KnnLookup(own, best.tolist(), [self.values[i] for i in index.tolist()], targets)

    def predict(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        facts: Sequence[Mapping],
        epsilons: Sequence[float],
    ) -> dict[float, FactResults]:
        """For each ε: the neighbour's object where its distance < ε, the model's prediction elsewhere."""
        found = self.lookup(model, tokenizer, facts)
        return {epsilon: found.at(epsilon) for epsilon in epsilons}


@dataclass
class KnnLookup:
    """One pass of a fact list through the datastore; `at(ε)` costs no model call."""

    own: FactResults
    distances: list[float]
    neighbours: list[list[int]]
    targets: list[list[int]]

    def at(self, epsilon: float) -> FactResults:
        predicted = [n if d < epsilon else p for d, n, p in zip(self.distances, self.neighbours, self.own.predicted)]
        return FactResults([p == t for p, t in zip(predicted, self.targets)], predicted)


def epsilon_grid(distances: Sequence[float], points: int = 11) -> list[float]:
    """ε at evenly spaced quantiles of the given nearest-neighbour distances (just above each, so the
    fact at that quantile takes its neighbour), from 0 (never: the model alone) to all of them."""
    ordered = sorted(distances)
    if not ordered:
        raise ValueError("No distances to place ε between: the kNN sweep needs facts to evaluate.")
    chosen = {0.0}
    for k in range(1, points):
        value = ordered[round(k * (len(ordered) - 1) / (points - 1))]
        chosen.add(
            float(
                torch.nextafter(
                    torch.tensor(value, dtype=torch.float64), torch.tensor(float("inf"), dtype=torch.float64)
                )
            )
        )
    return sorted(chosen)
