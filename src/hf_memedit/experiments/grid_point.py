"""`GridPoint`: what one edit of a sweep or compare trains from θ0, or what one kNN-LM ε looks up.

An edit point is its norm, block and δ, the method that made it, and the `EditConfig` fields it sets for itself
(`settings`, checked against EditConfig's fields); every other field is the run's. Its JSON form keys the finished
rows of points.jsonl (`experiments.points`), in the flat form earlier versions wrote, so their folders resume.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..edit_config import EditConfig


KNN = "knn"  # the method of a kNN-LM point: a metric and an ε instead of norm, block and δ
# A point's own axes, and the EditConfig field each one sets.
AXES = {"norm": "norm", "block": "edit_blocks", "delta": "delta"}
# Three EditConfig fields go by shorter names in points.jsonl, as every version has written them.
RECORD_NAMES = {"preserve_objective": "preserve", "edit_modules": "modules", "key_constraint": "keys"}
_SETTABLE = {f.name for f in dataclasses.fields(EditConfig) if f.init} - set(AXES.values())


@dataclass(frozen=True)
class GridPoint:
    """One grid point: an edit's norm, block and δ (None: unbounded) and the EditConfig `settings` it sets for itself,
    or a kNN-LM point's metric and ε; `method` names the compare method that made it."""

    norm: str | None = None
    block: str | None = None
    delta: float | None = None
    method: str | None = None
    metric: str | None = None  # kNN-LM: the datastore's distance
    epsilon: float | None = None  # kNN-LM: the distance threshold ε
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.block is not None:
            object.__setattr__(self, "block", str(self.block))
        unknown = sorted(set(self.settings) - _SETTABLE)
        if unknown:
            raise ValueError(
                f"A grid point sets {unknown}, which are not EditConfig fields it may set (its norm, block "
                "and δ are its own fields)."
            )
        unset = sorted(name for name, value in self.settings.items() if value is None)
        if unset:
            raise ValueError(f"A grid point sets {unset} to None: leave a setting out to keep the run's value.")
        settings = {name: list(value) if name == "edit_modules" else value for name, value in self.settings.items()}
        object.__setattr__(self, "settings", settings)

    @property
    def is_knn(self) -> bool:
        return self.method == KNN

    @property
    def modules(self) -> list[str] | None:
        """The block's submodules the point trains; None: all of them."""
        return self.settings.get("edit_modules")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form rows, points.jsonl and results keep:
        an edit point's norm, block and δ, and what else is set."""
        always = () if self.is_knn else tuple(AXES)
        record = {
            name: getattr(self, name)
            for name in (*AXES, "method", "metric", "epsilon")
            if getattr(self, name) is not None or name in always
        }
        record.update((RECORD_NAMES.get(name, name), value) for name, value in self.settings.items())
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> GridPoint:
        own = {f.name for f in dataclasses.fields(cls)} - {"settings"}
        names = {short: name for name, short in RECORD_NAMES.items()}
        settings = {names.get(key, key): value for key, value in record.items() if key not in own}
        unknown = sorted(
            key for key, value in record.items() if key not in own and names.get(key, key) not in _SETTABLE
        )
        if unknown:
            raise ValueError(
                f"A grid point with unknown fields {unknown}: {dict(record)!r} was written by another "
                "version of hf_memedit; run it again in a new --output_dir."
            )
        return cls(**{key: value for key, value in record.items() if key in own}, settings=settings)

    @property
    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def series(self) -> str:
        """The curve the point belongs to in the plots: one per block and norm, or kNN-LM's metric."""
        return f"kNN-LM ({self.metric})" if self.is_knn else f"block {self.block} ({self.norm})"

    @property
    def radius(self) -> float:
        """What varies along a curve: δ (∞ when unconstrained) or kNN-LM's ε."""
        if self.is_knn:
            return self.epsilon
        return self.delta if self.delta is not None else float("inf")

    def describe(self) -> str:
        """The point in words: 'linf, block 25, δ 0.01' or 'kNN l2, ε 3.2'."""
        if self.is_knn:
            return f"kNN {self.metric}, ε {self.epsilon:.4g}"
        text = f"{self.norm}, block {self.block}"
        if self.modules:
            text += f" ({', '.join(self.modules)})"
        keys, energy = self.settings.get("key_constraint"), self.settings.get("nullspace_energy")
        if keys not in (None, "none"):
            text += f", {keys} keys"
            if energy is not None:
                text += f" ({energy:.3g} of their energy removed)"
        if self.settings.get("preserve_objective") not in (None, "none"):
            text += f", preserve {self.settings['preserve_objective']}"
        if self.settings.get("eos_target"):
            text += ", EOS targets"
        if self.settings.get("target_suffix"):
            text += f", targets end with {self.settings['target_suffix']!r}"
        return text + (f", δ {self.delta:.3g}" if self.delta is not None else ", δ ∞")

    def train_args(self, args: EditConfig, output_dir: str) -> EditConfig:
        """`args` as this edit point trains with them: its block, norm and δ, its settings, and the whole block
        unless it names its modules; no evaluation or checkpoints inside a grid (its rows score each point)."""
        every = {
            "output_dir": output_dir,
            "edit_blocks": [self.block],
            "norm": self.norm,
            "delta": self.delta,
            "edit_modules": None,
            "eval_strategy": "no",
            "save_strategy": "no",
            "eval_before_edit": False,
        }
        return dataclasses.replace(args, **{**every, **self.settings})


def point_of(row: Mapping[str, Any]) -> GridPoint:
    """The point a result row was made at."""
    return GridPoint.from_dict(row["point"])
