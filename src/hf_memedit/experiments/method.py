"""What an editing method of `memedit compare` is (`Method`), and what it makes its points from (`MethodContext`).

Each method is one module of `experiments/methods/` holding its `METHOD`: its name, its label, its own arguments (a
dataclass, parsed as its own `--help` group) and the function that makes its grid points from the compare's
context. A point is the method's whole difference from the run: its norm, block and δ, and the `EditConfig` fields
it sets (`GridPoint.settings`), from which `GridRunner` makes the point's training args and training set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .grid_point import GridPoint


if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ..edit_config import EditConfig
    from .grid import GridRunner


@dataclass
class MethodContext:
    """What a method's points are made from: the grid runner at θ0 (its model, the size and Fisher of a block's
    parameters, kNN-LM's distances), the compare's δ grids and blocks, and the method's own arguments."""

    runner: GridRunner
    linf: list[float] = field(default_factory=list)  # the L∞ methods' δ: compare_deltas['linf'], else sweep_deltas
    grids: Mapping[str, list[float]] = field(default_factory=dict)  # compare_deltas: a method's own δ grid
    blocks: list[str] = field(default_factory=list)  # the blocks FTM, L∞ sweeps: sweep_blocks, else edit_blocks
    block: str | None = None  # the compare's block (`compare_block`), for the methods that edit it
    arguments: Any = None  # the method's own arguments (an instance of its `Method.arguments`), else None

    @property
    def model(self) -> PreTrainedModel:
        return self.runner.model

    @property
    def args(self) -> EditConfig:
        return self.runner.args


@dataclass(frozen=True)
class Method:
    """One editing method of `memedit compare`: the `METHOD` of its module in `experiments/methods/`."""

    name: str  # its module's name: a value of compare_methods, and the `method` of each of its points
    label: str  # its row in the reports
    order: int  # where that row sits, smallest first: the FTM variants, then the other methods
    points: Callable[[MethodContext], list[GridPoint]]  # its grid, from the compare's context
    arguments: type | None = None  # its own knobs: a dataclass, one `--help` group (methods may share one)
    edits_block: bool = False  # whether its points edit the compare's block (`compare_block`)
    grid: str | None = None  # its key of compare_deltas, when it has a δ grid of its own

    def grid_points(self, context: MethodContext) -> list[GridPoint]:
        """Its points, each marked as made by this method."""
        return [dataclasses.replace(point, method=self.name) for point in self.points(context)]
