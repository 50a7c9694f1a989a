"""Where the demo's time goes: its job phase by phase, one training step part by part, and the arithmetic limit.

    python bench/profile_demo.py [--config trainer_configs/demo_smollm2.yaml] [--output_dir runs/profile]
        [--option value ...]

Runs `memedit edit` in this process (further `--option value` pairs go to it) and prints three tables:
- phases: every progress bar the job shows (their own names), the training loop, and what ran outside any bar;
- one training step by part (mean ms over the steps): θ0's reference for the KL rows, forward and loss, backward,
  the optimizer, the projection (and its Dykstra iterations), the rest of the Trainer's loop;
- the arithmetic limit of a step: the multiply-adds its batches need through the blocks that run and the LM head
  at the object positions, over this machine's measured matrix-product speed.

Caches the job uses (the preserved keys under HF_HOME, the model's samples) are part of what is measured: point
HF_HOME at an empty folder for a first run's figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import tqdm.auto  # noqa: E402


class Timeline:
    """Wall time per progress bar (by its description) and per training-step part."""

    def __init__(self):
        self.bars: dict[str, float] = defaultdict(float)  # top-level phases
        self.nested: dict[str, float] = defaultdict(float)  # bars inside the training loop
        self.in_training = False
        self.parts: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.tokens: list[tuple[int, int, int]] = []  # per micro-batch: tokens, object positions, rows

    def timed(self, part: str, function):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.parts[part] += time.perf_counter() - start
                self.counts[part] += 1

        return run


def _watch_bars(timeline: Timeline) -> None:
    """Every tqdm bar's life, by its description (the job's phases name themselves)."""
    base = tqdm.auto.tqdm

    class Timed(base):
        def __init__(self, *args, **kwargs):
            self._started = time.perf_counter()
            super().__init__(*args, **kwargs)

        def close(self):
            name = (getattr(self, "desc", "") or "").rstrip(": ")
            if getattr(self, "_started", None) is not None and (name or timeline.in_training):
                where = timeline.nested if timeline.in_training else timeline.bars
                where[name or "(the Trainer's bar)"] += time.perf_counter() - self._started
            self._started = None
            super().close()

    for module in list(sys.modules.values()):
        if getattr(module, "tqdm", None) is base:
            module.tqdm = Timed
    tqdm.auto.tqdm = Timed


def _watch_trainer(timeline: Timeline) -> None:
    from hf_memedit.edit_trainer import ConstrainedEditTrainer
    from hf_memedit.fast_paths.heads import logit_positions

    trainer_class = ConstrainedEditTrainer
    original_step, original_loss = trainer_class.training_step, trainer_class.compute_loss
    original_references, original_optimizer = trainer_class._with_references, trainer_class.create_optimizer
    original_train = trainer_class.train

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        positions = logit_positions(inputs["labels"], self.kind)
        timeline.tokens.append(
            (
                int(mask.sum()) if mask is not None else inputs["input_ids"].numel(),
                int(positions.sum()),
                len(inputs["input_ids"]),
            )
        )
        return timeline.timed("training_step (whole)", original_step)(self, model, inputs, num_items_in_batch)

    def create_optimizer(self, model=None):
        optimizer = original_optimizer(self, model)
        if not getattr(optimizer, "_profiled", False):
            optimizer.step = timeline.timed("optimizer and projection", optimizer.step)
            optimizer._profiled = True
        return optimizer

    def train(self, *args, **kwargs):
        self.projector.project_ = timeline.timed("projection", self.projector.project_)
        start, timeline.in_training = time.perf_counter(), True
        try:
            return original_train(self, *args, **kwargs)
        finally:
            timeline.in_training = False
            timeline.bars["training (train(): θ0's evaluation, caches, the steps)"] += time.perf_counter() - start

    trainer_class.training_step = training_step
    trainer_class.compute_loss = timeline.timed("forward and loss", original_loss)
    trainer_class._with_references = timeline.timed("θ0 reference for KL rows", original_references)
    trainer_class.create_optimizer = create_optimizer
    trainer_class.train = train


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    """This machine's float32 matrix-product speed (GFLOP/s), on the threads torch uses."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="trainer_configs/demo_smollm2.yaml")
    parser.add_argument("--output_dir", default="runs/profile_demo")
    known, rest = parser.parse_known_args()
    timeline = Timeline()
    _watch_bars(timeline)
    _watch_trainer(timeline)
    from hf_memedit import cli
    from hf_memedit.edit_trainer import ConstrainedEditTrainer

    trainers: list = []
    original_init = ConstrainedEditTrainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        trainers.append(self)

    ConstrainedEditTrainer.__init__ = init
    start = time.perf_counter()
    cli.main(
        ["edit", "--config", known.config, "--output_dir", known.output_dir, "--overwrite_output_dir", "true", *rest]
    )
    total = time.perf_counter() - start
    trainer = trainers[-1]
    steps = max(1, trainer.state.global_step)

    print(f"\n## The job, phase by phase ({known.config}, {total:.1f} s in all, {torch.get_num_threads()} threads)\n")
    print("| phase | seconds | share |\n|---|---|---|")
    for name, seconds in sorted(timeline.bars.items(), key=lambda item: -item[1]):
        print(f"| {name} | {seconds:.1f} | {seconds / total:.0%} |")
    for name, seconds in sorted(timeline.nested.items(), key=lambda item: -item[1]):
        print(f"| ↳ inside training: {name} | {seconds:.1f} | {seconds / total:.0%} |")
    outside = max(0.0, total - sum(timeline.bars.values()))
    print(f"| outside any bar (loading, the benchmark, writing the run) | {outside:.1f} | {outside / total:.0%} |")
    training = timeline.bars["training (train(): θ0's evaluation, caches, the steps)"]
    steps_time = timeline.nested.get("(the Trainer's bar)", training)

    parts = timeline.parts
    step_ms = {name: 1000 * seconds / steps for name, seconds in parts.items()}
    whole = step_ms.get("training_step (whole)", 0.0)
    known_parts = ("θ0 reference for KL rows", "forward and loss")
    backward = whole - sum(step_ms.get(name, 0.0) for name in known_parts)
    optimizer = step_ms.get("optimizer and projection", 0.0)
    projection = step_ms.get("projection", 0.0)
    loop = 1000 * steps_time / steps - whole - optimizer
    print(f"\n## One training step by part (mean over {steps} steps)\n")
    print("| part | ms per step |\n|---|---|")
    rows = [
        ("θ0 reference for KL rows (computed once per row)", step_ms.get("θ0 reference for KL rows", 0.0)),
        ("forward and loss", step_ms.get("forward and loss", 0.0)),
        ("backward", backward),
        ("optimizer step", optimizer - projection),
        ("projection onto the constraint", projection),
        ("the rest of the loop (data, logging, callbacks)", loop),
    ]
    for name, ms in rows:
        print(f"| {name} | {ms:.0f} |")
    print(f"| **one step** | **{1000 * steps_time / steps:.0f}** |")
    keys = trainer.projector.keys
    if keys is not None:
        print(
            f"\nDykstra: {trainer.projector.capped_projections} of {trainer.projector.num_projections} "
            f"projections stopped on the cap of {trainer.projector.iterations}; the last one took "
            f"{trainer.projector.dykstra_iterations} iterations."
        )

    # The arithmetic limit: multiply-adds through the blocks that run, and the LM head at the object positions.
    model = trainer.edit_model.model
    layout = trainer.edit_model.selector_config.layout(model)
    from hf_memedit.architectures import block_list
    from hf_memedit.fast_paths.heads import head_modules

    blocks = block_list(model, layout)
    first = trainer.prefix_cache.block if trainer.prefix_cache is not None else 0
    block_params = sum(p.numel() for block in list(blocks)[first:] for p in block.parameters())
    head_params = sum(p.numel() for module in head_modules(model) or [] for p in module.parameters() if p.dim() == 2)
    micro = len(timeline.tokens) / steps
    tokens = sum(t for t, _, _ in timeline.tokens) / steps
    objects = sum(o for _, o, _ in timeline.tokens) / steps
    # forward 2 FLOPs a parameter a token; backward 4 (input and weight gradients) in the trained blocks, 2 (input
    # only) in the frozen head; the KL rows' θ0 forward is computed once per row and left out.
    flops = 6 * block_params * tokens + 4 * head_params * objects
    speed = matmul_gflops()
    limit = flops / (speed * 1e9)
    print(
        f"\n## The arithmetic limit of a step\n\n{micro:.0f} micro-batch(es) a step, {tokens:.0f} tokens "
        f"through blocks {first}-{len(blocks) - 1} ({block_params / 1e6:.1f} M parameters), {objects:.0f} "
        f"object positions through the LM head ({head_params / 1e6:.1f} M): {flops / 1e9:.1f} GFLOP a "
        f"step; this machine's matrix product: {speed:.0f} GFLOP/s, so **{1000 * limit:.0f} ms a step** at "
        f"best; measured {1000 * steps_time / steps:.0f} ms ({steps_time / steps / limit:.1f}× the limit)."
    )


if __name__ == "__main__":
    main()
