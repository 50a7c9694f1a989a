"""Where the Transformer blocks of each supported architecture live.

This is the only place that knows model internals: every other module asks `layout_for` and
works with module objects, so block 2 is `blocks[2]` and never a substring match on `layer.2`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, PreTrainedModel
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)


@dataclass(frozen=True)
class BlockLayout:
    """Module paths, relative to `model.base_model`, of the blocks and the embeddings.

    `blocks` names an `nn.ModuleList` whose i-th entry is Transformer block i. `shared_blocks`
    marks architectures (ALBERT) whose blocks all reuse one set of weights, so a single block
    cannot be edited without editing all of them. `head` lists, relative to the LM model itself,
    the modules that turn the base model's last hidden state into vocabulary logits, applied in
    order: evaluation runs them on the object positions only. `mlp_out`, relative to a block, is
    the MLP's output projection (what ROME/EasyEdit's FT-L trains), selectable as "mlp_out".
    `optional_embeddings` are further embedding modules that only some configurations build
    (ELECTRA projects its embeddings when they are narrower than the hidden size): selected with
    'embeddings' where present. `row_wise`, relative to a block, lists the block's stages that work
    position by position and whose output at a position feeds only that position's output: the
    query projection, the attention's output projection, the feed-forward. Each stage is a tuple
    of modules in call order, the first taking `[batch, length, hidden]` states, the last returning
    them (further arguments shaped like them, such as BERT's residual, go with them). Key and value
    projections are not stages: attention reads them at every position.
    """

    blocks: str
    embeddings: tuple[str, ...]
    optional_embeddings: tuple[str, ...] = ()
    shared_blocks: bool = False
    head: tuple[str, ...] = ()
    mlp_out: str | None = None
    row_wise: tuple[tuple[str, ...], ...] = ()


_BERT_ROWS = (("attention.self.query",), ("attention.output",), ("intermediate", "output"))

ARCHITECTURES: dict[str, BlockLayout] = {
    "bert": BlockLayout(
        blocks="encoder.layer", embeddings=("embeddings",), head=("cls",), mlp_out="output.dense",
        row_wise=_BERT_ROWS,
    ),
    "roberta": BlockLayout(
        blocks="encoder.layer", embeddings=("embeddings",), head=("lm_head",), mlp_out="output.dense",
        row_wise=_BERT_ROWS,
    ),
    "electra": BlockLayout(
        blocks="encoder.layer", embeddings=("embeddings",), optional_embeddings=("embeddings_project",),
        head=("generator_predictions", "generator_lm_head"), mlp_out="output.dense", row_wise=_BERT_ROWS,
    ),
    "distilbert": BlockLayout(
        blocks="transformer.layer", embeddings=("embeddings",),
        head=("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"), mlp_out="ffn.lin2",
        row_wise=(("attention.q_lin",), ("attention.out_lin",), ("ffn",)),
    ),
    "albert": BlockLayout(
        blocks="encoder.albert_layer_groups",
        embeddings=("embeddings", "encoder.embedding_hidden_mapping_in"),
        shared_blocks=True,
        head=("predictions",),
        mlp_out="albert_layers.0.ffn_output",
    ),
    "gpt2": BlockLayout(  # its query shares one projection (c_attn) with the keys and values
        blocks="h", embeddings=("wte", "wpe"), head=("lm_head",), mlp_out="mlp.c_proj", row_wise=(("attn.c_proj",), ("mlp",))
    ),
    "llama": BlockLayout(
        blocks="layers", embeddings=("embed_tokens",), head=("lm_head",), mlp_out="mlp.down_proj",
        row_wise=(("self_attn.q_proj",), ("self_attn.o_proj",), ("mlp",)),
    ),
}


def layout_for(
    model: PreTrainedModel, blocks_path: str | None = None, embeddings_paths: list[str] | None = None
) -> BlockLayout:
    """The block layout of `model`: from the table, or from user-given paths for other architectures.

    User paths are relative to `model.base_model`, like the table's, and take precedence over it.
    """
    model_type = getattr(model.config, "model_type", None)
    if blocks_path is not None:
        return BlockLayout(blocks=blocks_path, embeddings=tuple(embeddings_paths or ()))
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"Architecture {model_type!r} ({type(model).__name__}) is not in hf_memedit's block table "
            f"(known: {', '.join(sorted(ARCHITECTURES))}). Pass `blocks_path`: the dotted path, relative "
            "to `model.base_model`, of the nn.ModuleList holding its Transformer blocks (for example "
            "'encoder.layer'), and optionally `embeddings_paths`."
        )
    return ARCHITECTURES[model_type]


def table_layout(model: PreTrainedModel) -> BlockLayout | None:
    """The table's row for `model`, or None: the head and row-wise stages are known only for the table's
    architectures (a layout from `blocks_path` names the blocks alone)."""
    return ARCHITECTURES.get(getattr(model.config, "model_type", None))


def resolve_module(model: PreTrainedModel, path: str) -> nn.Module:
    """`model.base_model.<path>`, with an error that lists what exists there when it does not."""
    base = model.base_model
    try:
        return base.get_submodule(path)
    except AttributeError:
        children = ", ".join(name for name, _ in base.named_children())
        raise ValueError(
            f"{type(model).__name__} has no module {path!r} under its base model "
            f"({type(base).__name__}; its children: {children}). Check `blocks_path` / `embeddings_paths`."
        ) from None


def block_list(model: PreTrainedModel, layout: BlockLayout) -> nn.ModuleList:
    blocks = resolve_module(model, layout.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(
            f"{layout.blocks!r} in {type(model).__name__} is a {type(blocks).__name__}, not the "
            "nn.ModuleList of Transformer blocks."
        )
    return blocks


def num_blocks(model: PreTrainedModel, layout: BlockLayout) -> int:
    """How many Transformer blocks the model runs (ALBERT: its virtual layers, not its weight groups)."""
    if layout.shared_blocks:
        return model.config.num_hidden_layers
    return len(block_list(model, layout))


class ModelKind(str, Enum):
    """Masked or causal LM: the one place that knows what the two kinds do differently.

    A `str` enum, so `kind == "causal"` and JSON records keep working.
    """

    MASKED = "masked"
    CAUSAL = "causal"

    def __str__(self) -> str:  # "masked", not "ModelKind.MASKED", in f-strings and records
        return self.value

    @property
    def auto_class(self) -> type:
        return AutoModelForMaskedLM if self is ModelKind.MASKED else AutoModelForCausalLM

    @property
    def forward_kwargs(self) -> dict[str, bool]:
        """What every scoring forward passes: a causal LM builds no KV cache for a single pass."""
        return {"use_cache": False} if self is ModelKind.CAUSAL else {}

    @property
    def logit_shift(self) -> int:
        """How many positions before an object token its logit stands (a causal LM predicts the next token)."""
        return 1 if self is ModelKind.CAUSAL else 0

    @property
    def pipeline_tag(self) -> str:
        return "fill-mask" if self is ModelKind.MASKED else "text-generation"

    @classmethod
    def of_config(cls, config) -> ModelKind:
        """The kind a model config describes (its architectures, else its model type), or a clear error."""
        for architecture in getattr(config, "architectures", None) or []:
            if architecture in MODEL_FOR_MASKED_LM_MAPPING_NAMES.values():
                return cls.MASKED
            if architecture in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
                return cls.CAUSAL
        causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        masked = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        if causal != masked:
            return cls.CAUSAL if causal else cls.MASKED
        raise ValueError(f"Cannot tell whether {config.model_type!r} is a masked or causal LM: set model_kind.")


def model_kind(model: nn.Module) -> ModelKind:
    """Which fact encoding and evaluation the model needs."""
    name = type(model).__name__
    if name in MODEL_FOR_MASKED_LM_MAPPING_NAMES.values():
        return ModelKind.MASKED
    if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return ModelKind.CAUSAL
    raise ValueError(
        f"{name} is neither a masked nor a causal language model: hf_memedit edits facts through an "
        "LM head. Load the model with AutoModelForMaskedLM or AutoModelForCausalLM."
    )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model.eval()` inside, the train/eval mode it had restored after (also on an error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
