"""Projection onto the norm ball ||θ − θ0|| ≤ δ (the paper's constrained fine-tuning).

The projections are exact Euclidean nearest points of the ball:
L∞ clamps every element into [θ0 − δ, θ0 + δ]; L2 rescales Δ = θ − θ0 by min(1, δ / ||Δ||₂),
either over all trainable tensors together (the paper's θ) or tensor by tensor.
`fisher` projects onto the paper's Appendix C ellipsoid Σᵢ Fᵢ Δᵢ² ≤ δ, F the diagonal Fisher
information at θ0 (see `hf_memedit.fisher`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


NORMS = ("linf", "l2", "fisher", "none")
L2_SCOPES = ("global", "per_tensor")


@torch.no_grad()
def project_linf_(param: torch.Tensor, theta0: torch.Tensor, delta: float) -> None:
    """Clamp `param` in place into the box θ0 ± δ (idempotent: the bounds are recomputed identically)."""
    param.clamp_(*linf_bounds(theta0, delta))


def linf_bounds(theta0: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The box θ0 ± δ as (lower, upper) tensors: what the L∞ projection clamps to."""
    return theta0 - delta, theta0 + delta


@torch.no_grad()
def l2_distance(params: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """||θ − θ0||₂ over all the given tensors together, accumulated in float64."""
    total = torch.zeros((), dtype=torch.float64, device=next(iter(params.values())).device)
    for name, param in params.items():
        total += (param.double() - theta0[name].double()).pow(2).sum().to(total.device)
    return total.sqrt()


@torch.no_grad()
def project_l2_(params: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor], delta: float) -> None:
    """Rescale Δ of all the given tensors together so that ||Δ||₂ ≤ δ."""
    norm = l2_distance(params, theta0).item()
    if norm <= delta:
        return
    scale = delta / norm
    for name, param in params.items():
        start = theta0[name]
        param.copy_(start + (param - start) * scale)


@torch.no_grad()
def fisher_distance(
    params: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor], fisher: Mapping[str, torch.Tensor]
) -> float:
    """Σᵢ Fᵢ Δᵢ² over all the given tensors (float64): the paper's Appendix C constraint."""
    return float(sum((fisher[n].double() * (p.double() - theta0[n].double()).pow(2)).sum().item() for n, p in params.items()))


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
        return float(sum((w * (d / (1 + lam * w)).pow(2)).sum().item() for w, d in zip(weights.values(), steps.values())))

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
    return high


@torch.no_grad()
def linf_distance(params: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor]) -> float:
    """max |θ − θ0| over all the given tensors (one temporary per tensor: it is logged every few steps)."""
    return max(float((param - theta0[name]).abs_().max()) for name, param in params.items())


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
    ):
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

    def _theta0_on_device(self) -> dict[str, torch.Tensor]:
        for name, param in self.params.items():
            start = self.theta0[name]
            if start.device != param.device or start.dtype != param.dtype:
                self.theta0[name] = start.to(device=param.device, dtype=param.dtype)
        return self.theta0

    @torch.no_grad()
    def project_(self) -> None:
        """Project the parameters in place; a no-op for the unconstrained norm `none`."""
        if self.norm == "none":
            return
        theta0 = self._theta0_on_device()
        if self.norm == "linf":  # the box is computed once per θ0 (not two temporaries per tensor and step)
            for name, param in self.params.items():
                start, lower, upper = self._bounds.get(name) or (None, None, None)
                if start is not theta0[name]:
                    lower, upper = linf_bounds(theta0[name], self.delta)
                    self._bounds[name] = (theta0[name], lower, upper)
                param.clamp_(lower, upper)
        elif self.norm == "fisher":
            project_fisher_(self.params, theta0, self.fisher, self.delta)
        elif self.l2_scope == "global":
            project_l2_(self.params, theta0, self.delta)
        else:
            for name, param in self.params.items():
                project_l2_({name: param}, {name: theta0[name]}, self.delta)
        self.num_projections += 1

    def distance(self) -> float:
        """The current ||θ − θ0|| in the projector's norm (Σ FΔ² for fisher, L∞ for `none`), for logging."""
        theta0 = self._theta0_on_device()
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
            f"norm 'none' is unconstrained but delta={delta!r} is set: remove delta (null), or choose norm 'linf' or 'l2'."
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
