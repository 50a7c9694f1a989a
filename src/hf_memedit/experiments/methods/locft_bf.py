"""LocFT-BF (Yang et al., ICLR 2026; ICT-STAR/LocFT): one MLP output projection, unconstrained, Adam at 5e-4, batch
100, 25 epochs, a batch below loss 1e-2 skipped, early stop at epoch-mean loss 1e-2, their per-fact loss; their
layer swept (`locft_blocks`), and EOS appended to the targets of a causal LM, as theirs."""

from dataclasses import dataclass, field

from ...architectures import model_kind, num_blocks
from ..grid_point import GridPoint
from ..method import Method, MethodContext


@dataclass
class LocftArguments:
    """LocFT-BF's layers."""

    _argument_group_name = "method locft_bf (LocftArguments)"

    locft_blocks: list[str] | None = field(
        default=None,
        metadata={
            "help": "memedit compare: the layers LocFT-BF is swept over "
            "(default: at 20, 45 and 70 percent of the depth)."
        },
    )


SETTINGS = {
    "edit_modules": ["mlp_out"],
    "learning_rate": 5e-4,
    "per_device_train_batch_size": 100,
    "num_train_epochs": 25,
    "max_steps": -1,
    "skip_below_loss": 1e-2,
    "stop_at_epoch_loss": 1e-2,
    "loss_reduction": "sequence",
    "preserve_objective": "none",
}
DEPTHS = (0.2, 0.45, 0.7)  # default layers, as shares of the depth (their picks: 22 of 32, 6 of 28)


def points(context: MethodContext) -> list[GridPoint]:
    model = context.model
    depth = num_blocks(model, context.args.block_selector_config().layout(model))
    blocks = context.arguments.locft_blocks or sorted({str(round(d * (depth - 1))) for d in DEPTHS}, key=int)
    eos = model_kind(context.model).generates
    return [
        GridPoint(norm="none", block=block, delta=None, settings={**SETTINGS, "eos_target": eos}) for block in blocks
    ]


METHOD = Method(name="locft_bf", label="LocFT-BF (ICLR 2026)", order=100, points=points, arguments=LocftArguments)
