"""hf_memedit: edit the facts a Transformer language model has memorised, and nothing else."""

from importlib.metadata import version

from .architectures import ARCHITECTURES, BlockLayout, model_kind
from .benchmarks import load_benchmark
from .blocks import BlockSelectorConfig
from .collators import FactCollator, FactEncoder, FactEncodingError, filter_encodable
from .edit_config import EditConfig
from .edit_trainer import ConstrainedEditTrainer
from .evaluation.metrics import AVG_ACC_METRIC_PATH, avg_acc, edit_metrics, evaluate_splits
from .evaluation.results import ResultsRecord, library_versions
from .evaluation.scoring import (
    FactResults,
    candidate_vocabulary,
    evaluate_facts,
    generate_answers,
    generate_facts,
    object_log_probs,
)
from .experiments.facts_edit import edit_facts
from .experiments.stream import edit_stream
from .facts import FactRecord, FactsFileError, check_lengths, describe_facts, facts_splits, load_facts, read_facts
from .fast_paths.heads import object_positions_only
from .fast_paths.prefix import PrefixCache
from .hub import apply_edit, package_edit, push_edit, revert_edit
from .keys import KeyStatistics, preserved_keys
from .knn import KnnDatastore
from .model import EditModel, get_edit_model
from .preservation import Locality, NeighbourRisk, disjoint_split, neighbour_risk, preservation_batches
from .projection import KeyProjector, NormBallProjector, project_fisher_, project_l2_, project_linf_
from .sharding import end_process_group


__version__ = version("hf_memedit")

__all__ = [
    "ARCHITECTURES",
    "AVG_ACC_METRIC_PATH",
    "BlockLayout",
    "BlockSelectorConfig",
    "ConstrainedEditTrainer",
    "EditConfig",
    "EditModel",
    "FactCollator",
    "FactEncoder",
    "FactEncodingError",
    "FactRecord",
    "FactResults",
    "FactsFileError",
    "KeyProjector",
    "KeyStatistics",
    "KnnDatastore",
    "Locality",
    "NeighbourRisk",
    "NormBallProjector",
    "PrefixCache",
    "ResultsRecord",
    "apply_edit",
    "avg_acc",
    "candidate_vocabulary",
    "check_lengths",
    "describe_facts",
    "disjoint_split",
    "edit_facts",
    "edit_stream",
    "edit_metrics",
    "end_process_group",
    "evaluate_facts",
    "evaluate_splits",
    "facts_splits",
    "filter_encodable",
    "generate_answers",
    "generate_facts",
    "object_log_probs",
    "get_edit_model",
    "library_versions",
    "load_benchmark",
    "load_facts",
    "package_edit",
    "neighbour_risk",
    "preservation_batches",
    "preserved_keys",
    "model_kind",
    "object_positions_only",
    "project_fisher_",
    "project_l2_",
    "project_linf_",
    "push_edit",
    "read_facts",
    "revert_edit",
]
