"""L∞ on the compare's block with same-relation neighbours in every batch, scored by KL(θ0 ‖ θ) of their next-token
distribution (`preserve_objective: kl`); for a causal LM also with EOS appended to the edit targets, so that
greedy generation stops after the object."""

from ...architectures import model_kind
from ..grid_point import GridPoint
from ..method import Method, MethodContext


def points(context: MethodContext) -> list[GridPoint]:
    eos = [{"eos_target": True}] if model_kind(context.model).generates else []
    return [
        GridPoint(norm="linf", block=context.block, delta=delta, settings={"preserve_objective": "kl", **extra})
        for delta in context.linf
        for extra in [{}] + eos
    ]


METHOD = Method(name="ftm_kl", label="FTM + KL to θ0 on neighbours, L∞", order=70, points=points, edits_block=True)
