"""FTM in the Fisher ellipsoid on the compare's block; by default each δ is the smallest ellipsoid holding an L∞ box
of the L∞ grid: δ²ΣF over the block's diagonal Fisher at θ0."""

from ..grid_point import GridPoint
from ..method import Method, MethodContext


def points(context: MethodContext) -> list[GridPoint]:
    total = sum(float(fisher.sum()) for fisher in context.runner.fisher(context.block).values())
    deltas = context.grids.get("fisher") or [delta * delta * total for delta in context.linf]
    return [
        GridPoint(norm="fisher", block=context.block, delta=delta, settings={"preserve_objective": "none"})
        for delta in deltas
    ]


METHOD = Method(name="ftm_fisher", label="FTM, Fisher", order=40, points=points, edits_block=True, grid="fisher")
