"""How many Dykstra iterations the demo's constraint (L∞ box ∩ null space of the preserved keys) needs, and what
the null-space solver (Dykstra on its dual, Anderson-mixed) gains over the plain alternating projections.

    python bench/dykstra_iterations.py [--config trainer_configs/demo_smollm2.yaml] [--steps 12]
        [--caps 5 10 20 50 100]

Trains the demo's edit for `--steps` steps (further `--option value` pairs go to `memedit edit`) and keeps the
parameters as the optimizer left them before three of the projections (the first step, the middle one, the last).
Each is then projected again, side by side in this one run, with every iteration cap (tolerance as configured)
and once with a long reference run (`--reference` iterations, tolerance 1e-14). The table gives, per cap, what
the result costs and how far it lies from the reference, as ratios:

- `error`: ‖x_cap − x_ref‖ / ‖y − x_ref‖, the distance to the exact projection relative to how far it moved y;
- `farther`: ‖y − x_cap‖ / ‖y − x_ref‖ − 1, how much farther from the optimizer's point the result lies;
- `pull-in`: the share of Δ the final pull into the box removed (`dykstra_pull_in`), and whether it settled;
- `time`: wall time relative to the cap of 20 (measured in this run, interleaved).

A second table runs the solvers at the configured tolerance and cap on the same points, interleaved: the
alternating projections (`NormBallProjector._dykstra`, stopped on the change of its iterates, what the demo ran
first), the dual iteration with Anderson mixing over whole tensors (`_dykstra_nullspace`, stopped on its duality
gap), and, with an L∞ ball, the same iteration row by row (`_linf_nullspace`, each row stopped on its own gap: what
the demo runs now).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(sum(t.double().pow(2).sum() for t in tensors.values())) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="trainer_configs/demo_smollm2.yaml")
    parser.add_argument("--output_dir", default="runs/dykstra_iterations")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--caps", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    parser.add_argument("--reference", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=2, help="timings per cap and point (interleaved)")
    known, rest = parser.parse_known_args()

    from hf_memedit import cli
    from hf_memedit.projection import NormBallProjector

    wanted = {1, max(1, known.steps // 2), known.steps}
    captured: list[dict[str, torch.Tensor]] = []
    projectors: list[NormBallProjector] = []
    original = NormBallProjector.project_

    def project_(self):
        if self.keys is not None and self.num_projections + 1 in wanted:
            captured.append({name: param.detach().clone() for name, param in self.params.items()})
            projectors.append(self)
        return original(self)

    NormBallProjector.project_ = project_
    cli.main(
        [
            "edit",
            "--config",
            known.config,
            "--output_dir",
            known.output_dir,
            "--overwrite_output_dir",
            "true",
            "--max_steps",
            str(known.steps),
            "--eval_before_edit",
            "false",
            "--generation_eval",
            "false",
            "--drift_eval",
            "false",
            *rest,
        ]
    )
    NormBallProjector.project_ = original
    if not captured:
        raise SystemExit("No projection onto a key set was captured: the config has no key_constraint.")
    projector = projectors[-1]
    configured = (projector.iterations, projector.tolerance)

    def project(point: dict[str, torch.Tensor], iterations: int, tolerance: float, solver=None):
        projector.iterations, projector.tolerance = iterations, tolerance
        with torch.no_grad():
            for name, param in projector.params.items():
                param.copy_(point[name])
        start = time.perf_counter()
        if solver is None:
            original(projector)
        else:
            with torch.no_grad():
                solver(projector.theta0_like_params())
        seconds = time.perf_counter() - start
        result = {name: param.detach().double().clone() for name, param in projector.params.items()}
        return result, seconds, projector.dykstra_iterations, projector.dykstra_converged, projector.dykstra_pull_in

    solvers = {
        "alternating projections (change of iterates)": projector._dykstra,
        "dual + Anderson mixing (duality gap)": projector._dykstra_nullspace,
    }
    if projector.norm == "linf":
        solvers["the same, row by row (each row's gap)"] = projector._linf_nullspace
    compared: dict[str, list[tuple[float, float, int, bool]]] = {name: [] for name in solvers}
    rows: dict[int, list[tuple[float, float, float, float, int, bool]]] = {cap: [] for cap in known.caps}
    for point in captured:
        exact, *_ = project(point, known.reference, 1e-14)
        y = {name: value.double() for name, value in point.items()}
        moved = _norm({n: y[n] - exact[n] for n in y})
        times, outcome = {cap: [] for cap in known.caps}, {}
        for _ in range(known.repeats):  # interleaved, so drift in the machine's speed touches every cap alike
            for cap in known.caps:
                result, seconds, iterations, converged, pull_in = project(point, cap, configured[1])
                times[cap].append(seconds)
                outcome[cap] = (result, iterations, converged, pull_in)
        for cap, (result, iterations, converged, pull_in) in outcome.items():
            error = _norm({n: result[n] - exact[n] for n in y}) / moved
            farther = _norm({n: y[n] - result[n] for n in y}) / moved - 1
            rows[cap].append((error, farther, pull_in, min(times[cap]), iterations, converged))
        times, outcome = {name: [] for name in solvers}, {}
        for _ in range(known.repeats):
            for name, solver in solvers.items():
                result, seconds, iterations, converged, _ = project(point, *configured, solver=solver)
                times[name].append(seconds)
                outcome[name] = (result, iterations, converged)
        for name, (result, iterations, converged) in outcome.items():
            error = _norm({n: result[n] - exact[n] for n in y}) / moved
            compared[name].append((error, min(times[name]), iterations, converged))
    projector.iterations, projector.tolerance = configured

    base = 20 if 20 in rows else known.caps[0]
    base_time = sum(r[3] for r in rows[base]) / len(rows[base])
    print(
        f"\n## Dykstra on the demo's constraint ({known.config}; {len(captured)} projections of steps "
        f"{sorted(wanted)}; tolerance {configured[1]:g}; reference {known.reference} iterations at 1e-14; "
        f"{torch.get_num_threads()} threads)\n"
    )
    print(
        "| cap | iterations used | settled | error (max) | farther (max) | pull-in (max) | time vs cap "
        f"{base} |\n|---|---|---|---|---|---|---|"
    )
    for cap, found in rows.items():
        print(
            f"| {cap} | {', '.join(str(r[4]) for r in found)} | {sum(r[5] for r in found)}/{len(found)} | "
            f"{max(r[0] for r in found):.2e} | {max(r[1] for r in found):.2e} | {max(r[2] for r in found):.2e} | "
            f"{sum(r[3] for r in found) / len(found) / base_time:.2f} |"
        )

    slow = sum(r[1] for r in compared[next(iter(solvers))])
    print(
        f"\n## The solvers at tolerance {configured[1]:g}, cap {configured[0]}, on the same {len(captured)} "
        "points (interleaved, best of the repeats)\n"
    )
    print("| solver | iterations | settled | error (max) | seconds (sum) | speed-up |\n|---|---|---|---|---|---|")
    for name, found in compared.items():
        seconds = sum(r[1] for r in found)
        print(
            f"| {name} | {', '.join(str(r[2]) for r in found)} | {sum(r[3] for r in found)}/{len(found)} | "
            f"{max(r[0] for r in found):.2e} | {seconds:.2f} | {slow / seconds:.2f}x |"
        )


if __name__ == "__main__":
    main()
