"""The two fast paths, which change no result: object-position-only logits (`heads`) and the
frozen-prefix cache (`prefix`). `fast_forward` is their one entry point, used by training and
evaluation alike."""

from .heads import head_modules, logit_positions, object_positions_only, object_targets
from .prefix import PrefixCache, fast_forward, first_editable_block


__all__ = [
    "PrefixCache",
    "fast_forward",
    "first_editable_block",
    "head_modules",
    "logit_positions",
    "object_positions_only",
    "object_targets",
]
