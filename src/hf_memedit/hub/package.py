"""A run folder (`edit/` + `results.json`) turned into a shareable folder: files, manifest and card."""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..architectures import model_kind
from ..blocks import BlockSelectorConfig
from ..edit_config import constraint_record
from ..evaluation.results import ResultsRecord
from ..io import atomic_directory, check_target, load_tensors
from ..model import BASE_WEIGHTS_NAME, WEIGHTS_NAME, EditModel
from ..packaged import PACKAGED_MODELS
from ..run_folder import verify_run
from .apply import CHAIN_ATTRIBUTE, chain_of
from .card import render_card
from .manifest import MANIFEST_NAME, build_manifest, write_manifest


def package_edit(
    run_dir: str,
    out_dir: str,
    format: str = "delta",
    base_model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Turn a run folder (`edit/` + `results.json`) into a shareable folder; returns its manifest.

    `full` and `peft` need the base model the edit was made on (and its tokenizer). `out_dir`
    must be new or empty; `overwrite=True` replaces an earlier package, never another folder.
    """
    out_dir = check_target(
        out_dir, [run_dir], lambda folder: os.path.isfile(os.path.join(folder, MANIFEST_NAME)), "package", overwrite
    )
    verify_run(run_dir)
    edit_dir = os.path.join(run_dir, "edit")
    after = load_tensors(os.path.join(edit_dir, WEIGHTS_NAME))
    base = load_tensors(os.path.join(edit_dir, BASE_WEIGHTS_NAME))
    selector = BlockSelectorConfig.from_pretrained(edit_dir)
    record = ResultsRecord.load(run_dir)
    model_name = record.config.get("model_name_or_path") or selector.base_model_name_or_path
    packaged = PACKAGED_MODELS.get(model_name)
    base_repo_id, base_license = (packaged.hub_id, packaged.license) if packaged else (model_name, None)
    if format in ("full", "peft") and base_model is None:
        raise ValueError(
            f"format {format!r} writes the edited model, so package_edit needs base_model (and tokenizer): the model "
            "the edit was made on (`memedit push` loads it from the run's config)."
        )
    chain = chain_of(base_model) if base_model is not None else []

    with atomic_directory(out_dir) as staging:
        shutil.copy2(os.path.join(edit_dir, BASE_WEIGHTS_NAME), os.path.join(staging, BASE_WEIGHTS_NAME))
        if format == "delta":
            shutil.copy2(os.path.join(edit_dir, WEIGHTS_NAME), os.path.join(staging, WEIGHTS_NAME))
            selector.save_pretrained(staging)
        elif format == "full":
            edit = EditModel.from_pretrained(base_model, edit_dir)
            setattr(edit.model.config, CHAIN_ATTRIBUTE, chain)
            edit.model.save_pretrained(staging, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            edit.unload()  # the caller's base model gets its exact weights back
        elif format == "peft":
            _save_peft_adapter(base_model, after, staging)
        else:
            raise ValueError(f"Unknown format {format!r}: choose delta, full or peft.")
        manifest = build_manifest(
            format=format, base_repo_id=base_repo_id, base_revision=record.config.get("revision"),
            after=after, base=base,
            constraint={**constraint_record(record.config), "blocks": selector.blocks},
            facts=record.facts, metrics=record.metrics, config=record.config, seed=record.seed,
            versions=record.versions, chain=chain,
        )
        card = render_card(manifest, repo_id or "<your-repo-id>", kind=_kind_of(base_model, record), license=license or base_license)
        card.save(os.path.join(staging, "README.md"))
        manifest = write_manifest(staging, manifest)
    return manifest


def _kind_of(model: PreTrainedModel | None, record: ResultsRecord) -> str:
    if model is not None:
        return model_kind(model)
    if "model_kind" not in record.config:
        raise ValueError("The run's results.json does not say whether the model is masked or causal: pass base_model.")
    return record.config["model_kind"]


def _leaf_modules(model: PreTrainedModel, names) -> list[str]:
    modules = dict(model.named_modules())
    leaves = sorted({name.rsplit(".", 1)[0] for name in names})
    for leaf in leaves:
        if leaf not in modules or list(modules[leaf].children()):
            raise ValueError(f"{leaf} is not a leaf module; it cannot be shared as a PEFT adapter. Use 'delta'.")
    return leaves


def _save_peft_adapter(base_model: PreTrainedModel, after: dict[str, torch.Tensor], folder: str) -> None:
    from peft import LNTuningConfig, get_peft_model

    leaves = _leaf_modules(base_model, after)
    pattern = "^(" + "|".join(re.escape(leaf) for leaf in leaves) + ")$"
    peft_model = get_peft_model(base_model, LNTuningConfig(target_modules=pattern))
    try:
        adapted = dict(peft_model.named_modules())
        with torch.no_grad():
            for name, value in after.items():
                leaf, attribute = name.rsplit(".", 1)
                trainable = adapted[f"base_model.model.{leaf}"].ln_tuning_layers["default"]
                getattr(trainable, attribute).copy_(value)
        peft_model.save_pretrained(folder, safe_serialization=True)
    finally:
        peft_model.unload()


