"""FTM under L∞ over δ × blocks (`sweep_deltas` × `sweep_blocks`): the paper's method. With `compare_block: auto`
its best point on validation gives the compare its block, so these points train first (`compare.choose_block`)."""

from ..grid_point import GridPoint
from ..method import Method, MethodContext


def points(context: MethodContext) -> list[GridPoint]:
    return [
        GridPoint(norm="linf", block=block, delta=delta, settings={"preserve_objective": "none"})
        for block in context.blocks
        for delta in context.linf
    ]


METHOD = Method(name="ftm_linf", label="FTM, L∞", order=10, points=points, grid="linf")
