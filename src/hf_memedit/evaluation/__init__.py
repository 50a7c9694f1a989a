"""Measuring an edit: fact scoring (`scoring`), the paper's metrics and what accuracy hides
(`metrics`), the results record (`results`), and the packaged `evaluate` module (`evaluate_metrics`)."""

from .metrics import AVG_ACC_METRIC_PATH, avg_acc, edit_metrics, evaluate_splits
from .results import METRIC_LABELS, ResultsRecord, format_metric, format_percent, library_versions
from .scoring import FactResults, candidate_vocabulary, evaluate_facts


__all__ = [
    "AVG_ACC_METRIC_PATH",
    "METRIC_LABELS",
    "FactResults",
    "ResultsRecord",
    "avg_acc",
    "candidate_vocabulary",
    "edit_metrics",
    "evaluate_facts",
    "evaluate_splits",
    "format_metric",
    "format_percent",
    "library_versions",
]
