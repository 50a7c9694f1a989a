"""zsre_mod: zero-shot relation extraction (KILT `structured_zeroshot-train-kilt.jsonl`, read from
`data_dir` or downloaded from `data_url`), the paper's way.

Each line: `id`, `input` = "subject [SEP] relation", `meta.template_questions`, `output[].answer`.
A fact's questions (less near-duplicates: case, spacing) are split as in the paper: 1 question -> train
only; 2 or 3 -> one to test; more than 3 -> two to test. The text is the question followed by the object placeholder;
answers may span several tokens (at most `max_answer_tokens`), inputs at most `max_input_tokens`.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re
from dataclasses import dataclass, field

import datasets

from ..collators import PLACEHOLDER
from .common import Fact, ModBenchmarkBuilder, ModBenchmarkConfig, read_jsonl, require_dir


logger = logging.getLogger(__name__)

KILT_FILE = "structured_zeroshot-train-kilt.jsonl"
KILT_URL = f"http://dl.fbaipublicfiles.com/KILT/{KILT_FILE}"


@dataclass
class ZsreModConfig(ModBenchmarkConfig):
    max_answer_tokens: int = field(default=20, metadata={"help": "Drop facts whose answer is longer (tokens)."})
    max_input_tokens: int = field(default=512, metadata={"help": "Drop questions longer than this (tokens)."})
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer (local folder or Hub id) that counts tokens for the limits; None: whitespace words."
        },
    )
    data_url: str = field(
        default=KILT_URL, metadata={"help": "Where the KILT zsRE file is fetched from when data_dir is None."}
    )


class ZsreMod(ModBenchmarkBuilder):
    """KILT zsRE facts with m of them modified; splits are documented in `hf_memedit.benchmarks.common`."""

    BUILDER_CONFIG_CLASS = ZsreModConfig
    CITATION = "Levy et al. 2017; Petroni et al. 2021 (KILT)"

    @classmethod
    def read_facts(cls, config: ZsreModConfig, dl_manager=None) -> list[Fact]:
        if config.data_dir is None:
            dl_manager = dl_manager or datasets.DownloadManager()
            return read_zsre([dl_manager.download(config.data_url)], config, config.data_url)
        data_dir = require_dir(
            config.data_dir, f"point it at the folder holding {KILT_FILE} (or another *.jsonl in the KILT format)."
        )
        files = sorted(glob.glob(os.path.join(data_dir, "*.jsonl")))
        if not files:
            raise FileNotFoundError(f"{data_dir} holds no .jsonl file in the KILT zsRE format.")
        return read_zsre(files, config, data_dir)


def _counter(config: ZsreModConfig):
    if config.tokenizer is None:
        return lambda text: len(text.split())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def n_test_questions(n_questions: int) -> int:
    """How many of a fact's template questions go to test (the paper's rule)."""
    return 0 if n_questions <= 1 else 1 if n_questions <= 3 else 2


def _distinct(questions: list[str]) -> list[str]:
    """The questions, sorted, less those that differ from an earlier one only in case, spacing or a space before
    punctuation ("What is X ?" and "what is X?" are one question, so it cannot sit in train and test at once)."""
    kept: dict[str, str] = {}
    for question in sorted(set(questions)):
        kept.setdefault(re.sub(r"\s+([?.,!;:])", r"\1", " ".join(question.split())).casefold(), question)
    return list(kept.values())


def read_zsre(files: list[str], config: ZsreModConfig, source: str) -> list[Fact]:
    """The facts of these KILT zsRE files, in file order (`source` names them in errors)."""
    count = _counter(config)
    facts, too_long = [], 0
    for path in files:
        for number, record in enumerate(read_jsonl(path, ("id", "input", "output", "meta")), start=1):
            if " [SEP] " not in record["input"]:
                raise ValueError(f"{path}, line {number}: input {record['input']!r} is not 'subject [SEP] relation'.")
            subject, relation = record["input"].split(" [SEP] ", 1)
            if not config.reads(relation):
                continue
            answers = [o["answer"] for o in record["output"] if isinstance(o, dict) and o.get("answer")]
            questions = _distinct(record["meta"].get("template_questions") or [])
            questions = [q for q in questions if count(q) + 1 <= config.max_input_tokens]
            if not answers or not questions:
                continue
            if count(answers[0]) > config.max_answer_tokens:
                too_long += 1
                continue
            uuid = str(record["id"])
            test = random.Random(f"{config.seed}:{uuid}").sample(questions, n_test_questions(len(questions)))
            texts = lambda qs: [f"{q} {PLACEHOLDER}" for q in qs]  # noqa: E731
            train = [q for q in questions if q not in test]
            facts.append(Fact(uuid, relation, subject, answers[0], texts(train), texts(sorted(test))))
    if too_long:
        logger.warning("Skipped %d facts whose answer is longer than %d tokens.", too_long, config.max_answer_tokens)
    if not facts:
        raise ValueError(f"No usable zsRE facts in {source}.")
    return facts
