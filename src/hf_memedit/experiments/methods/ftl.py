"""FT-L as ROME and EasyEdit run it: the MLP output projection of `ftl_block`, lr 5e-4, 25 steps, early stop at loss
1e-2, its L∞ ε swept (5e-4 is theirs)."""

from dataclasses import dataclass, field

from ..grid_point import GridPoint
from ..method import Method, MethodContext


@dataclass
class FtlArguments:
    """FT-L's block."""

    _argument_group_name = "method ftl (FtlArguments)"

    ftl_block: str = field(
        default="0",
        metadata={"help": "memedit compare: the block whose MLP output FT-L trains (ROME's GPT-2 XL default: 0)."},
    )


SETTINGS = {
    "edit_modules": ["mlp_out"],
    "learning_rate": 5e-4,
    "max_steps": 25,
    "stop_at_loss": 1e-2,
    "preserve_objective": "none",
}
EPSILON = 5e-4  # ROME's


def points(context: MethodContext) -> list[GridPoint]:
    deltas = context.grids.get("ftl") or sorted({EPSILON, *context.linf})
    return [
        GridPoint(norm="linf", block=context.arguments.ftl_block, delta=delta, settings=SETTINGS) for delta in deltas
    ]


METHOD = Method(name="ftl", label="FT-L (ROME/EasyEdit)", order=110, points=points, arguments=FtlArguments, grid="ftl")
