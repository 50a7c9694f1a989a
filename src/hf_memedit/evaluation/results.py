"""The results record of an edit: metrics, config, seed and library versions, as JSON and Markdown.

The CLI writes it into the run folder; the diff manifest and the model card read it back.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ..files import atomic_write_text, read_json


RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
LOST_SHOWN = 50  # results.md lists this many lost facts; results.json lists them all
_LIBRARIES = ("hf_memedit", "torch", "transformers", "peft", "accelerate", "datasets", "evaluate", "huggingface_hub")

# The headline metrics, in table order, with the names the paper uses.
METRIC_LABELS = {
    "a_f_before": "A_F before the edit (all facts)",
    "a_fs_before": "A_F\\S before the edit",
    "a_m": "A_M (modified facts, every test phrasing right)",
    "a_m_train": "A_M on the training phrasing",
    "a_fs": "A_F\\S (unmodified facts)",
    "avg_acc": "Ā = (A_M + A_F\\S) / 2",
    "a_fs_drop": "drop in A_F\\S",
    "retention": "retention (unmodified, right before → still right)",
    "retention_edited": "retention on the edited relations",
    "retention_confident": "retention of the facts known by a margin ≥ 1",
    "agreement": "agreement (unmodified, same prediction)",
    "bleed": "bleed (lost facts now predicting a new object's first token)",
    "consistency": "consistency (facts an edit implies, e.g. read backwards)",
    "new_beats_old": "P(new) > P(old), teacher-forced (CounterFact's efficacy score)",
    "gen_a_m": "A_M by greedy generation",
    "gen_a_m_comma": "A_M by greedy generation, stopped at a comma",
    "gen_retention": "retention by greedy generation",
    "gen_retention_comma": "retention by greedy generation, stopped at a comma",
    "gen_bleed": "bleed by greedy generation (a whole new object)",
    "paraphrase_a_m": "generalisation: paraphrases the edit never saw",
    "gen_paraphrase_a_m": "generalisation by greedy generation",
    "question_a_m": "the question through the chat template",
    "gen_question_a_m": "the question through the chat template, by greedy generation",
}
# General drift (not fractions): the mean next-token KL(θ0 ‖ θ) and ppl(θ) / ppl(θ0) on held-out samples.
DRIFT_LABELS = {
    "drift_kl": "next-token KL(θ0 ‖ θ), held-out text",
    "perplexity_ratio": "perplexity ratio θ / θ0, held-out text",
}


def library_versions() -> dict[str, str]:
    """Installed versions of hf_memedit and the libraries an edit's numbers depend on."""
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def format_versions(versions: dict[str, str] | None = None) -> str:
    """ "hf_memedit 0.1.0, torch 2.13.0, ...": the versions given, or those installed now."""
    return ", ".join(
        f"{name} {number}" for name, number in (library_versions() if versions is None else versions).items()
    )


def plotting():
    """matplotlib's pyplot on the Agg backend (files, no screen), or an error saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("Plots need matplotlib: pip install 'hf_memedit[demo]'.") from None
    return plt


def format_percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


# Shares whose denominator is small enough to matter: shown with their counts.
_DENOMINATORS = {
    "retention": "n_known",
    "retention_edited": "n_known_edited",
    "retention_confident": "n_known_confident",
    "gen_retention": "gen_n_known",
    "gen_retention_comma": "gen_n_known_comma",
    "new_beats_old": "n_new_beats_old",
    "consistency": "n_consistency",
    "gen_bleed": "gen_n_lost",
    "paraphrase_a_m": "n_paraphrases",
    "gen_paraphrase_a_m": "n_paraphrases",
    "question_a_m": "n_questions",
    "gen_question_a_m": "n_questions",
}


def _mark(correct: bool | None) -> str:
    return "✓" if correct else "✗"


def _margin(value: float | None) -> str:
    """A lost fact's logit margin before the edit (older records have none)."""
    return "–" if value is None else f"{value:.2f}"


