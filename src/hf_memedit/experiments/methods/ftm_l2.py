"""FTM under L2 on the compare's block; by default each δ is the smallest L2 ball holding an L∞ box of the L∞ grid:
δ√n for the block's n parameters, so the scales match."""

from ..grid_point import GridPoint
from ..method import Method, MethodContext


def points(context: MethodContext) -> list[GridPoint]:
    size = context.runner.selection_size(context.block)
    deltas = context.grids.get("l2") or [delta * size**0.5 for delta in context.linf]
    return [
        GridPoint(norm="l2", block=context.block, delta=delta, settings={"preserve_objective": "none"})
        for delta in deltas
    ]


METHOD = Method(name="ftm_l2", label="FTM, L2", order=30, points=points, edits_block=True, grid="l2")
