"""Projection onto the norm ball ||θ − θ0|| ≤ δ (the paper's constrained fine-tuning), and onto the
preserved-key sets, alone or intersected with the ball.

The projections are exact Euclidean nearest points of the ball:
L∞ clamps every element into [θ0 − δ, θ0 + δ]; L2 rescales Δ = θ − θ0 by min(1, δ / ||Δ||₂),
either over all trainable tensors together (the paper's θ) or tensor by tensor.
`fisher` projects onto the paper's Appendix C ellipsoid Σᵢ Fᵢ Δᵢ² ≤ δ, F the diagonal Fisher
information at θ0 (see `hf_memedit.fisher`).

Key constraints, on the second moment C = E[k kᵀ] of each edited linear layer's inputs
(`hf_memedit.keys`); parameters of the edited modules that have no keys (biases, norms) stay at θ0:
- `nullspace` (AlphaEdit): ΔW = ΔW P with P = ÛÛᵀ (applied through its thinner factor), Û the eigenvectors of C with
  eigenvalue below `nullspace_threshold` (or outside a kept-energy fraction): exact, a linear subspace. A stream's
  earlier edits can add their keys (`KeyProjector(edits=...)`): their directions are removed by the same rule.
- `output`: E‖ΔW k‖² = tr(ΔW C ΔWᵀ) ≤ ρ·tr(W0 C W0ᵀ) per layer, projected exactly in C's eigenbasis
  by the same 1-D multiplier search as the Fisher ellipsoid.
With a ball as well: L2 (global) ∩ nullspace is exact (project onto the subspace, then rescale). Every other ball
∩ nullspace runs Dykstra's iteration on Δ in float64 as gradient ascent on its dual with Anderson mixing
(`NormBallProjector._dykstra_nullspace`), stopped on a duality-gap certificate; L∞ runs it weight row by weight row,
each row stopped on its own (`_linf_nullspace`: both sets act on rows alone); ball ∩ output runs Dykstra's
alternating projections, stopped once an iteration changes the iterate and both correction terms by at most
`projection_tolerance` × the distance projected. Either stops after `projection_iterations` at most; the projector
records which (`dykstra_iterations`, `dykstra_converged`). The result lies on the key set; Δ is then scaled toward
θ0 until the stored values lie in the ball, which keeps it in the key set (a subspace or an ellipsoid around θ0),
and how far that moved it is recorded (`dykstra_pull_in`, relative to the update): the result lies in both sets,
and it is the nearest point of their intersection up to the tolerance when the run converged. In half precision a
subspace is met up to the rounding of the stored values; every other set is checked after rounding.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .sharding import all_reduce_, is_sharded, like, local


logger = logging.getLogger(__name__)


NORMS = ("linf", "l2", "fisher", "none")
L2_SCOPES = ("global", "per_tensor")
KEY_CONSTRAINTS = ("none", "nullspace", "output")
# A quadratic constraint re-evaluated on stored float64 values carries the evaluation's own rounding: a point is in
# the set when it meets it to this relative precision (storing in float32 or bfloat16 errs by far more, and is fixed).
FLOAT64_SLACK = 1e-12


@torch.no_grad()
def project_linf_(param: torch.Tensor, theta0: torch.Tensor, delta: float) -> None:
    """Clamp `param` in place into the box θ0 ± δ (idempotent: the bounds are recomputed identically)."""
    param.clamp_(*linf_bounds(theta0, delta))


def linf_bounds(theta0: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The box θ0 ± δ as (lower, upper) tensors in θ0's dtype: what the L∞ projection clamps to.

    Each bound is the value of that dtype nearest θ0 ± δ on θ0's side, so |θ − θ0| ≤ δ holds exactly
    for the stored values, in bfloat16 or float16 as in float32 (rounding θ0 + δ to the nearest value
    can step outside the box by half a unit in the last place). Where δ is below the dtype's resolution
    at |θ0|, both bounds are θ0 itself: see `frozen_by_resolution`.
    """
    if theta0.dtype == torch.float64:  # |θ − θ0| is measured in float64 itself: its rounding decides
        lower, upper = theta0 - delta, theta0 + delta
        lower = torch.where(theta0 - lower > delta, torch.nextafter(lower, theta0), lower)
        upper = torch.where(upper - theta0 > delta, torch.nextafter(upper, theta0), upper)
        return lower, upper
    exact = theta0.double()
    lower, upper = (exact - delta).to(theta0.dtype), (exact + delta).to(theta0.dtype)
    lower = torch.where(lower.double() < exact - delta, torch.nextafter(lower, theta0), lower)
    upper = torch.where(upper.double() > exact + delta, torch.nextafter(upper, theta0), upper)
    return lower, upper


def frozen_by_resolution(theta0: torch.Tensor, delta: float) -> int:
    """How many entries of θ0 cannot move at all within ±δ in their dtype (its next value either way is
    farther than δ): an L∞ edit leaves them at θ0 whatever the optimizer does."""
    lower, upper = linf_bounds(theta0, delta)
    return int(((lower == theta0) & (upper == theta0)).sum())


@torch.no_grad()
def check_resolution(theta0: Mapping[str, torch.Tensor], delta: float) -> None:
    """A δ below the stored dtype's resolution freezes weights silently: refuse it when nothing could move, say
    how much when part of the selection cannot."""
    stuck = sum(frozen_by_resolution(value, delta) for value in theta0.values())
    if not stuck:
        return
    total = sum(value.numel() for value in theta0.values())
    dtypes = sorted({str(value.dtype).replace("torch.", "") for value in theta0.values()})
    what = (
        f"δ={delta:g} is below {'/'.join(dtypes)}'s resolution at the magnitude of {stuck:,d} of the "
        f"{total:,d} selected weights ({stuck / total:.1%})"
    )
    if stuck == total:
        raise ValueError(
            f"{what}: no weight can move, so the edit would change nothing. Raise delta, or load "
            "the model in float32 (torch_dtype: float32)."
        )
    logger.warning(
        "%s: those stay at θ0. Raise delta, or load the model in float32 (torch_dtype: float32), to let them move.",
        what,
    )


