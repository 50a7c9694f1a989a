"""Where the Transformer blocks of each supported architecture live.

This is the only place that knows model internals: every other module asks `layout_for` and
works with module objects, so block 2 is `blocks[2]` and never a substring match on `layer.2`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
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

    The frozen-prefix cache takes blocks 0..n-1 out of the block list and runs the model's own
    forward on the rest, which is exact only where that forward treats every block alike.
    `positional_config` names config lists the forward reads by a block's index in the list (Qwen2's
    and Gemma's `layer_types`): the cache then runs only from a block where the list repeats.
    `prefix_breakers` names config attributes that, when set, make the forward mix states across
    blocks outside them (DeBERTa-v2's convolution after block 0): the cache is off for such a model.
    """

    blocks: str
    embeddings: tuple[str, ...]
    optional_embeddings: tuple[str, ...] = ()
    shared_blocks: bool = False
    head: tuple[str, ...] = ()
    mlp_out: str | None = None
    row_wise: tuple[tuple[str, ...], ...] = ()
    positional_config: tuple[str, ...] = ()
    prefix_breakers: tuple[str, ...] = ()


_BERT_ROWS = (("attention.self.query",), ("attention.output",), ("intermediate", "output"))
_ROBERTA = BlockLayout(
    blocks="encoder.layer",
    embeddings=("embeddings",),
    head=("lm_head",),
    mlp_out="output.dense",
    row_wise=_BERT_ROWS,
)
# Llama and the decoders that copy its module names (transformers generates most of them from Llama's code).
_LLAMA_ROWS = (("self_attn.q_proj",), ("self_attn.o_proj",), ("mlp",))
_LLAMA = BlockLayout(
    blocks="layers",
    embeddings=("embed_tokens",),
    head=("lm_head",),
    mlp_out="mlp.down_proj",
    row_wise=_LLAMA_ROWS,
)
_LLAMA_BY_LAYER_TYPE = replace(_LLAMA, positional_config=("layer_types",))  # their forward indexes layer_types