def _cell(text: str) -> str:
    """Free text (a generated answer) as one markdown table cell: whitespace runs as one space, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def format_metric(metrics: dict[str, Any], key: str) -> str:
    """A share as a percentage; retention with the facts it rests on ("94.59% (35 of 37)"), so a table of a
    few dozen known facts is not read as precise."""
    text = format_percent(metrics.get(key))
    total = metrics.get(_DENOMINATORS.get(key, ""))
    if total and metrics.get(key) is not None:
        text += f" ({round(metrics[key] * total)} of {total})"
    return text


@dataclass
class ResultsRecord:
    """What an edit reached and how it was made; `save` writes results.json and results.md atomically."""

    metrics: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    model: str | None = None
    benchmark: dict[str, Any] = field(default_factory=dict)
    facts: list[dict[str, Any]] = field(default_factory=list)  # the edited facts: uuid, relation, subject, old, new
    locality: dict[str, Any] = field(
        default_factory=dict
    )  # which unmodified facts were scored (preservation.Locality)
    lost: list[dict[str, Any]] = field(
        default_factory=list
    )  # the known unmodified facts the edit lost (metrics.lost_facts)
    scoring: dict[str, str] = field(default_factory=dict)  # figure -> how it was scored (the stop rule among them)
    seconds: float | None = None
    versions: dict[str, str] = field(default_factory=library_versions)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str) + "\n"

    def to_markdown(self) -> str:
        lines = ["| metric | value |", "|---|---|"]
        for key, label in METRIC_LABELS.items():
            if key in self.metrics:
                lines.append(f"| {label} | {format_metric(self.metrics, key)} |")
        for key, label in DRIFT_LABELS.items():
            if key in self.metrics:
                lines.append(f"| {label} | {self.metrics[key]:.4g} |")
        counts = ", ".join(
            f"{key} = {self.metrics[key]}"
            for key in ("n_modified", "n_unmodified", "n_consistency")
            if key in self.metrics
        )
        if counts:
            lines += ["", f"Facts: {counts}."]
        if self.locality.get("description"):
            lines += [
                "",
                f"Locality (A_F\\S, retention, agreement, bleed) measured on {self.locality['description']}.",
            ]
        if self.scoring:
            lines += ["", "How it was scored:", ""] + [f"- {what}: {how}." for what, how in self.scoring.items()]
        if self.facts:
            columns = [
                ("edited fact", lambda f: f["text"].replace("[Y]", "___")),
                ("old → new", lambda f: f"{f['old']} → {f['new']}"),
            ]
            if any("generated_before" in fact for fact in self.facts):
                columns.append(("generated before the edit", lambda f: _cell(f["generated_before"])))
            columns.append(
                ("predicted after the edit", lambda f: f"{f.get('predicted', '')} {_mark(f.get('correct'))}")
            )
            if any("generated" in fact for fact in self.facts):  # a run with generation_eval
                columns.append(
                    ("generated after the edit", lambda f: f"{_cell(f['generated'])} {_mark(f['generated_correct'])}")
                )
            if any(
                "question_answer" in fact for fact in self.facts
            ):  # a facts run's questions, through the chat template
                columns.append(
                    (
                        "question: before → after",
                        lambda f: (
                            f"{_cell(f['question_answer_before'])} → "
                            f"{_cell(f['question_answer'])} {_mark(f['question_correct'])}"
                            if "question_answer" in f
                            else ""
                        ),
                    )
                )
            lines += ["", "| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(cell(fact) for _, cell in columns) + " |" for fact in self.facts]
        if self.lost:
            shown = self.lost[:LOST_SHOWN]
            lines += [
                "",
                f"Facts the edit lost ({len(self.lost)} of the {self.metrics.get('n_known', '?')} known before it"
                + (f"; the first {LOST_SHOWN} here, all in {RESULTS_JSON}" if len(self.lost) > LOST_SHOWN else "")
                + "):",
                "",
                "| lost fact | object | predicted after the edit | a new object (bleed) | margin before the edit |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {fact['text'].replace('[Y]', '___')} | {fact['object']} | {fact['predicted']} "
                f"| {'yes' if fact['bleed'] else 'no'} | {_margin(fact.get('margin_before'))} |"
                for fact in shown
            ]
        per_relation = self.metrics.get("per_relation")
        if per_relation:
            lines += [
                "",
                "| relation | A_M | modified | A_F\\S | unmodified | retention |",
                "|---|---|---|---|---|---|",
            ]
            for relation, row in per_relation.items():
                lines.append(
                    f"| {relation} | {format_percent(row['a_m'])} | {row['n_modified']} | "
                    f"{format_percent(row['a_fs'])} | {row['n_unmodified']} | {format_metric(row, 'retention')} |"
                )
        about = {
            "model": self.model,
            "seed": self.seed,
            "wall time (s)": self.seconds,
            **{f"benchmark.{k}": v for k, v in self.benchmark.items()},
        }
        lines += ["", "| run | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in about.items() if value is not None]
        lines += [f"| {key} | {value} |" for key, value in sorted(self.config.items())]
        lines += ["", f"Library versions: {format_versions(self.versions)}."]
        return "\n".join(lines) + "\n"

    def save(self, folder: str | os.PathLike) -> tuple[str, str]:
        os.makedirs(folder, exist_ok=True)
        json_path, md_path = os.path.join(folder, RESULTS_JSON), os.path.join(folder, RESULTS_MD)
        atomic_write_text(json_path, self.to_json())
        atomic_write_text(md_path, self.to_markdown())
        return json_path, md_path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ResultsRecord:
        path = os.path.join(folder, RESULTS_JSON)
        return cls.from_dict(
            read_json(path, f"{folder} has no {RESULTS_JSON}: it is not an hf_memedit run folder."), path
        )

    @classmethod
    def from_dict(cls, data: Any, path: str) -> ResultsRecord:
        """The record `data` (a parsed results.json, `path` for the error) holds."""
        unknown = set(data) - {f.name for f in fields(cls)} if isinstance(data, dict) else {"<not an object>"}
        if unknown or "metrics" not in data:
            raise ValueError(f"{path} is not an hf_memedit results record (unexpected keys: {sorted(unknown)}).")
        return cls(**data)
