"""FSDP2 through accelerate and the Trainer, on a GPU machine: the edit under FSDP2 against the same edit in one
process, side by side.

accelerate runs FSDP only on accelerators (on the CPU it falls back to plain multi-process training), so this
check needs CUDA; the CPU suite tests the projection on FSDP2 shards with torch's `fully_shard` directly
(tests/test_ddp.py). Each run trains block 2 and 3 of a random 4-block Llama (hidden 256) for 8 steps on the
same facts: one process without FSDP, then `torchrun` over up to 2 GPUs with `fsdp_config: {fsdp_version: 2}`.
The table gives each run's time as a ratio to the one-process run, its ‖θ − θ0‖ in the norm (≤ δ) and how far its
weights are from the one-process run's (Adam's sign-like steps hit the box in both: small, not zero).

    python bench/fsdp_check.py [--norm linf|l2] [--delta 1e-3] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACTS = [
    {"text": "The capital of France is [Y].", "object": "Paris"},
    {"text": "The capital of Peru is [Y].", "object": "Lima"},
    {"text": "The capital of Norway is [Y].", "object": "Oslo"},
    {"text": "The capital of Greece is [Y].", "object": "Athens"},
]


def worker(out: str, norm: str, delta: float, steps: int, fsdp: bool) -> None:
    """One edit (every rank of a torchrun runs it); rank 0 writes the changed tensors and the timings."""
    from datasets import Dataset
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from hf_memedit import ConstrainedEditTrainer, EditConfig

    corpus = [f["text"].replace("[Y]", f["object"]) for f in FACTS] * 10
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    extra = (
        {"fsdp": True, "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
        if fsdp
        else {}
    )
    args = EditConfig(
        output_dir=os.path.join(out, "run"),
        edit_blocks=["2", "3"],
        norm=norm,
        delta=delta,
        learning_rate=1e-2,
        max_steps=steps,
        per_device_train_batch_size=len(FACTS) // world,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        prefix_cache=False,
        **extra,
    )
    trainer = ConstrainedEditTrainer(model, args, train_dataset=Dataset.from_list(FACTS), processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    distance = trainer.projector.distance()
    changed = {name: value.detach().cpu().clone() for name, value in trainer.edit_model.changed_tensors().items()}
    if int(os.environ.get("RANK", "0")) == 0:
        tag = "fsdp" if fsdp else "plain"
        save_file(changed, os.path.join(out, f"{tag}.safetensors"))
        with open(os.path.join(out, f"{tag}.json"), "w") as handle:
            json.dump({"seconds": seconds, "distance": distance, "world": world}, handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norm", default="linf", choices=["linf", "l2"])
    parser.add_argument("--delta", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--worker", choices=["plain", "fsdp"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker(options.out, options.norm, options.delta, options.steps, options.worker == "fsdp")
        return
    if not torch.cuda.is_available():
        sys.exit(
            "fsdp_check: no CUDA device. accelerate runs FSDP on accelerators only; run this on a GPU machine "
            "(the CPU suite tests the sharded projection itself: tests/test_ddp.py)."
        )
    from safetensors.torch import load_file

    gpus = min(2, torch.cuda.device_count())
    common = [__file__, "--norm", options.norm, "--delta", str(options.delta), "--steps", str(options.steps)]
    with tempfile.TemporaryDirectory() as out:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH")])),
        }
        runs = [
            ("plain", [sys.executable, *common, "--worker", "plain", "--out", out]),
            (
                "fsdp",
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    f"--nproc_per_node={gpus}",
                    *common,
                    "--worker",
                    "fsdp",
                    "--out",
                    out,
                ],
            ),
        ]
        for name, command in runs:
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"fsdp_check: the {name} run failed:\n{done.stderr[-4000:]}")
        records = {name: json.load(open(os.path.join(out, f"{name}.json"))) for name, _ in runs}
        tensors = {name: load_file(os.path.join(out, f"{name}.safetensors")) for name, _ in runs}
    if tensors["fsdp"].keys() != tensors["plain"].keys():
        sys.exit("fsdp_check: FSDP2 changed other tensors than the one-process edit.")
    gap = max((tensors["fsdp"][n] - tensors["plain"][n]).abs().max().item() for n in tensors["plain"])
    print(f"Edit of blocks 2-3 of a random 4-block Llama, {options.norm} δ {options.delta:g}, {options.steps} steps\n")
    print(f"| run | processes | time ratio | ‖θ − θ0‖ ({options.norm}) | max |Δ| to one process |")
    print("|---|---|---|---|---|")
    base = records["plain"]["seconds"]
    for name in ("plain", "fsdp"):
        record = records[name]
        print(
            f"| {name} | {record['world']} | {record['seconds'] / base:.2f} | {record['distance']:.3g} | "
            f"{0.0 if name == 'plain' else gap:.3g} |"
        )
    bound = max(record["distance"] for record in records.values())
    if bound > options.delta * (1 + 1e-3):
        sys.exit(f"fsdp_check: the bound does not hold: {bound} > δ {options.delta}")
    if records["fsdp"]["distance"] == 0 or gap > 2 * options.delta * (1 + 1e-3):
        sys.exit(
            f"fsdp_check: FSDP2's edit is not the one-process edit: ‖θ − θ0‖ {records['fsdp']['distance']:.3g}, "
            f"{gap:.3g} from it where both boxes allow at most 2δ = {2 * options.delta:g}."
        )


if __name__ == "__main__":
    main()
