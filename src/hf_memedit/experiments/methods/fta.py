"""FTA (the paper's): L∞ on the compare's block with as many unmodified as modified evidences in every batch."""

from ..grid_point import GridPoint
from ..method import Method, MethodContext


SETTINGS = {"preserve_objective": "evidence", "preserve_ratio": 1.0, "preserve_weight": 1.0}


def points(context: MethodContext) -> list[GridPoint]:
    return [GridPoint(norm="linf", block=context.block, delta=delta, settings=SETTINGS) for delta in context.linf]


METHOD = Method(name="fta", label="FTA, L∞", order=50, points=points, edits_block=True)
