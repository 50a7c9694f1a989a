"""hf_memedit: edit the facts a Transformer language model has memorised, and nothing else."""

from .architectures import ARCHITECTURES, BlockLayout, model_kind
from .blocks import BlockSelectorConfig
from .collators import FactCollator, FactEncoder, FactEncodingError, filter_encodable
from .config import EditConfig
from .model import EditModel, get_edit_model
from .projection import NormBallProjector, project_l2_, project_linf_
from .trainer import ConstrainedEditTrainer

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "BlockLayout",
    "BlockSelectorConfig",
    "ConstrainedEditTrainer",
    "EditConfig",
    "EditModel",
    "FactCollator",
    "FactEncoder",
    "FactEncodingError",
    "NormBallProjector",
    "filter_encodable",
    "get_edit_model",
    "model_kind",
    "project_l2_",
    "project_linf_",
]
