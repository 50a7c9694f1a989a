"""L∞ on the compare's block ∩ the null space of the preserved keys: AlphaEdit's own choice (the block's MLP output
projection, absolute threshold), then every linear layer of the block with the directions holding
`nullspace_energies` of the keys' second moment removed (a threshold fit for one model can leave another no null
space at all). A masked LM cannot sample its own corpus: its keys come from the preservation facts."""

from dataclasses import dataclass, field

from ...keys import keys_corpus
from ..grid_point import GridPoint
from ..method import Method, MethodContext


@dataclass
class NullspaceArguments:
    """The null-space methods' grid (ftm_nullspace and ftm_kl_nullspace)."""

    _argument_group_name = "methods ftm_nullspace, ftm_kl_nullspace (NullspaceArguments)"
    _unkeyed = ("nullspace_energies",)  # the grid: each point carries its own

    nullspace_energies: list[float] | None = field(
        default=None,
        metadata={
            "help": "memedit compare: the shares of the preserved keys' second moment that ftm_nullspace and "
            "ftm_kl_nullspace remove from the whole block's updates, each one point per δ (default: 0.99 0.9 0.8 "
            "and 0.9 0.8; less removed learns more and keeps less)."
        },
    )

    def __post_init__(self):
        bad = [value for value in self.nullspace_energies or () if not 0 < value < 1]
        if bad:
            raise ValueError(f"nullspace_energies are shares of the keys' energy removed, each in (0, 1), got {bad}.")


ENERGIES = (0.99, 0.9, 0.8)  # the shares of E[k kᵀ] removed from the whole block's updates


def points(context: MethodContext) -> list[GridPoint]:
    base = {
        "preserve_objective": "none",
        "key_constraint": "nullspace",
        "preserve_corpus": keys_corpus(context.args.preserve_corpus, context.model),
    }
    energies = context.arguments.nullspace_energies or ENERGIES
    return [
        GridPoint(norm="linf", block=context.block, delta=delta, settings={**base, **extra})
        for delta in context.linf
        for extra in [{"edit_modules": ["mlp_out"]}] + [{"nullspace_energy": energy} for energy in energies]
    ]


METHOD = Method(
    name="ftm_nullspace",
    label="FTM + null space (AlphaEdit's projection), L∞",
    order=80,
    points=points,
    arguments=NullspaceArguments,
    edits_block=True,
)
