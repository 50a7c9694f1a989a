"""The editing methods `memedit compare` runs, as one table: name → label and how its points are made.

As ROME's `ALG_DICT` and PEFT's method registry, a method registers itself with `@method(name,
label)`; `memedit compare` and `compare_methods` take the table as it is. A method gets the
compare's `MethodContext` and `edit(GridPoint) -> row` (which trains a point once and caches it in
points.jsonl) and returns its rows. `ftm_linf` runs first and picks the block the others use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..architectures import model_kind, num_blocks
from .points import GridPoint, point_of
from .reports import VALIDATION, best


if TYPE_CHECKING:
    from ..edit_config import EditConfig
    from .grid import GridRunner
    from .job_config import JobConfig

FTL = {"modules": ["mlp_out"], "learning_rate": 5e-4, "max_steps": 25, "stop_at_loss": 1e-2}  # ROME's FT-L
FTL_DELTA = 5e-4
# LocFT-BF (Yang et al., ICLR 2026; ICT-STAR/LocFT): one MLP output projection, unconstrained, Adam at 5e-4,
# batch 100, 25 epochs, a batch below loss 1e-2 skipped, early stop at epoch-mean loss 1e-2, their per-fact loss.
LOCFT = {"modules": ["mlp_out"], "learning_rate": 5e-4, "per_device_train_batch_size": 100, "num_train_epochs": 25,
         "max_steps": -1, "skip_below_loss": 1e-2, "stop_at_epoch_loss": 1e-2, "loss_reduction": "sequence",
         "preserve": "none"}
LOCFT_DEPTHS = (0.2, 0.45, 0.7)  # default layers, as shares of the depth (their picks: 22 of 32, 6 of 28)
NULLSPACE_ENERGIES = (0.99, 0.9, 0.8)  # ftm_nullspace on the whole block: the shares of E[k kᵀ] removed
KL_NULLSPACE_ENERGIES = (0.9, 0.8)  # ftm_kl_nullspace: where ftm_nullspace alone still learns the edits


@dataclass
class MethodContext:
    """What every method of one compare shares: the job, its grid runner, the L∞ δ grid and the block."""

    job: JobConfig
    args: EditConfig
    runner: GridRunner
    linf: list[float]  # compare_deltas['linf'], else sweep_deltas, else δ
    grids: dict[str, list[float]]  # compare_deltas
    block: str  # ftm_linf's best block once it ran, else the first of edit_blocks


@dataclass(frozen=True)
class Method:
    label: str
    run: Callable[[MethodContext, Callable[[GridPoint], dict]], list[dict]]


METHODS: dict[str, Method] = {}


def method(name: str, label: str):
    """Register a compare method under `name` (in the order the compare runs them)."""

    def register(run):
        METHODS[name] = Method(label, run)
        return run

    return register


@method("ftm_linf", "FTM, L∞")
def _ftm_linf(ctx: MethodContext, edit) -> list[dict]:
    """δ × blocks under L∞; its best block on validation becomes the others' block."""
    rows = [
        edit(GridPoint(norm="linf", block=str(block), delta=delta, preserve="none"))
        for block in ctx.job.sweep_blocks or list(ctx.args.edit_blocks) for delta in ctx.linf
    ]
    ctx.block = point_of(best(rows, VALIDATION, ctx.job.pick_min_retention)).block
    return rows


@method("ftm_unconstrained", "FTM, unconstrained")
def _ftm_unconstrained(ctx: MethodContext, edit) -> list[dict]:
    return [edit(GridPoint(norm="none", block=ctx.block, delta=None, preserve="none"))]


@method("ftm_l2", "FTM, L2")
def _ftm_l2(ctx: MethodContext, edit) -> list[dict]:
    """By default the smallest L2 ball holding each L∞ box: δ√n."""
    size = ctx.runner.selection_size(ctx.block)
    deltas = ctx.grids.get("l2") or [d * size**0.5 for d in ctx.linf]
    return [edit(GridPoint(norm="l2", block=ctx.block, delta=delta, preserve="none")) for delta in deltas]


@method("ftm_fisher", "FTM, Fisher")
def _ftm_fisher(ctx: MethodContext, edit) -> list[dict]:
    """By default the smallest Fisher ellipsoid holding each L∞ box: δ²ΣF."""
    total = sum(float(f.sum()) for f in ctx.runner.fisher(ctx.block).values())
    deltas = ctx.grids.get("fisher") or [d * d * total for d in ctx.linf]
    return [edit(GridPoint(norm="fisher", block=ctx.block, delta=delta, preserve="none")) for delta in deltas]


