"""A run folder (`edit/` + `results.json`) turned into a shareable folder: files, manifest and card."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..architectures import architecture_config, model_kind
from ..blocks import CONFIG_NAME, BlockSelectorConfig
from ..edit_config import constraint_record
from ..evaluation.results import RESULTS_JSON, ResultsRecord
from ..files import atomic_directory, check_target, looks_like_path, tensors_from_bytes
from ..model import BASE_CONFIG_KEY, BASE_WEIGHTS_NAME, WEIGHTS_NAME, chain_of, values_at
from ..packaged import PACKAGED_MODELS
from ..run_folder import read_run
from .card import render_card
from .manifest import FORMATS, build_manifest, is_earlier_package, write_manifest
from .verify import check_constraint, check_edit, package_declaration


EDIT_FILE, BASE_FILE, SELECTION_FILE = (f"edit/{name}" for name in (WEIGHTS_NAME, BASE_WEIGHTS_NAME, CONFIG_NAME))
LOCAL = "<local>"  # what a pushed manifest and card say instead of a local path


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

    The run folder is read under its lock, every byte checked against the run's seal, so a package never
    mixes two runs. `full` and `peft` need the base model the edit was made on (and its tokenizer), which
    is checked against the edit first. `out_dir` must be new or empty; `overwrite=True` replaces an earlier
    package that holds nothing else, never another folder.
    """
    if format not in FORMATS:
        raise ValueError(f"Unknown format {format!r}: choose one of {', '.join(FORMATS)}.")
    if format in ("full", "peft") and base_model is None:
        raise ValueError(
            f"format {format!r} writes the edited model, so package_edit needs base_model (and tokenizer): the model "
            "the edit was made on (`memedit push` loads it from the run's config)."
        )
    out_dir = check_target(out_dir, [run_dir], is_earlier_package, "package", overwrite)
    run = read_run(run_dir, (EDIT_FILE, BASE_FILE, SELECTION_FILE, RESULTS_JSON))
    after, metadata = tensors_from_bytes(run[EDIT_FILE], os.path.join(run_dir, EDIT_FILE))
    base, _ = tensors_from_bytes(run[BASE_FILE], os.path.join(run_dir, BASE_FILE))
    selector = BlockSelectorConfig.from_dict(json.loads(run[SELECTION_FILE]))
    record = ResultsRecord.from_dict(json.loads(run[RESULTS_JSON]), os.path.join(run_dir, RESULTS_JSON))
    _check_finite(after, base, run_dir)
    model_name = record.config.get("model_name_or_path") or selector.base_model_name_or_path
    base_repo_id, base_license = _base_identity(model_name)
    selection = {key: value for key, value in selector.selection().items() if value is not None}
    manifest = build_manifest(
        format=format,
        base_repo_id=base_repo_id,
        base_revision=record.config.get("revision"),
        base_config=_base_config(metadata, base_model, run_dir),
        after=after,
        base=base,
        constraint={**constraint_record(record.config), **selection},
        facts=record.facts,
        metrics=record.metrics,
        config=_public_config(record.config, base_repo_id),
        seed=record.seed,
        versions=record.versions,
        chain=chain_of(base_model) if base_model is not None else [],
    )
    check_constraint(run_dir, manifest["constraint"], manifest["tensors"])
    if format != "delta":  # the package is built from base_model's weights: they must be the edit's base
        check_edit(base_model, package_declaration(run_dir, manifest), after, base, applying=True)

    with atomic_directory(out_dir) as staging:
        _write(os.path.join(staging, BASE_WEIGHTS_NAME), run[BASE_FILE])
        if format == "delta":
            _write(os.path.join(staging, WEIGHTS_NAME), run[EDIT_FILE])
            selector.base_model_name_or_path = base_repo_id
            selector.save_pretrained(staging)
        elif format == "full":
            params = dict(base_model.named_parameters())
            with values_at({name: params[name] for name in after}, after):  # the caller's model gets its weights back
                base_model.save_pretrained(staging, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
        else:
            _save_peft_adapter(base_model, after, staging)
        card = render_card(
            manifest, repo_id or "<your-repo-id>", kind=_kind_of(base_model, record), license=license or base_license
        )
        card.save(os.path.join(staging, "README.md"))
        manifest = write_manifest(staging, manifest)
    return manifest


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def _check_finite(after: dict[str, torch.Tensor], base: dict[str, torch.Tensor], run_dir: str) -> None:
    for name in sorted(after):
        if not (torch.isfinite(after[name]).all() and torch.isfinite(base[name]).all()):
            raise ValueError(
                f"The edit in {run_dir} holds NaN or infinite values in {name!r}: the training diverged, "
                "so it cannot be shared. Run the edit again (a smaller learning rate, or a norm bound)."
            )


def _base_config(metadata: dict[str, str], base_model: PreTrainedModel | None, run_dir: str) -> dict[str, Any]:
    """The base model's architecture config, as the run recorded it with its edit (or from `base_model`)."""
    if BASE_CONFIG_KEY in metadata:
        return json.loads(metadata[BASE_CONFIG_KEY])
    if base_model is not None:
        return architecture_config(base_model.config)
    raise ValueError(
        f"The edit in {run_dir} was saved by an earlier hf_memedit and does not record its base model's config: "
        "pass base_model (the model the edit was made on), or run the edit again."
    )


def _base_identity(model_name: str | None) -> tuple[str | None, str | None]:
    """(Hub id, licence) of the base model: a packaged model's, a Hub id as given, none for a local folder."""
    packaged = PACKAGED_MODELS.get(model_name)
    if packaged:
        return packaged.hub_id, packaged.license
    if not model_name or looks_like_path(model_name) or os.path.exists(model_name):
        return None, None
    return model_name, None


# Settings whose value is text the edit trained on, never a path: shown as they are ('.' is not a local folder).
TEXT_SETTINGS = frozenset({"target_suffix"})


def _public_config(config: dict[str, Any], base_repo_id: str | None) -> dict[str, Any]:
    """The run's config as a pushed package may show it: no local paths (the base is named by its Hub id)."""

    def public(value: Any) -> Any:
        if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~") or looks_like_path(value)):
            return LOCAL
        if isinstance(value, dict):
            return {key: item if key in TEXT_SETTINGS else public(item) for key, item in value.items()}
        if isinstance(value, list):
            return [public(item) for item in value]
        return value

    shown = public(config)
    if "model_name_or_path" in shown and PACKAGED_MODELS.get(config["model_name_or_path"]) is None:
        shown["model_name_or_path"] = base_repo_id or LOCAL
    return shown


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