@torch.no_grad()
def l2_distance(params: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """||θ − θ0||₂ over all the given tensors together, accumulated in float64 (FSDP2 shards: one all-reduce)."""
    device = local(next(iter(params.values()))).device
    sharded, plain = (
        torch.zeros((), dtype=torch.float64, device=device),
        torch.zeros((), dtype=torch.float64, device=device),
    )
    for name, param in params.items():
        square = (local(param).double() - local(theta0[name]).double()).pow(2).sum().to(device)
        if is_sharded(param):
            sharded += square
        else:
            plain += square
    return (all_reduce_(sharded, params.values(), dist.ReduceOp.SUM) + plain).sqrt()


@torch.no_grad()
def project_l2_(params: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor], delta: float) -> None:
    """Rescale Δ of all the given tensors together so that ||Δ||₂ ≤ δ, for the stored values.

    The norm is measured in float64; storing θ0 + sΔ rounds, which in bfloat16 can leave the result a
    little outside, so the rescale repeats, each time by a further unit of the dtype's rounding, until
    the stored values lie in the ball (one pass in float32 and float64 but for rare last-bit cases).
    """
    rounding = max(torch.finfo(param.dtype).eps for param in params.values())
    for attempt in range(8):
        norm = l2_distance(params, theta0).item()
        if norm <= delta:
            return
        scale = delta / norm * (1 - attempt * rounding)
        for name, param in params.items():
            start, values = local(theta0[name]), local(param)
            values.copy_(start + (values - start) * scale)
    logger.warning(
        "The L2 projection stopped %.3g outside the ball after 8 rescales.", l2_distance(params, theta0).item() - delta
    )


@torch.no_grad()
def fisher_distance(
    params: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor], fisher: Mapping[str, torch.Tensor]
) -> float:
    """Σᵢ Fᵢ Δᵢ² over all the given tensors (float64): the paper's Appendix C constraint."""
    return float(
        sum((fisher[n].double() * (p.double() - theta0[n].double()).pow(2)).sum().item() for n, p in params.items())
    )


@torch.no_grad()
def project_fisher_(
    params: Mapping[str, torch.Tensor],
    theta0: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
    delta: float,
    iterations: int = 200,
) -> float:
    """Exact Euclidean projection onto the ellipsoid Σᵢ Fᵢ Δᵢ² ≤ δ (F ≥ 0, diagonal); returns λ.

    The nearest point is Δᵢ = Δ̂ᵢ / (1 + λ Fᵢ) with the λ ≥ 0 at which the constraint is tight,
    found by bisection on the decreasing g(λ) = Σ Fᵢ Δ̂ᵢ² / (1 + λ Fᵢ)²; the upper end of the final
    bracket is used, so the result always lies in the set.
    """
    steps = {n: p.double() - theta0[n].double() for n, p in params.items()}
    weights = {n: fisher[n].double().to(steps[n].device) for n in steps}
    if any(bool((w < 0).any()) for w in weights.values()):
        raise ValueError("The Fisher diagonal must be non-negative.")

    def g(lam: float) -> float:
        return float(
            sum((w * (d / (1 + lam * w)).pow(2)).sum().item() for w, d in zip(weights.values(), steps.values()))
        )

    if g(0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while g(high) > delta:
        low, high = high, high * 2
    for _ in range(iterations):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if g(middle) > delta else (low, middle)
    for name, param in params.items():
        param.copy_((theta0[name].double() + steps[name] / (1 + high * weights[name])).to(param.dtype))
    _shrink_into_ellipsoid_(params, theta0, weights, delta)
    return high


def _shrink_into_ellipsoid_(
    params: Mapping[str, torch.Tensor],
    theta0: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    delta: float,
) -> None:
    """Storing the projected point rounds it to the parameters' dtype, which in bfloat16 can leave Σ FΔ² above δ:
    scale the stored Δ toward θ0 until the stored values lie in the ellipsoid (a no-op in float64)."""
    for attempt in range(16):
        value = sum(float((weights[n] * (p.double() - theta0[n].double()).pow(2)).sum()) for n, p in params.items())
        if value <= delta * (1 + FLOAT64_SLACK):
            return
        rounding = max(torch.finfo(p.dtype).eps for p in params.values())
        scale = math.sqrt(delta / value) * (1 - (attempt + 1) * rounding)
        for name, param in params.items():
            start = theta0[name].double()
            param.copy_((start + (param.double() - start) * scale).to(param.dtype))
    raise RuntimeError(f"The Fisher projection could not store a point inside Σ FΔ² ≤ {delta:g} in {param.dtype}.")


@torch.no_grad()
def linf_distance(params: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor]) -> float:
    """max |θ − θ0| over all the given tensors, exact: the difference of the stored values in float64 (in their own
    dtype it rounds, and a hair outside the box would read as on it, as a package's verification would not)."""
    largest = torch.tensor(
        [
            max(
                float((local(param).double() - local(theta0[name]).double()).abs_().max())
                for name, param in params.items()
            )
        ],
        dtype=torch.float64,
        device=local(next(iter(params.values()))).device,
    )
    return float(all_reduce_(largest, params.values(), dist.ReduceOp.MAX))