@method("fta", "FTA, L∞")
def _fta(ctx: MethodContext, edit) -> list[dict]:
    return [edit(GridPoint(norm="linf", block=ctx.block, delta=delta, preserve="evidence", preserve_ratio=1.0,
                  preserve_weight=1.0)) for delta in ctx.linf]  # the paper's: as many unmodified as modified


@method("ftm_answers", "FTM + θ0's answers, L∞")
def _ftm_answers(ctx: MethodContext, edit) -> list[dict]:
    """L∞ with known same-relation neighbours (labelled with θ0's own answers) in every batch."""
    return [edit(GridPoint(norm="linf", block=ctx.block, delta=delta, preserve="answers")) for delta in ctx.linf]


@method("ftm_kl", "FTM + KL to θ0 on neighbours, L∞")
def _ftm_kl(ctx: MethodContext, edit) -> list[dict]:
    """L∞ with same-relation neighbours in every batch, scored by KL(θ0 ‖ θ) of their next-token distribution;
    for a causal LM also with EOS appended to the edit targets, so that greedy generation stops after the object."""
    eos = [{"eos_target": True}] if model_kind(ctx.runner.model).generates else []
    return [edit(GridPoint(norm="linf", block=ctx.block, delta=delta, preserve="kl", **extra))
            for delta in ctx.linf for extra in [{}] + eos]


def _key_corpus(ctx: MethodContext) -> str:
    """The preserved keys' corpus: a masked LM cannot sample its own, so it takes the preservation facts."""
    corpus = ctx.args.preserve_corpus
    return "benchmark" if corpus == "samples" and not model_kind(ctx.runner.model).generates else corpus


@method("ftm_nullspace", "FTM + null space (AlphaEdit's projection), L∞")
def _ftm_nullspace(ctx: MethodContext, edit) -> list[dict]:
    """L∞ ∩ the null space of the preserved keys: AlphaEdit's own choice (the block's MLP output projection,
    absolute threshold 2e-2), then every linear layer of the block with the directions holding
    `nullspace_energies` (default `NULLSPACE_ENERGIES`) of the keys' second moment removed (a threshold fit for
    one model can leave another no null space at all). A masked LM cannot sample its own corpus: its keys come
    from the preservation facts."""
    corpus = _key_corpus(ctx)
    point = GridPoint(norm="linf", block=ctx.block, preserve="none", keys="nullspace", preserve_corpus=corpus)
    return [
        edit(dataclasses.replace(point, delta=delta, **extra))
        for delta in ctx.linf
        for extra in [{"modules": ["mlp_out"]}]
        + [{"nullspace_energy": energy} for energy in ctx.job.nullspace_energies or NULLSPACE_ENERGIES]
    ]


@method("ftm_kl_nullspace", "FTM + KL on neighbours + null space, L∞")
def _ftm_kl_nullspace(ctx: MethodContext, edit) -> list[dict]:
    """Both ways of keeping what the model knew at once: the KL objective on same-relation neighbours (the facts
    that leak) and the whole block's updates kept out of the directions ordinary text uses (general drift)."""
    corpus = _key_corpus(ctx)
    return [
        edit(GridPoint(norm="linf", block=ctx.block, delta=delta, preserve="kl", keys="nullspace",
              preserve_corpus=corpus, nullspace_energy=energy))
        for delta in ctx.linf for energy in ctx.job.nullspace_energies or KL_NULLSPACE_ENERGIES
    ]


@method("locft_bf", "LocFT-BF (ICLR 2026)")
def _locft_bf(ctx: MethodContext, edit) -> list[dict]:
    """Their recipe with their layer swept (`locft_blocks`; default 20%, 45% and 70% of the depth); EOS is
    appended to the targets of a causal LM, as theirs."""
    model = ctx.runner.model
    depth = num_blocks(model, ctx.args.block_selector_config().layout(model))
    blocks = ctx.job.locft_blocks or sorted({str(round(d * (depth - 1))) for d in LOCFT_DEPTHS}, key=int)
    eos = model_kind(model).generates
    return [edit(GridPoint(norm="none", block=str(block), delta=None, **LOCFT, eos_target=eos)) for block in blocks]


@method("ftl", "FT-L (ROME/EasyEdit)")
def _ftl(ctx: MethodContext, edit) -> list[dict]:
    deltas = ctx.grids.get("ftl") or sorted({FTL_DELTA, *ctx.linf})
    return [
        edit(GridPoint(norm="linf", block=str(ctx.job.ftl_block), delta=delta, preserve="none", **FTL))
        for delta in deltas
    ]


@method("knn", "kNN-LM")
def _knn(ctx: MethodContext, edit) -> list[dict]:
    """No training: the ε sweep of the datastore (its rows carry their own points)."""
    return ctx.runner.knn(ctx.job.knn_epsilons, ctx.job.knn_metric)
