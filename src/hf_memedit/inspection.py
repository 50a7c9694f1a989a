"""What hf_memedit would edit in a model, read from the block table: `memedit inspect` and the list in docs/models.md.

A user checks a model before editing it: where its blocks, embeddings, LM head and MLP output
projections are, how many parameters each block holds, and which fast paths its forward allows.
Built on the model's structure alone, so a 70B model is inspected from its config on the meta
device, without its weights.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from .architectures import (
    ARCHITECTURES,
    BlockLayout,
    block_list,
    embedding_modules,
    layout_for,
    model_kind,
    num_blocks,
    table_layout,
)
from .blocks import BlockSelectorConfig, selected_parameter_names
from .fast_paths.heads import head_modules
from .fast_paths.prefix import unsafe_reason


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _prefix_starts(model: PreTrainedModel, layout: BlockLayout) -> str:
    if layout.shared_blocks:
        return "none (every block runs the same weights: nothing below an edit is frozen)"
    blocks = range(1, num_blocks(model, layout))
    refused = {block: unsafe_reason(model, block) for block in blocks}
    allowed = [block for block, reason in refused.items() if reason is None]
    if len(allowed) == len(blocks):
        return "from any block"
    first = next(reason for reason in refused.values() if reason is not None)
    if not allowed:
        return f"none ({first})"
    return f"from blocks {', '.join(map(str, allowed))} only ({first})"


def describe_layout(
    model: PreTrainedModel,
    blocks_path: str | None = None,
    embeddings_paths: list[str] | None = None,
    selection: BlockSelectorConfig | None = None,
) -> str:
    """The block layout hf_memedit uses for `model`, as text: what `memedit inspect` prints.

    `selection`: an edit's block selection, whose trainable parameters are counted too.
    """
    layout = layout_for(model, blocks_path, embeddings_paths)
    row = table_layout(model)
    prefix = f"{model.base_model_prefix}." if model.base_model is not model else ""
    source = "the user's blocks_path" if blocks_path is not None else "hf_memedit's block table"
    kind = model_kind(model)
    lines = [
        f"{type(model).__name__} (model_type {model.config.model_type!r}, {kind} LM), layout from {source}",
        f"parameters: {_count(model):,d}",
    ]
    blocks = block_list(model, layout)
    counts = [_count(block) for block in blocks]
    shared = " (one set of weights shared by every block: edit them with 'all')" if layout.shared_blocks else ""
    lines.append(f"blocks: {prefix}{layout.blocks}, {num_blocks(model, layout)} blocks{shared}")
    lines.append(
        "embeddings: "
        + ", ".join(
            f"{prefix}{path} ({_count(module):,d})" for path, module in embedding_modules(model, layout).items()
        )
    )
    head = head_modules(model) if blocks_path is None else None
    lines.append(
        f"LM head: {', '.join(row.head)}"
        if head is not None
        else "LM head: unknown (the full head runs: no object-position-only logits)"
    )
    mlp_out = row.mlp_out if row is not None and blocks_path is None else None
    lines.append(f"mlp_out: {mlp_out}" if mlp_out else "mlp_out: none known (give edit_modules paths in the block)")
    stages = row.row_wise if row is not None and blocks_path is None else ()
    lines.append("row-wise stages of the last block: " + ("; ".join(" → ".join(s) for s in stages) or "none"))
    lines.append(f"prefix cache: {_prefix_starts(model, layout)}")
    if selection is not None:
        names = selected_parameter_names(model, selection)
        total = sum(model.get_parameter(name).numel() for name in names)
        lines.append(f"this edit trains: edit_blocks {selection.blocks}, {len(names)} tensors, {total:,d} parameters")
    lines += [
        "",
        "| block | parameters |" + (" mlp_out |" if mlp_out else ""),
        "|---|---|" + ("---|" if mlp_out else ""),
    ]
    for index, (block, count) in enumerate(zip(blocks, counts)):
        extra = f" {_count(block.get_submodule(mlp_out)):,d} |" if mlp_out else ""
        lines.append(f"| {index} | {count:,d} |{extra}")
    return "\n".join(lines)


def architectures_markdown() -> str:
    """The block table as docs/models.md's list of supported architectures (a test keeps the two equal)."""
    lines = ["| model_type | blocks | embeddings | LM head | mlp_out | notes |", "|---|---|---|---|---|---|"]
    for model_type, layout in ARCHITECTURES.items():
        notes = []
        if layout.shared_blocks:
            notes.append("shared blocks: only `all`")
        if layout.positional_config:
            notes.append(f"prefix cache where `{'`, `'.join(layout.positional_config)}` repeats")
        if layout.prefix_breakers:
            notes.append(f"no prefix cache with `{'`, `'.join(layout.prefix_breakers)}` set")
        embeddings = ", ".join(f"`{path}`" for path in layout.embeddings + layout.optional_embeddings)
        lines.append(
            f"| `{model_type}` | `{layout.blocks}` | {embeddings} | {', '.join(f'`{p}`' for p in layout.head)} | "
            f"{f'`{layout.mlp_out}`' if layout.mlp_out else '–'} | {'; '.join(notes)} |"
        )
    return "\n".join(lines)