@dataclass(frozen=True)
class NullSpace:
    """The subspace an update's rows may use: P = ÛÛᵀ, kept as its thinner factor. With k of n directions kept,
    ΔW P is applied as (ΔW Û) Ûᵀ when k ≤ n / 2, else as ΔW − (ΔW Ṽ) Ṽᵀ with Ṽ the n − k removed ones: two thin
    products instead of one [n, n] one (removing 70% of the keys' energy takes few directions)."""

    basis: torch.Tensor  # [n, j] float64, orthonormal: the kept directions, or the removed ones (`complement`)
    complement: bool

    @property
    def dimensions(self) -> int:
        """How many input directions an update may use."""
        n, j = self.basis.shape
        return n - j if self.complement else j

    def apply(self, step: torch.Tensor) -> torch.Tensor:
        """ΔW P for ΔW [out, n]."""
        basis = self.basis.to(step.device)
        thin = (step @ basis) @ basis.T
        return step - thin if self.complement else thin

    def __rmatmul__(self, step: torch.Tensor) -> torch.Tensor:
        """`step @ nullspace` reads as the math, ΔW P, computed through the thin factor (`apply`)."""
        return self.apply(step)

    def matrix(self) -> torch.Tensor:
        """P itself, [n, n] (for analysis and tests: `apply` never forms it)."""
        return self.apply(torch.eye(self.basis.shape[0], dtype=self.basis.dtype))


def nullspace_projector(
    moment: torch.Tensor,
    threshold: float | None = 2e-2,
    energy: float | None = None,
    edits: torch.Tensor | None = None,
) -> NullSpace:
    """The subspace of the eigen-directions of C below `threshold`, or, with `energy`, of the smallest ones that hold
    at most a 1 − energy share of C's trace (so `energy` of it is removed).

    `edits` is the second moment of keys whose outputs must be kept too (a stream's earlier edits: AlphaEdit's
    sequential rule). Restricted to the directions C leaves, its own eigen-directions are removed by the same rule,
    so an update keeps what the corpus's keys and the earlier edits' keys pass through the layer; with `energy`, the
    share is of the edits' whole trace, so what C's directions already remove of it counts (edits C covers remove
    nothing more).
    """
    values, vectors = torch.linalg.eigh(moment.double())
    keep = _kept(values, threshold, energy)
    if edits is not None:
        edits = edits.double().to(vectors.device)
        left = vectors[:, keep]  # orthonormal: what C leaves
        edit_values, edit_vectors = torch.linalg.eigh(left.T @ edits @ left)
        edit_keep = _kept(edit_values, threshold, energy, total=float(torch.trace(edits).clamp(min=0)))
        rotated = left @ edit_vectors  # orthonormal, and orthogonal to C's removed directions
        vectors = torch.cat([vectors[:, ~keep], rotated[:, ~edit_keep], rotated[:, edit_keep]], dim=1)
        keep = torch.arange(vectors.shape[1], device=keep.device) >= vectors.shape[1] - int(edit_keep.sum())
    kept = int(keep.sum())
    complement = kept > len(keep) / 2
    return NullSpace(vectors[:, ~keep if complement else keep].contiguous(), complement)


def _kept(
    values: torch.Tensor, threshold: float | None, energy: float | None, total: float | None = None
) -> torch.Tensor:
    """Which eigen-directions (values ascending) a null space keeps: `nullspace_projector`'s rule; with `energy`, the
    smallest ones holding at most a 1 − energy share of `total` (default: their own sum)."""
    if energy is not None:
        positive = values.clamp(min=0)
        return positive.cumsum(0) <= (1 - energy) * (float(positive.sum()) if total is None else total)
    return values < validate_delta(threshold, "nullspace_threshold")


