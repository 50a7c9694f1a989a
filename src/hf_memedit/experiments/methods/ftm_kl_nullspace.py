"""Both ways of keeping what the model knew at once, on the compare's block: the KL objective on same-relation
neighbours (the facts that leak) and the whole block's updates kept out of the directions ordinary text uses
(general drift), one point per δ and share of the keys' energy removed."""

from ...keys import keys_corpus
from ..grid_point import GridPoint
from ..method import Method, MethodContext
from .ftm_nullspace import NullspaceArguments


ENERGIES = (0.9, 0.8)  # where ftm_nullspace alone still learns the edits


def points(context: MethodContext) -> list[GridPoint]:
    settings = {
        "preserve_objective": "kl",
        "key_constraint": "nullspace",
        "preserve_corpus": keys_corpus(context.args.preserve_corpus, context.model),
    }
    return [
        GridPoint(norm="linf", block=context.block, delta=delta, settings={**settings, "nullspace_energy": energy})
        for delta in context.linf
        for energy in context.arguments.nullspace_energies or ENERGIES
    ]


METHOD = Method(
    name="ftm_kl_nullspace",
    label="FTM + KL on neighbours + null space, L∞",
    order=90,
    points=points,
    arguments=NullspaceArguments,
    edits_block=True,
)
