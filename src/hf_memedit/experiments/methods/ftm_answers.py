"""L∞ on the compare's block with known same-relation neighbours, labelled with θ0's own answers, in every batch
(`preserve_objective: answers`)."""

from ..grid_point import GridPoint
from ..method import Method, MethodContext


def points(context: MethodContext) -> list[GridPoint]:
    return [
        GridPoint(norm="linf", block=context.block, delta=delta, settings={"preserve_objective": "answers"})
        for delta in context.linf
    ]


METHOD = Method(name="ftm_answers", label="FTM + θ0's answers, L∞", order=60, points=points, edits_block=True)
