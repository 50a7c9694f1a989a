"""The model card of an edit, rendered from `hub_cards/memedit_edit_card.md` (package data) through huggingface_hub's
ModelCard."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard_data import EvalResult

from ..architectures import ModelKind
from ..edit_config import describe_constraint
from ..evaluation.results import METRIC_LABELS, format_metric, format_versions


CARD_TEMPLATE = (
    "memedit_edit_card.md"  # in the top-level hub_cards/, package data through the link hf_memedit/hub_cards
)


def card_template() -> str:
    """The model card template, as the package ships it (a checkout, an editable install and a wheel alike)."""
    return files("hf_memedit").joinpath("hub_cards", CARD_TEMPLATE).read_text(encoding="utf-8")


def render_card(manifest: dict[str, Any], repo_id: str, kind: str, license: str | None = None) -> ModelCard:
    """The model card of an edit, from the package's card template through huggingface_hub's ModelCard."""
    base = manifest["base_model"]
    base_id = base["repo_id"]
    metrics = manifest["metrics"]
    benchmark = manifest["config"].get("benchmark", "facts")
    m = manifest["config"].get("m", len(manifest["facts"]))
    task = ModelKind(kind).pipeline_tag
    eval_results = [
        EvalResult(
            task_type=task,
            dataset_type=f"hf_memedit/{benchmark}",
            dataset_name=f"{benchmark} (m = {m})",
            metric_type=key,
            metric_name=METRIC_LABELS[key],
            metric_value=round(100 * metrics[key], 2),
        )
        for key in ("a_m", "a_fs", "avg_acc", "retention")
        if metrics.get(key) is not None
    ]
    card_data = ModelCardData(
        base_model=base_id,
        license=license or "other",
        tags=["hf_memedit", "knowledge-editing", "model-editing"],
        library_name="transformers",
        pipeline_tag=task,
        model_name=repo_id,
        eval_results=eval_results or None,
    )
    constraint = manifest["constraint"]
    tensors = manifest["tensors"]
    auto_class = ModelKind(kind).auto_class.__name__
    base_label = (
        base_id or f"a local {base['config'].get('model_type', '')} model (config sha256 {base['config_sha256'][:12]})"
    )
    load_name = base_id or "path/to/the/base/model"
    plain = {
        "delta": "Without hf_memedit: load `memedit_edit.safetensors` with `safetensors.torch.load_file` and copy "
        "each tensor into the parameter of the same name (after checking the base's sha256 in the manifest).",
        "full": f'Without hf_memedit: `{auto_class}.from_pretrained("{repo_id}")` '
        "— this repository is a complete checkpoint.",
        "peft": f'Without hf_memedit: `PeftModel.from_pretrained({auto_class}.from_pretrained("{load_name}"), '
        f'"{repo_id}").merge_and_unload()`.',
    }[manifest["format"]]
    metrics_table = "\n".join(
        ["| metric | value |", "|---|---|"]
        + [f"| {label} | {format_metric(metrics, key)} |" for key, label in METRIC_LABELS.items() if key in metrics]
    )
    return ModelCard.from_template(
        card_data,
        template_str=card_template(),
        title=f"{base_label}, edited: {len(manifest['facts'])} facts changed",
        base_model_label=base_label,
        base_model_load=load_name,
        base_model_url=f"https://huggingface.co/{base_id}" if base_id else "#",
        n_facts=len(manifest["facts"]),
        constraint_text=describe_constraint(
            {
                key: value
                for key, value in constraint.items()
                if key not in ("blocks", "modules", "blocks_path", "embeddings_paths")
            }
        ),
        format=manifest["format"],
        format_text={
            "delta": "only the changed tensors; apply them to the base model.",
            "full": "a complete checkpoint with the edit merged in.",
            "peft": "a PEFT LN-tuning adapter holding the changed modules.",
        }[manifest["format"]],
        n_tensors=len(tensors),
        n_parameters=f"{sum(_numel(t['shape']) for t in tensors.values()):,}",
        blocks_text=_selection_text(constraint),
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


def _selection_text(constraint: dict[str, Any]) -> str:
    text = ", ".join(f"block {b}" if str(b).lstrip("-").isdigit() else str(b) for b in constraint["blocks"])
    return text + (f" (modules {', '.join(constraint['modules'])})" if constraint.get("modules") else "")


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
