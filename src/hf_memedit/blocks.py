"""Which Transformer blocks an edit may change: the config and its resolution to parameters."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from torch import nn
from transformers import PreTrainedModel

from .architectures import BlockLayout, block_list, embedding_modules, layout_for, num_blocks, resolve_module
from .files import atomic_write_text, read_json


CONFIG_NAME = "memedit_config.json"
ALL = "all"
EMBEDDINGS = "embeddings"


def parse_block_spec(blocks: list[str | int] | str | int) -> list[str | int]:
    """Normalise a block selection: ints (negative counts from the end), "all", "embeddings".

    Accepts what YAML and command lines give: "0", "0,3", ["embeddings", "-1"], 2.
    """
    items = blocks if isinstance(blocks, (list, tuple)) else [blocks]
    parsed: list[str | int] = []
    for item in items:
        parts = [item] if isinstance(item, int) and not isinstance(item, bool) else str(item).split(",")
        for part in parts:
            if isinstance(part, int):
                parsed.append(part)
                continue
            token = part.strip().lower()
            if token in (ALL, EMBEDDINGS):
                parsed.append(token)
            elif token.lstrip("-").isdigit():
                parsed.append(int(token))
            else:
                raise ValueError(
                    f"Unknown block {part!r} in blocks={blocks!r}: use block indices (0, 1, -1 for the "
                    f"last), {ALL!r} or {EMBEDDINGS!r}."
                )
    if not parsed:
        raise ValueError("blocks is empty: name at least one block index, 'all' or 'embeddings'.")
    return list(dict.fromkeys(parsed))


@dataclass
class BlockSelectorConfig:
    """Which parts of a model an edit trains; everything else stays frozen (PEFT-style config).

    `blocks_path` / `embeddings_paths` are needed only for architectures outside the table in
    `hf_memedit.architectures`.
    """

    blocks: list[str | int] = field(
        default_factory=lambda: [0],
        metadata={"help": "Blocks to edit: indices (negative counts from the end), 'all', 'embeddings'."},
    )
    blocks_path: str | None = field(
        default=None,
        metadata={
            "help": "For architectures not in the table: path of the "
            "nn.ModuleList of blocks, relative to model.base_model."
        },
    )
    embeddings_paths: list[str] | None = field(
        default=None,
        metadata={
            "help": "For architectures not in the table: paths of the embedding modules, relative to model.base_model."
        },
    )
    modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Train only these submodules of each selected block (paths relative to the block, "
            "or 'mlp_out' for its MLP output projection, as FT-L does); None: whole blocks."
        },
    )
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The model the edit applies to (filled in by get_edit_model)."}
    )

    def __post_init__(self):
        self.blocks = parse_block_spec(self.blocks)

    def to_dict(self) -> dict:
        return asdict(self)

    def selection(self) -> dict:
        """What the selection trains, without the base model's name: what a shared edit declares."""
        return {key: value for key, value in self.to_dict().items() if key != "base_model_name_or_path"}

    def layout(self, model: PreTrainedModel) -> BlockLayout:
        """The block layout this selection is read against: the table's, or the user's `blocks_path`."""
        return layout_for(model, self.blocks_path, self.embeddings_paths)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> BlockSelectorConfig:
        data = read_json(
            os.path.join(directory, CONFIG_NAME),
            f"No {CONFIG_NAME} in {directory}: it is not an edit saved by hf_memedit.",
        )
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> BlockSelectorConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a block selection is a JSON object, not {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in data.items() if key in known})


def resolved_blocks(model: PreTrainedModel, config: BlockSelectorConfig) -> list[str]:
    """The selection's blocks as this model resolves them ("-5" of 30 blocks is "25"; 'all' and 'embeddings' kept)."""
    count = num_blocks(model, config.layout(model))
    return [str(item % count) if isinstance(item, int) else str(item) for item in config.blocks]


def selected_modules(model: PreTrainedModel, config: BlockSelectorConfig) -> dict[str, nn.Module]:
    """The modules the selection trains, keyed by a readable label ("block 2", "embeddings")."""
    layout = config.layout(model)
    count = num_blocks(model, layout)
    modules: dict[str, nn.Module] = {}
    for item in config.blocks:
        if item == EMBEDDINGS:
            if not layout.embeddings:
                raise ValueError(
                    f"No embedding modules are known for {type(model).__name__}: pass `embeddings_paths`."
                )
            for path, module in embedding_modules(model, layout).items():
                modules[f"embeddings ({path})"] = module
        elif item == ALL:
            modules["all blocks"] = resolve_module(model, layout.blocks)
        elif layout.shared_blocks:
            raise ValueError(
                f"{type(model).__name__} shares one set of weights across all its {count} layers "
                f"({layout.blocks}): block {item} cannot be edited without editing every layer. "
                "Use blocks=['all'] (optionally with 'embeddings')."
            )
        else:
            if not -count <= item < count:
                raise ValueError(
                    f"Unknown block index {item}: {type(model).__name__} has {count} blocks, valid indices "
                    f"are 0..{count - 1} (or -{count}..-1 from the end), 'all' and 'embeddings'."
                )
            index = item % count
            modules[f"block {index}"] = block_list(model, layout)[index]
    if config.modules:
        modules = _block_submodules(model, layout, modules, config.modules)
    return modules


def _block_submodules(model, layout, modules: dict[str, nn.Module], paths: list[str]) -> dict[str, nn.Module]:
    """Narrow each selected block to the submodules `paths` (embedding selections stay whole)."""
    narrowed: dict[str, nn.Module] = {}
    for label, module in modules.items():
        if label.startswith(EMBEDDINGS):
            narrowed[label] = module
            continue
        blocks = list(module) if isinstance(module, nn.ModuleList) else [module]
        for number, block in enumerate(blocks):
            for path in paths:
                real = layout.mlp_out if path == "mlp_out" else path
                if real is None:
                    raise ValueError(
                        f"No MLP output projection is known for {type(model).__name__} (the block "
                        "table has none: a mixture of experts holds every expert's projections in "
                        "one module): give a path in the block instead, e.g. edit_modules: [mlp]."
                    )
                try:
                    narrowed[f"{label}{'' if len(blocks) == 1 else f' {number}'} {path}"] = block.get_submodule(real)
                except AttributeError:
                    children = ", ".join(name for name, _ in block.named_modules() if name)[:300]
                    raise ValueError(
                        f"{label} of {type(model).__name__} has no submodule {real!r}; it holds: {children}..."
                    ) from None
    return narrowed


def selected_parameter_names(model: PreTrainedModel, config: BlockSelectorConfig) -> list[str]:
    """Names (as `model.named_parameters()` gives them) of the parameters the selection trains.

    Matching is by module identity, so block 2 never picks up block 12 or 21.
    """
    chosen = {id(p) for module in selected_modules(model, config).values() for p in module.parameters()}
    names = [name for name, param in model.named_parameters() if id(param) in chosen]
    if not names:
        raise ValueError(
            f"The selection blocks={config.blocks} holds no parameters in {type(model).__name__}: "
            "nothing would be trained. Choose other blocks."
        )
    return names