ARCHITECTURES: dict[str, BlockLayout] = {
    # Masked LMs
    "bert": BlockLayout(
        blocks="encoder.layer",
        embeddings=("embeddings",),
        head=("cls",),
        mlp_out="output.dense",
        row_wise=_BERT_ROWS,
    ),
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "electra": BlockLayout(
        blocks="encoder.layer",
        embeddings=("embeddings",),
        optional_embeddings=("embeddings_project",),
        head=("generator_predictions", "generator_lm_head"),
        mlp_out="output.dense",
        row_wise=_BERT_ROWS,
    ),
    "distilbert": BlockLayout(
        blocks="transformer.layer",
        embeddings=("embeddings",),
        head=("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"),
        mlp_out="ffn.lin2",
        row_wise=(("attention.q_lin",), ("attention.out_lin",), ("ffn",)),
    ),
    "albert": BlockLayout(
        blocks="encoder.albert_layer_groups",
        embeddings=("embeddings", "encoder.embedding_hidden_mapping_in"),
        shared_blocks=True,
        head=("predictions",),
        mlp_out="albert_layers.0.ffn_output",
    ),
    "deberta-v2": BlockLayout(  # its query also projects the relative positions: not a row-wise stage
        blocks="encoder.layer",
        embeddings=("embeddings",),
        head=("cls",),
        mlp_out="output.dense",
        row_wise=(("attention.output",), ("intermediate", "output")),
        prefix_breakers=("conv_kernel_size",),
    ),
    "modernbert": BlockLayout(  # one fused Wqkv: no query stage
        blocks="layers",
        embeddings=("embeddings",),
        head=("head", "decoder"),
        mlp_out="mlp.Wo",
        row_wise=(("attn.Wo",), ("mlp",)),
    ),
    # Causal LMs
    "gpt2": BlockLayout(  # its query shares one projection (c_attn) with the keys and values
        blocks="h",
        embeddings=("wte", "wpe"),
        head=("lm_head",),
        mlp_out="mlp.c_proj",
        row_wise=(("attn.c_proj",), ("mlp",)),
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "gemma": _LLAMA,
    "olmo2": _LLAMA,
    "granite": _LLAMA,
    "stablelm": _LLAMA,
    "qwen2": _LLAMA_BY_LAYER_TYPE,
    "qwen3": _LLAMA_BY_LAYER_TYPE,
    "gemma2": _LLAMA_BY_LAYER_TYPE,
    "gemma3_text": _LLAMA_BY_LAYER_TYPE,
    # Mixtral's experts hold every expert's projections in two fused tensors (mlp.experts): no single
    # MLP output projection. Its router picks experts token by token, so the MoE is a row-wise stage.
    "mixtral": replace(_LLAMA, mlp_out=None),
    "phi3": replace(_LLAMA, row_wise=(("self_attn.o_proj",), ("mlp",))),  # fused qkv_proj
    "gpt_neox": BlockLayout(  # fused query_key_value
        blocks="layers",
        embeddings=("embed_in",),
        head=("lm_head",),
        mlp_out="mlp.dense_4h_to_h",
        row_wise=(("attention.dense",), ("mlp",)),
    ),
    "gptj": BlockLayout(
        blocks="h",
        embeddings=("wte",),
        head=("lm_head",),
        mlp_out="mlp.fc_out",
        row_wise=(("attn.q_proj",), ("attn.out_proj",), ("mlp",)),
    ),
    "falcon": BlockLayout(  # fused query_key_value
        blocks="h",
        embeddings=("word_embeddings",),
        head=("lm_head",),
        mlp_out="mlp.dense_4h_to_h",
        row_wise=(("self_attention.dense",), ("mlp",)),
    ),
    "opt": BlockLayout(  # its feed-forward (fc1, fc2 on the block itself) runs on flattened rows: not a stage
        blocks="decoder.layers",
        embeddings=("decoder.embed_tokens", "decoder.embed_positions"),
        optional_embeddings=("decoder.project_in",),
        head=("lm_head",),
        mlp_out="fc2",
        row_wise=(("self_attn.q_proj",), ("self_attn.out_proj",)),
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


# Config fields that do not change the function a model computes once loaded: switches of how it runs or
# generates (a user sets them per session), what only training or initialisation reads, and hf_memedit's own chain.
_RUNTIME_CONFIG_FIELDS = frozenset(
    {
        "use_cache",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "output_router_logits",
        "router_aux_loss_coef",
        "router_jitter_noise",
        "initializer_range",
        "memedit_chain",
    }
)
_TRAINING_ONLY_MARKS = ("dropout", "pdrop")


def architecture_config(config: PretrainedConfig) -> dict[str, Any]:
    """The fields of a model's config that decide what its weights compute: what its architecture adds to
    `PretrainedConfig` (sizes, activation, norm epsilon, rotary parameters, layer types...) and its model type,
    as plain JSON values. Two models with equal weights compute the same function only if these are equal too,
    so a shared edit identifies its base model by them (besides the base values of the tensors it changes)."""
    generic = set(PretrainedConfig().to_dict())
    fields = {
        key: value
        for key, value in config.to_dict().items()
        if key not in generic
        and not key.startswith("_")
        and key not in _RUNTIME_CONFIG_FIELDS
        and not any(mark in key for mark in _TRAINING_ONLY_MARKS)
    }
    return json.loads(json.dumps({"model_type": config.model_type, **fields}, sort_keys=True, default=str))


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


def embedding_modules(model: PreTrainedModel, layout: BlockLayout) -> dict[str, nn.Module]:
    """Path → module of the layout's embeddings: every required one, and the optional ones this config built."""
    modules = {path: resolve_module(model, path) for path in layout.embeddings}
    for path in layout.optional_embeddings:
        try:
            modules[path] = model.base_model.get_submodule(path)
        except AttributeError:
            pass  # this configuration does not build it
    return modules


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

    @property
    def generates(self) -> bool:
        """Whether the model writes text: it can be sampled (a data-free preservation corpus), scored by
        greedy generation, measured by next-token drift, and taught to stop after an object (EOS targets)."""
        return self is ModelKind.CAUSAL

    def tokenizer_problem(self, tokenizer: PreTrainedTokenizerBase, append_eos: bool) -> str | None:
        """Why `tokenizer` cannot encode facts for this kind of model, or None."""
        if append_eos and (not self.generates or tokenizer.eos_token_id is None):
            return "Appending EOS to the targets (eos_target) needs a causal LM whose tokenizer has an EOS token."
        if self is ModelKind.MASKED and tokenizer.mask_token_id is None:
            return (
                f"{type(tokenizer).__name__} has no mask token, so it cannot encode facts for a masked LM. "
                "Use the tokenizer that belongs to the masked LM."
            )
        return None

    def write_object(self, prefix: str, obj: str, suffix: str) -> tuple[str, int, int]:
        """The fact's text with the object written in, and the object's character span in it.

        A causal LM predicts the object from the text before it, so its text ends with the object, and
        the space before the object goes into it, as a BPE tokenizer writes a word (" Paris")."""
        if self is ModelKind.CAUSAL:
            suffix = ""
            if prefix.endswith(" "):
                prefix, obj = prefix.rstrip(" "), " " + obj
        start = len(prefix)
        return prefix + obj + suffix, start, start + len(obj)

    def model_inputs(
        self, ids: list[int], positions: list[int], tokenizer: PreTrainedTokenizerBase, append_eos: bool
    ) -> tuple[list[int], list[int]]:
        """The input ids the model sees and their labels (-100 but at the object's tokens), from the ids of the
        text with the object written in and the object's positions in them.

        A masked LM sees a mask at each object token. A causal LM sees the object itself, with anything
        after it cut (e.g. an EOS the tokenizer appends), and with `append_eos` the EOS token as one more target.
        """
        if self is ModelKind.CAUSAL:
            ids = ids[: positions[-1] + 1]
            if append_eos:
                ids, positions = ids + [tokenizer.eos_token_id], positions + [len(ids)]
        labels = [-100] * len(ids)
        for i in positions:
            labels[i] = ids[i]
        if self is ModelKind.MASKED:
            ids = [tokenizer.mask_token_id if label != -100 else t for t, label in zip(ids, labels)]
        return ids, labels

    @classmethod
    def of_config(cls, config: PretrainedConfig) -> ModelKind:
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
