"""trex_mod: the paper's T-REx benchmark (LAMA), with m facts given new objects.

Two layouts are read from `data_dir`:
- the official LAMA one (`TREx/P*.jsonl` with `evidences`, and `relations.jsonl`): training
  evidence = the Wikipedia `masked_sentence`s; with no `data_dir` the official `data.zip` is
  downloaded (`data_url`);
- the ParaRel one of ../shared/data/trex (`facts/P*.jsonl` without evidence, `paraphrases/P*.jsonl`,
  `relations.jsonl`): training evidence = paraphrase patterns other than the test template.
The test phrasing is always the relation's LAMA template.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass, field

import datasets

from .common import (
    Fact,
    ModBenchmarkBuilder,
    ModBenchmarkConfig,
    choose_evidence,
    fill_subject,
    read_jsonl,
    require_dir,
)


logger = logging.getLogger(__name__)

LAMA_URL = "https://dl.fbaipublicfiles.com/LAMA/data.zip"


def _normal(pattern: str) -> str:
    return re.sub(r"\s+([.,;!?])", r"\1", " ".join(pattern.split()))


def object_last(pattern: str) -> bool:
    """Whether [Y] ends the pattern (trailing punctuation aside): a causal LM can then predict it."""
    return _normal(pattern).rstrip(" .!?;,").endswith("[Y]")


@dataclass
class TrexModConfig(ModBenchmarkConfig):
    evidence_per_fact: int | None = field(
        default=4, metadata={"help": "Training phrasings per fact (None: all of them)."}
    )
    object_last: bool = field(
        default=False,
        metadata={"help": "Keep only phrasings whose object comes last (needed for causal LMs)."},
    )
    data_url: str = field(default=LAMA_URL, metadata={"help": "Where data.zip is fetched from when data_dir is None."})


class TrexMod(ModBenchmarkBuilder):
    """T-REx facts (LAMA) with m of them modified; splits are documented in `hf_memedit.benchmarks.common`."""

    BUILDER_CONFIG_CLASS = TrexModConfig
    CITATION = "Petroni et al. 2019 (LAMA); Elazar et al. 2021 (ParaRel)"

    @classmethod
    def read_facts(cls, config: TrexModConfig, dl_manager=None) -> list[Fact]:
        data_dir = config.data_dir
        if data_dir is None:
            dl_manager = dl_manager or datasets.DownloadManager()
            data_dir = os.path.join(dl_manager.download_and_extract(config.data_url), "data")
        require_dir(data_dir, "point it at the LAMA data folder (TREx/, relations.jsonl) or ../shared/data/trex.")
        return read_trex(data_dir, config)


def _templates(data_dir: str) -> dict[str, str]:
    path = os.path.join(data_dir, "relations.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{data_dir} has no relations.jsonl (the relation templates).")
    return {r["relation"]: r["template"] for r in read_jsonl(path, ("relation", "template"))}


def read_trex(data_dir: str, config: TrexModConfig) -> list[Fact]:
    """The facts of either layout, sorted by relation then file order."""
    templates = _templates(data_dir)
    if os.path.isdir(os.path.join(data_dir, "TREx")):
        files, paraphrased = glob.glob(os.path.join(data_dir, "TREx", "P*.jsonl")), False
    elif os.path.isdir(os.path.join(data_dir, "facts")):
        files, paraphrased = glob.glob(os.path.join(data_dir, "facts", "P*.jsonl")), True
    else:
        raise FileNotFoundError(f"{data_dir} has neither TREx/ (LAMA layout) nor facts/ (ParaRel layout).")
    if not files:
        raise FileNotFoundError(f"{data_dir} holds no P*.jsonl fact files.")
    facts: list[Fact] = []
    skipped: list[str] = []
    for path in sorted(files):
        relation = os.path.basename(path)[: -len(".jsonl")]
        if not config.reads(relation):
            continue
        if relation not in templates:
            raise ValueError(
                f"{path}: relation {relation} has no template in "
                f"{data_dir}/relations.jsonl; add one or remove the file."
            )
        template = templates[relation]
        if config.object_last and not object_last(template):
            skipped.append(relation)
            continue
        patterns = _paraphrases(data_dir, relation, template, config) if paraphrased else None
        required = ("sub_label", "obj_label", "uuid") + (() if paraphrased else ("evidences",))
        for record in read_jsonl(path, required):
            subject, obj = record["sub_label"], record["obj_label"]
            if paraphrased:
                chosen = choose_evidence(patterns, config.evidence_per_fact, config.seed, record["uuid"])
                train = [fill_subject(p, subject) for p in chosen]
            else:
                sentences = sorted(
                    {
                        e["masked_sentence"].replace("[MASK]", "[Y]")
                        for e in record["evidences"]
                        if e.get("masked_sentence", "").count("[MASK]") == 1
                    }
                )
                if config.object_last:
                    sentences = [s for s in sentences if object_last(s)]
                train = choose_evidence(sentences, config.evidence_per_fact, config.seed, record["uuid"])
            facts.append(Fact(record["uuid"], relation, subject, obj, train, [fill_subject(template, subject)]))
    if skipped:
        logger.warning(
            "object_last: skipped %d relations whose template does not end with the object: %s",
            len(skipped),
            ", ".join(skipped),
        )
    if not facts:
        raise ValueError(f"No facts were read from {data_dir} with relations={config.relations}.")
    return facts


def _paraphrases(data_dir: str, relation: str, template: str, config: TrexModConfig) -> list[str]:
    path = os.path.join(data_dir, "paraphrases", f"{relation}.jsonl")
    if not os.path.isfile(path):
        return []  # such facts serve as unmodified facts only (no training phrasing)
    patterns = sorted({r["pattern"] for r in read_jsonl(path, ("pattern",))} - {template})
    patterns = [p for p in patterns if _normal(p) != _normal(template) and "[X]" in p and "[Y]" in p]
    return [p for p in patterns if object_last(p)] if config.object_last else patterns
