"""FTM with no constraint (the paper's δ = ∞) on the compare's block."""

from ..grid_point import GridPoint
from ..method import Method, MethodContext


def points(context: MethodContext) -> list[GridPoint]:
    return [GridPoint(norm="none", block=context.block, delta=None, settings={"preserve_objective": "none"})]


METHOD = Method(name="ftm_unconstrained", label="FTM, unconstrained", order=20, points=points, edits_block=True)