def _step(param: torch.Tensor, theta0: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Δ = θ − θ0 in float64, as [out, in] (a Conv1D weight is stored [in, out])."""
    step = param.double() - theta0.double()
    return step.T if transposed else step


def _write(param: torch.Tensor, theta0: torch.Tensor, step: torch.Tensor, transposed: bool) -> None:
    param.copy_((theta0.double() + (step.T if transposed else step)).to(param.dtype))


@torch.no_grad()
def project_nullspace_(
    param: torch.Tensor, theta0: torch.Tensor, nullspace: NullSpace, transposed: bool = False
) -> None:
    """ΔW ← ΔW P: the nearest update whose output on every preserved key is unchanged (`nullspace_projector`)."""
    _write(param, theta0, nullspace.apply(_step(param, theta0, transposed)), transposed)


def output_radius(theta0: torch.Tensor, moment: torch.Tensor, rho: float, transposed: bool = False) -> float:
    """ρ·tr(W0 C W0ᵀ) = ρ·E‖W0 k‖²: the `output` constraint's bound for this layer."""
    weight = theta0.double().T if transposed else theta0.double()
    return float(rho * torch.einsum("oi,ij,oj->", weight, moment.double().to(weight.device), weight))


@torch.no_grad()
def project_output_(
    param: torch.Tensor,
    theta0: torch.Tensor,
    values: torch.Tensor,
    vectors: torch.Tensor,
    radius: float,
    transposed: bool = False,
) -> float:
    """Nearest update with tr(ΔW C ΔWᵀ) ≤ radius, C = V diag(λ) Vᵀ; returns the multiplier.

    In the eigenbasis D = ΔW V the set is the ellipsoid Σⱼ λⱼ ‖D₋ⱼ‖² ≤ radius (rotations keep
    distances), projected by `project_fisher_` with weight λⱼ on column j.
    """
    vectors = vectors.to(param.device)
    rotated = _step(param, theta0, transposed) @ vectors
    weights = values.clamp(min=0).to(param.device).expand_as(rotated)
    zero = torch.zeros_like(rotated)
    holder = {"d": rotated}
    multiplier = project_fisher_(holder, {"d": zero}, {"d": weights}, radius)
    step = holder["d"] @ vectors.T
    for attempt in range(16):  # stored in half precision, the rounded point can lie a hair outside: scale it in
        _write(param, theta0, step, transposed)
        stored = _step(param, theta0, transposed) @ vectors
        value = float((weights * stored.pow(2)).sum())
        if value <= radius * (1 + FLOAT64_SLACK):
            return multiplier
        step = _step(param, theta0, transposed) * (
            math.sqrt(radius / value) * (1 - (attempt + 1) * torch.finfo(param.dtype).eps)
        )
    raise RuntimeError(
        f"The output key projection could not store a point inside its radius {radius:g} in {param.dtype}."
    )


class KeyProjector:
    """Projects the edited parameters onto a preserved-key set (`nullspace` or `output`) around θ0.

    Built from `hf_memedit.keys.KeyStatistics`; the eigendecompositions are computed once.
    """

    def __init__(
        self,
        kind: str,
        moments: Mapping[str, torch.Tensor],
        layers: Mapping[str, tuple[str, bool]],
        names: list[str],
        theta0: Mapping[str, torch.Tensor],
        threshold: float | None = 2e-2,
        energy: float | None = None,
        rho: float = 1e-2,
        edits: Mapping[str, torch.Tensor] | None = None,
    ):
        """`edits`: per layer, the second moment of keys whose outputs an update must keep beside `moments`' (a
        stream's earlier edits; `nullspace` only, see `nullspace_projector`)."""
        if kind not in KEY_CONSTRAINTS or kind == "none":
            raise ValueError(f"Unknown key constraint {kind!r}: choose nullspace or output.")
        if energy is not None and not 0 < energy < 1:
            raise ValueError(f"nullspace_energy must lie in (0, 1), got {energy}.")
        validate_delta(rho, "output_rho")
        if edits is not None and kind != "nullspace":
            raise ValueError(f"Earlier edits' keys are kept by key_constraint nullspace only, not {kind!r}.")
        missing = sorted(set(layers) - set(moments))
        if missing:
            raise ValueError(
                f"The preserved keys hold no statistics for {missing[:3]}: they were made for other layers."
            )
        self.kind, self.layers, self.names = kind, dict(layers), list(names)
        self.frozen = [name for name in names if name not in layers]  # biases, norms: no keys, kept at θ0
        matrices = [name for name in self.frozen if theta0[name].dim() >= 2]
        if matrices:  # e.g. a mixture of experts' fused tensors: not a linear layer, so no keys of its own
            logger.warning(
                "key_constraint %s: %d trained tensors are not the weights of a linear layer (%s, ...) and stay "
                "at θ0; edit_modules can leave them out.",
                kind,
                len(matrices),
                matrices[0],
            )
        self.projectors: dict[str, NullSpace] = {}
        self.bases: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for name, (_, transposed) in self.layers.items():
            if kind == "nullspace":
                self.projectors[name] = nullspace_projector(
                    moments[name],
                    None if energy is not None else threshold,
                    energy,
                    edits[name] if edits is not None else None,
                )
            else:
                values, vectors = torch.linalg.eigh(moments[name].double())
                self.bases[name] = (values, vectors, output_radius(theta0[name], moments[name], rho, transposed))

    def kept_dimensions(self) -> dict[str, int]:
        """nullspace: per layer, how many input directions an update may still use."""
        return {name: nullspace.dimensions for name, nullspace in self.projectors.items()}

    @torch.no_grad()
    def project_(self, params: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor]) -> None:
        for name in self.frozen:
            params[name].copy_(theta0[name])
        for name, (_, transposed) in self.layers.items():
            if self.kind == "nullspace":
                project_nullspace_(params[name], theta0[name], self.projectors[name], transposed)
            else:
                values, vectors, radius = self.bases[name]
                project_output_(params[name], theta0[name], values, vectors, radius, transposed)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨a, b⟩ over every element, without a temporary the size of the tensors."""
    return float(torch.vdot(a.reshape(-1), b.reshape(-1)))


def _copy64(tensor: torch.Tensor) -> torch.Tensor:
    """A float64 copy (`.double()` of a float64 tensor is the tensor itself, which the next write would change)."""
    return tensor.detach().to(torch.float64, copy=True)


# How many past steps Anderson mixing combines in the null-space projection (more: fewer iterations, more memory).
ANDERSON_MEMORY = 3


class _AndersonMixing:
    """Type-II Anderson acceleration of the fixed-point step v ← v + f(v) for one [rows, columns] tensor, one
    least-squares fit per row.

    Keeps the last `memory` differences of f and of the plain step v + f (each [rows, memory, columns], float64) and
    returns v + f − Σᵢ γᵢ Δ(v + f)ᵢ, with γ per row the least-squares fit of f by the Δfᵢ (ridge-regularised). Rows
    can forget their history (`forget`: their next step is plain) and leave (`keep`: rows whose projection is done)."""

    def __init__(self, like: torch.Tensor, memory: int):
        self.memory, self.count, self.last = memory, 0, None
        self.dg = like.new_zeros(like.shape[0], memory, like.shape[1])
        self.df = like.new_zeros(like.shape[0], memory, like.shape[1])
        self.fresh = torch.ones(like.shape[0], dtype=torch.bool, device=like.device)  # rows with no last point

    def forget(self, rows: torch.Tensor) -> None:
        self.df[rows], self.dg[rows], self.fresh[rows] = 0, 0, True

    def keep(self, rows: torch.Tensor) -> None:
        self.df, self.dg, self.fresh = self.df[rows], self.dg[rows], self.fresh[rows]
        if self.last is not None:
            self.last = (self.last[0][rows], self.last[1][rows])

    def step(self, v: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        plain = v + f
        if self.last is not None:
            slot = self.count % self.memory
            torch.sub(f, self.last[1], out=self.df[:, slot])
            torch.sub(plain, self.last[0], out=self.dg[:, slot])
            if bool(self.fresh.any()):  # no last point: no difference either
                self.df[self.fresh, slot], self.dg[self.fresh, slot] = 0, 0
            self.count += 1
        self.last = (plain, f)
        self.fresh.zero_()
        filled = min(self.count, self.memory)
        if filled == 0:
            return plain
        df, dg = self.df[:, :filled], self.dg[:, :filled]
        gram = df @ df.transpose(1, 2)  # [rows, k, k]
        ridge = 1e-10 * gram.diagonal(dim1=1, dim2=2).sum(-1) + 1e-200  # a row that stopped changing: γ = 0
        gram = gram + ridge[:, None, None] * torch.eye(filled, dtype=gram.dtype, device=gram.device)
        gamma = torch.linalg.solve(gram, df @ f.unsqueeze(-1))  # [rows, k, 1]
        return torch.baddbmm(plain.unsqueeze(1), gamma.transpose(1, 2), dg, alpha=-1).squeeze(1)


class NormBallProjector:
    """Holds θ0 and projects a set of parameters back onto the δ-ball around it.

    `theta0` is kept on the parameters' device (moved lazily, since the Trainer may move the
    model after the snapshot was taken).
    """

    def __init__(
        self,
        params: Mapping[str, torch.nn.Parameter],
        theta0: Mapping[str, torch.Tensor],
        norm: str,
        delta: float | None,
        l2_scope: str = "global",
        fisher: Mapping[str, torch.Tensor] | None = None,
        keys: KeyProjector | None = None,
        iterations: int = 100,
        tolerance: float = 1e-6,
        check_dtype: bool = True,
    ):
        """`check_dtype=False` skips `check_resolution` (δ against θ0's dtype) for a caller that ran it already."""
        validate_constraint(norm, delta, l2_scope)
        missing = sorted(set(params) - set(theta0))
        if missing:
            raise ValueError(f"θ0 has no snapshot of {missing[:5]}: it was taken for other parameters.")
        self.params = dict(params)
        self.theta0 = {name: theta0[name] for name in self.params}
        if norm == "fisher" and (fisher is None or set(fisher) != set(self.params)):
            raise ValueError("norm 'fisher' needs the Fisher diagonal of exactly the trainable parameters.")
        self.norm, self.delta, self.l2_scope = norm, delta, l2_scope
        self.fisher = dict(fisher) if fisher is not None else None
        self.num_projections = 0
        self._bounds: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # L∞: per θ0 tensor, its box
        if keys is not None and (iterations < 1 or not tolerance > 0):
            raise ValueError(
                f"projection_iterations must be ≥ 1 and projection_tolerance > 0, got {iterations} and {tolerance}."
            )
        self.keys, self.iterations, self.tolerance = keys, iterations, tolerance
        self.dykstra_iterations = 0  # the last Dykstra run: its iterations, whether they settled, and the pull-in
        self.dykstra_converged = True
        self.dykstra_pull_in = 0.0
        self.dykstra_excess = 0.0  # how far outside the ball the last Dykstra iterate lay, before the pull-in
        self.capped_projections = 0  # projections whose Dykstra run ended on the iteration cap
        if norm == "linf" and check_dtype:
            check_resolution(self.theta0, delta)

    def rebind(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Project these parameters from now on (the same names): after FSDP2's `fully_shard` replaced them
        with sharded ones, whose θ0 is then laid out like them."""
        missing = sorted(set(self.params) - set(params))
        if missing:
            raise ValueError(f"The wrapped model has no parameter {missing[0]!r} of the edit: it cannot be projected.")
        self.params = {name: params[name] for name in self.params}
        self._bounds.clear()

    def theta0_like_params(self) -> dict[str, torch.Tensor]:
        """θ0 on the parameters' devices and in their dtype and layout (sharded like them under FSDP2)."""
        for name, param in self.params.items():
            start = self.theta0[name]
            if (
                is_sharded(param) != is_sharded(start)
                or local(start).device != local(param).device
                or start.dtype != param.dtype
            ):
                self.theta0[name] = like(param, start)
        return self.theta0

    @torch.no_grad()
    def project_(self) -> None:
        """Project the parameters in place onto the ball (∩ the key set); a no-op for `none` without keys."""
        if self.keys is None:
            self._project_ball()
            return
        theta0 = self.theta0_like_params()
        if self.norm == "none":
            self.keys.project_(self.params, theta0)
        elif self.norm == "l2" and self.l2_scope == "global" and self.keys.kind == "nullspace":
            self.keys.project_(self.params, theta0)
            project_l2_(self.params, theta0, self.delta)  # a ball around θ0 and a subspace through it: exact
        elif self.keys.kind == "nullspace" and self.norm == "linf":
            self._linf_nullspace(theta0)
        elif self.keys.kind == "nullspace":
            self._dykstra_nullspace(theta0)
        else:
            self._dykstra(theta0)
        self.num_projections += 1

    def _dykstra(self, theta0: Mapping[str, torch.Tensor]) -> None:
        """Dykstra's alternating projections onto ball ∩ key set, ending on the key set, then pulled into the ball.

        Stops once one iteration moves the iterate and both correction terms together by at most `tolerance` × how
        far the iterate lies from the point being projected (Euclidean; a feasible iterate is not enough: the first
        one often is, long before it is nearest), or after `iterations`; `dykstra_converged` says which.
        """
        y = {name: _copy64(param) for name, param in self.params.items()}
        start = {name: value.clone() for name, value in y.items()}
        p = {name: torch.zeros_like(value) for name, value in y.items()}
        q = {name: torch.zeros_like(value) for name, value in y.items()}
        self.dykstra_converged = False
        for iteration in range(1, self.iterations + 1):
            for name, param in self.params.items():
                param.copy_(y[name] + p[name])
            self._project_ball(count=False)
            a = {name: _copy64(param) for name, param in self.params.items()}
            for name, param in self.params.items():
                param.copy_(a[name] + q[name])
            self.keys.project_(self.params, theta0)
            change, size = 0.0, 0.0
            for name, param in self.params.items():
                x = _copy64(param)
                p_next, q_next = y[name] + p[name] - a[name], a[name] + q[name] - x
                change += float(
                    (x - y[name]).pow(2).sum() + (p_next - p[name]).pow(2).sum() + (q_next - q[name]).pow(2).sum()
                )
                size += float((x - start[name]).pow(2).sum())
                y[name], p[name], q[name] = x, p_next, q_next
            self.dykstra_iterations = iteration
            if math.sqrt(change) <= self.tolerance * max(math.sqrt(size), torch.finfo(torch.float64).tiny):
                self.dykstra_converged = True
                break
        if not self.dykstra_converged:
            self._warn_capped()
        before = {name: _copy64(param) for name, param in self.params.items()}
        self.dykstra_excess = self.excess()
        self._pull_into_ball()
        moved = sum(float((_copy64(param) - before[name]).pow(2).sum()) for name, param in self.params.items())
        size = sum(float((value - theta0[name].double()).pow(2).sum()) for name, value in before.items())
        self.dykstra_pull_in = math.sqrt(moved / size) if size > 0 else 0.0

    def _dykstra_nullspace(self, theta0: Mapping[str, torch.Tensor]) -> None:
        """Ball ∩ null space, on Δ = θ − θ0 in float64: Dykstra's iteration kept to the correction term that matters.

        The null space S is a subspace, so its own correction never changes the point it projects, and Dykstra
        reduces to gradient ascent on the dual g(v) = min over the ball of ½‖Δ − Z‖² + ⟨v, Δ⟩, v ∈ S⊥: the ball's
        point a = P_ball(Z − v), then v ← v + P_S⊥(a). Anderson mixing of the last `ANDERSON_MEMORY` steps, weight
        row by weight row, takes it there in a third of the iterations; a mixed step that would lower g is replaced
        by the plain one, which never does, so it converges wherever Dykstra does. P_S(a) scaled into the ball is in
        both sets, and ½‖it − Z‖² − g(v) ≥ ½‖it − nearest‖² certifies it: the run stops once that gap is at most
        `tolerance` × ½‖it − Z‖², or after `iterations`.
        """
        keys = self.keys
        for name in keys.frozen:  # biases, norms: no keys, kept at θ0
            self.params[name].copy_(theta0[name])
        layers = {name: transposed for name, (_, transposed) in keys.layers.items()}
        target = {  # [out, in], contiguous (a Conv1D weight's view is transposed)
            name: _step(self.params[name], theta0[name], transposed).contiguous()
            for name, transposed in layers.items()
        }
        weights = (
            {name: self.fisher[name].double().T if t else self.fisher[name].double() for name, t in layers.items()}
            if self.norm == "fisher"
            else None
        )
        v = {name: torch.zeros_like(step) for name, step in target.items()}
        squares = {name: _dot(step, step) for name, step in target.items()}  # ‖Z‖² per tensor
        mixing = {name: _AndersonMixing(step, ANDERSON_MEMORY) for name, step in target.items()}
        accepted: tuple[float, dict, dict] | None = None  # the last point that raised g: its g, v and gradient
        self.dykstra_converged = False
        for iteration in range(1, self.iterations + 1):
            self.dykstra_iterations = iteration
            a = {name: target[name] - v[name] for name in target}
            self._project_steps_(a, weights)
            inside = {name: keys.projectors[name].apply(a[name]) for name in target}  # P_S(a)
            gradient = {name: a[name] - inside[name] for name in target}  # P_S⊥(a): g's gradient at v
            # g(v) = ½‖a − Z‖² + ⟨v, a⟩, expanded into dot products (no temporaries the size of the weights)
            dual = sum(
                0.5 * (_dot(a[name], a[name]) - 2 * _dot(a[name], target[name]) + squares[name])
                + _dot(v[name], a[name])
                for name in target
            )
            if accepted is not None and dual < accepted[0]:  # the mixed step lowered g: take the plain one instead
                v = {name: accepted[1][name] + accepted[2][name] for name in target}
                for mixer in mixing.values():
                    mixer.forget(slice(None))
                accepted = None
                continue
            accepted = (dual, v, gradient)
            ratios, kept = self._ratios_into_ball(inside, weights), inside  # the feasible point: each P_S(a) scaled
            primal = sum(
                0.5
                * (
                    ratios[name] ** 2 * _dot(inside[name], inside[name])
                    - 2 * ratios[name] * _dot(inside[name], target[name])
                    + squares[name]
                )
                for name in target
            )
            if primal - dual <= self.tolerance * primal:
                self.dykstra_converged = True
                break
            v = {name: mixing[name].step(v[name], gradient[name]) for name in target}
        if not self.dykstra_converged:
            self._warn_capped()
        self.dykstra_excess = max(0.0, self._steps_distance(kept, weights) - self.delta)
        moved = sum((1 - ratios[name]) ** 2 * _dot(kept[name], kept[name]) for name in target)
        size = sum(_dot(kept[name], kept[name]) for name in target)
        self.dykstra_pull_in = math.sqrt(moved / size) if size > 0 else 0.0
        for name, transposed in layers.items():
            _write(self.params[name], theta0[name], kept[name] * ratios[name], transposed)
        self._pull_into_ball()  # storing in the parameters' dtype rounds: the stored values end in the ball

    def _linf_nullspace(self, theta0: Mapping[str, torch.Tensor]) -> None:
        """The L∞ box ∩ null space, row by row: both constraints act on each weight row alone (the box per element,
        ΔW P per row), so every row is its own projection, solved by `_dykstra_nullspace`'s iteration and stopped on
        its own certificate (`_linf_nullspace_rows`). Most rows are done in a third of the slowest one's iterations.
        """
        keys = self.keys
        for name in keys.frozen:  # biases, norms: no keys, kept at θ0
            self.params[name].copy_(theta0[name])
        self.dykstra_converged, self.dykstra_iterations, self.dykstra_excess = True, 0, 0.0
        moved, size = 0.0, 0.0
        for name, (_, transposed) in keys.layers.items():
            param = self.params[name]
            target = _step(param, theta0[name], transposed).contiguous()  # [out, in]
            result, iterations, settled, excess, (row_moved, row_size) = self._linf_nullspace_rows(
                target, keys.projectors[name]
            )
            self.dykstra_iterations = max(self.dykstra_iterations, iterations)
            self.dykstra_converged &= settled
            self.dykstra_excess = max(self.dykstra_excess, excess)
            moved, size = moved + row_moved, size + row_size
            _write(param, theta0[name], result, transposed)
        if not self.dykstra_converged:
            self._warn_capped()
        self.dykstra_pull_in = math.sqrt(moved / size) if size > 0 else 0.0
        self._pull_into_ball()  # storing in the parameters' dtype rounds: the stored values end in the ball

    def _linf_nullspace_rows(
        self, target: torch.Tensor, nullspace: NullSpace
    ) -> tuple[torch.Tensor, int, bool, float, tuple[float, float]]:
        """One tensor's rows projected: the result, the iterations its slowest row took, whether every row settled,
        how far the unscaled P_S(a) lay outside the box, and Σ‖moved by the scaling‖², Σ‖P_S(a)‖².

        A row stops once its gap is at most `tolerance` × the larger of its own ½‖point − Z‖² and the mean row's
        (rounding bounds a row that barely moves), so the tensor's gap is at most twice `tolerance` × its own. Rows
        that stopped keep iterating, unread, until a quarter of those present have: then they are dropped at once.
        """
        basis = nullspace.basis.to(target.device)  # float64: v must stay in S⊥ for g(v) to bound the distance
        result = torch.empty_like(target)
        active = torch.arange(target.shape[0], device=target.device)  # the rows present, done or not
        waiting = torch.ones_like(active, dtype=torch.bool)  # of those, the rows whose result is not stored yet
        z, v, primals = target, torch.zeros_like(target), target.new_zeros(target.shape[0])
        mixing = _AndersonMixing(target, ANDERSON_MEMORY)
        accepted = None  # per row, the highest g so far, and the v and gradient it was reached at
        plain = torch.ones_like(waiting)  # the rows whose v is a plain step from their best point (0: the first)
        excess, moved, size, iteration, settled = 0.0, 0.0, 0.0, 0, True
        while True:
            iteration += 1
            a = torch.sub(z, v).clamp_(-self.delta, self.delta)
            thin = (a @ basis) @ basis.T
            inside, gradient = (a - thin, thin) if nullspace.complement else (thin, a - thin)  # P_S(a), P_S⊥(a)
            gap = a - z
            dual = 0.5 * torch.linalg.vecdot(gap, gap) + torch.linalg.vecdot(v, a)
            # a plain step never lowers g (its gradient is 1-Lipschitz): where one seems to, rounding speaks
            lowered = (accepted[0] > dual) & ~plain if accepted is not None else ~plain
            if not bool(lowered.any()):
                accepted = (dual, v, gradient)
            else:  # a mixed step that lowered a row's g: that row takes the plain step from its best point instead
                raised = (~lowered)[:, None]
                accepted = (
                    torch.where(lowered, accepted[0], dual),
                    torch.where(raised, v, accepted[1]),
                    torch.where(raised, gradient, accepted[2]),
                )
            largest = torch.maximum(inside.amax(1), inside.amin(1).neg())
            ratios = torch.where(largest > self.delta, self.delta / largest, torch.ones_like(largest))
            torch.mul(inside, ratios[:, None], out=gap).sub_(z)
            primal = 0.5 * torch.linalg.vecdot(gap, gap)
            primals[active] = primal
            # any v's g bounds the distance from below: the highest so far certifies this iteration's feasible point
            done = waiting & (primal - accepted[0] <= self.tolerance * torch.maximum(primal, primals.mean()))
            if iteration == self.iterations:  # the cap: every row ends at its feasible point
                settled, done = bool((done == waiting).all()), waiting
            if bool(done.any()):
                stored = inside[done].pow(2).sum(1)
                result[active[done]] = inside[done] * ratios[done, None]
                excess = max(excess, float(largest[done].max()) - self.delta)
                moved += float(((1 - ratios[done]).pow(2) * stored).sum())
                size += float(stored.sum())
                waiting &= ~done
                if not bool(waiting.any()):
                    return result, iteration, settled, excess, (moved, size)
                if 4 * int((~waiting).sum()) >= len(waiting):
                    keep = waiting
                    active, z, v, gradient, lowered = (value[keep] for value in (active, z, v, gradient, lowered))
                    accepted = tuple(value[keep] for value in accepted)
                    mixing.keep(keep)
                    waiting = torch.ones_like(active, dtype=torch.bool)
            v, plain = mixing.step(v, gradient), lowered  # the rows that lowered g step plainly now
            if bool(lowered.any()):
                v[lowered] = accepted[1][lowered] + accepted[2][lowered]
                mixing.forget(lowered)

    def _project_steps_(self, steps: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None) -> None:
        """The ball's projection of float64 updates Δ in place (the ball centred at 0)."""
        zero = dict.fromkeys(steps, torch.zeros((), dtype=torch.float64))
        if self.norm == "linf":
            for step in steps.values():
                step.clamp_(-self.delta, self.delta)
        elif self.norm == "fisher":
            project_fisher_(steps, zero, weights, self.delta)
        elif self.l2_scope == "global":
            project_l2_(steps, zero, self.delta)
        else:
            for name, step in steps.items():
                project_l2_({name: step}, zero, self.delta)

    def _steps_distance(self, steps: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None) -> float:
        """‖Δ‖ in the ball's own measure, for float64 updates."""
        if self.norm == "linf":
            return max(max(-float(low), float(high)) for low, high in (step.aminmax() for step in steps.values()))
        if self.norm == "fisher":
            return float(sum(float((weights[name] * step.pow(2)).sum()) for name, step in steps.items()))
        if self.l2_scope == "global":
            return math.sqrt(sum(float(step.pow(2).sum()) for step in steps.values()))
        return max(float(step.norm()) for step in steps.values())

    def _ratios_into_ball(
        self, steps: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None
    ) -> dict[str, float]:
        """The factors (≤ 1) that scale each Δ toward 0 into the ball: each tensor by its own where the ball is per
        element or per tensor, all by one where it is global. A subspace through 0 keeps the scaled point."""
        per_tensor = self.norm == "linf" or (self.norm == "l2" and self.l2_scope == "per_tensor")
        groups = [{name: step} for name, step in steps.items()] if per_tensor else [steps]
        ratios = {}
        for group in groups:
            distance = self._steps_distance(group, weights)
            ratio = 1.0 if distance <= self.delta else self.delta / distance
            ratios.update(dict.fromkeys(group, math.sqrt(ratio) if self.norm == "fisher" else ratio))
        return ratios

    def _warn_capped(self) -> None:
        self.capped_projections += 1
        if self.capped_projections == 1:
            logger.warning(
                "Dykstra's projection onto the ball ∩ key set stopped on its cap of %d iterations before its stop "
                "rule was met (tolerance %g): the result lies in both sets but may not be the nearest point. "
                "Raise projection_iterations; `dykstra_capped` in the logs counts the steps this happened on.",
                self.iterations,
                self.tolerance,
            )

    def _pull_into_ball(self) -> None:
        """Scale Δ toward θ0 until the stored values lie in the ball: each tensor by its own ratio where the ball is
        per element (L∞) or per tensor (L2 per tensor), all together where it is global (L2, Fisher). Every key set
        is a subspace or an ellipsoid around θ0 per layer, so the scaled point stays in it."""
        theta0 = self.theta0_like_params()
        groups = (
            [{name: param} for name, param in self.params.items()]
            if self.norm == "linf" or (self.norm == "l2" and self.l2_scope == "per_tensor")
            else [self.params]
        )
        for group in groups:
            for attempt in range(8):  # a rescale in float32 can round a hair outside: again, a little further in
                distance = (
                    linf_distance(group, theta0)
                    if self.norm == "linf"
                    else fisher_distance(group, theta0, self.fisher)
                    if self.norm == "fisher"
                    else float(l2_distance(group, theta0))
                )
                if distance <= self.delta:
                    break
                ratio = math.sqrt(self.delta / distance) if self.norm == "fisher" else self.delta / distance
                scale = ratio * (1 - attempt * 1e-6)
                for name, param in group.items():
                    start, values = local(theta0[name]), local(param)
                    values.copy_(start + (values - start) * scale)
                if self.norm == "linf":  # the scaled values round to the dtype: the box holds them exactly (a hair
                    self._project_ball(count=False)  # off the key set, which no dtype holds exactly anyway)
        if self.excess() > 0:
            logger.warning("The projection onto the ball ∩ key set stopped %.3g outside the ball.", self.excess())

    def excess(self) -> float:
        """How far the parameters lie outside the ball, in its own measure (0 inside)."""
        return max(0.0, self.distance() - self.delta) if self.delta is not None else 0.0

    def _project_ball(self, count: bool = True) -> None:
        if self.norm == "none":
            return
        theta0 = self.theta0_like_params()
        if self.norm == "linf":  # the box is computed once per θ0 (not two temporaries per tensor and step)
            for name, param in self.params.items():  # element-wise: each FSDP2 shard on its own
                start, lower, upper = self._bounds.get(name) or (None, None, None)
                if start is not theta0[name]:
                    lower, upper = linf_bounds(local(theta0[name]), self.delta)
                    self._bounds[name] = (theta0[name], lower, upper)
                local(param).clamp_(lower, upper)
        elif self.norm == "fisher":
            project_fisher_(self.params, theta0, self.fisher, self.delta)
        elif self.l2_scope == "global":
            project_l2_(self.params, theta0, self.delta)
        else:
            for name, param in self.params.items():
                project_l2_({name: param}, {name: theta0[name]}, self.delta)
        if count:
            self.num_projections += 1

    def distance(self) -> float:
        """The current ||θ − θ0|| in the projector's norm (Σ FΔ² for fisher, L∞ for `none`), for logging."""
        theta0 = self.theta0_like_params()
        if self.norm == "fisher":
            return fisher_distance(self.params, theta0, self.fisher)
        if self.norm == "l2" and self.l2_scope == "global":
            return float(l2_distance(self.params, theta0))
        if self.norm == "l2":
            return max(float(l2_distance({n: p}, {n: theta0[n]})) for n, p in self.params.items())
        return linf_distance(self.params, theta0)


def validate_constraint(norm: str, delta: object, l2_scope: str = "global") -> float | None:
    """The constraint's norm, scope and δ checked together; returns δ as a float (None for norm 'none')."""
    if norm not in NORMS:
        raise ValueError(f"Unknown norm {norm!r}: choose one of {', '.join(NORMS)}.")
    if l2_scope not in L2_SCOPES:
        raise ValueError(f"Unknown l2_scope {l2_scope!r}: choose one of {', '.join(L2_SCOPES)}.")
    if norm != "none":
        return validate_delta(delta)
    if delta is not None:
        raise ValueError(
            f"norm 'none' is unconstrained but delta={delta!r} is "
            "set: remove delta (null), or choose norm 'linf' or 'l2'."
        )
    return None


def validate_delta(delta: object, name: str = "delta") -> float:
    """δ as a positive finite float, or a clear error (other editors silently misread integers)."""
    if isinstance(delta, bool) or delta is None:
        raise ValueError(
            f"{name} must be a positive number for a constrained edit, got {delta!r}. "
            "For an unconstrained edit set norm: none instead."
        )
    try:
        value = float(delta)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number such as 1e-3, got {delta!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{name} must be a positive finite number, got {delta!r}. "
            "For an unconstrained edit (δ = ∞) set norm: none instead."
        )
    return value
