"""The one check every way an edit enters a model goes through, all of it before the first write.

`apply_edit`, `revert_edit` and `EditModel.from_pretrained` (so `memedit eval --edit_dir` too) read what
an edit folder declares and the tensors it holds (`verify_package` for a shared package, `verify_run_edit`
for a run's own `edit/` folder) and pass both to `check_edit`:

- each file holds exactly the declared tensors (a `full` checkpoint: the others equal to the model's own);
- every declared tensor is a parameter inside the declared blocks and modules, resolved through the block
  table, with the model's shape and dtype, finite values and the sha256 the folder records, edited and base;
- its change |Δ| against the base equals the declared `max_abs_delta` (and `l2_delta`) and lies within the
  declared constraint (the L∞ box or the L2 ball; a Fisher or key constraint needs statistics a package
  does not hold, so it is not checked);
- the model is the edit's base (its architecture config and the base values of the changed tensors) and
  carries the edits the package was made on (applying), or holds exactly this edit on top (reverting).

The manifest's `id` and file hashes are a seal the package carries about itself: anyone who changes a
file can recompute them. Only these checks of the content, against the model and against what the
package declares, stop a hostile or mistaken package.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel

from ..architectures import architecture_config
from ..blocks import CONFIG_NAME, BlockSelectorConfig, selected_parameter_names
from ..edit_files import BASE_CONFIG_KEY, BASE_HASHES_KEY, BASE_WEIGHTS_NAME, EDIT_HASHES_KEY, WEIGHTS_NAME, chain_of
from ..files import tensor_sha256
from ..projection import NORMS
from .manifest import ManifestError, read_manifest, safe_path, tensor_entry


# How far a recomputed L2 norm may differ from the declared one: float64 sums in another order.
_L2_RELATIVE = 1e-9


@dataclass(frozen=True)
class Declaration:
    """What an edit folder says it is. `tensors`: name -> {sha256 (edited), base_sha256, and in a package shape,
    dtype, max_abs_delta, l2_delta}. A run's `edit/` folder declares no constraint and no chain (None)."""

    where: str
    tensors: dict[str, dict[str, Any]]
    scope: BlockSelectorConfig
    base_label: str
    constraint: dict[str, Any] | None = None
    base_config: dict[str, Any] | None = None
    chain: list[str] | None = None
    id: str | None = None


def describe_selection(scope: BlockSelectorConfig) -> str:
    """ "blocks 1, embeddings (modules mlp_out)": a selection in a refusal's words."""
    text = "blocks " + ", ".join(map(str, scope.blocks))
    return text + (f" (modules {', '.join(scope.modules)})" if scope.modules else "")


def _scope_of(manifest: dict[str, Any]) -> BlockSelectorConfig:
    constraint = manifest["constraint"]
    return BlockSelectorConfig(
        blocks=constraint["blocks"],
        modules=constraint.get("modules"),
        blocks_path=constraint.get("blocks_path"),
        embeddings_paths=constraint.get("embeddings_paths"),
    )


def package_declaration(where: str, manifest: dict[str, Any]) -> Declaration:
    """The declaration of a package, from its manifest (already read and schema-checked by `read_manifest`)."""
    names = set(manifest["tensors"])
    base_hashes = manifest["base_model"]["tensors"]
    if set(base_hashes) != names:
        odd = sorted(names ^ set(base_hashes))
        raise ManifestError(
            f"{where}: the manifest's `tensors` and `base_model.tensors` name different "
            f"tensors ({', '.join(odd[:3])}): it could not be reverted exactly. Refused."
        )
    try:
        scope = _scope_of(manifest)
    except ValueError as error:
        raise ManifestError(
            f"{where}: the manifest's blocks {manifest['constraint']['blocks']!r} are not a block selection ({error})"
        ) from None
    base = manifest["base_model"]
    return Declaration(
        where=where,
        tensors={name: {**entry, "base_sha256": base_hashes[name]} for name, entry in manifest["tensors"].items()},
        scope=scope,
        base_label=base["repo_id"] or f"config sha256 {base['config_sha256'][:12]}",
        constraint=manifest["constraint"],
        base_config=base["config"],
        chain=manifest["chain"],
        id=manifest.get("id"),  # none yet while package_edit checks a manifest against its base model
    )


def _read_file(folder: str, manifest: dict[str, Any], name: str, where: str) -> str:
    if name not in manifest["files"]:
        raise ManifestError(f"{where} has no {name} among the files its manifest seals: refused.")
    return safe_path(folder, name)


def package_tensors(
    model: PreTrainedModel, folder: str, manifest: dict[str, Any], where: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(edited, base) values of the declared tensors, from the files of a package's format, each file holding
    exactly those (a `full` checkpoint holds the whole model: its other tensors must equal the model's)."""
    declared = set(manifest["tensors"])
    format = manifest["format"]
    if format == "peft":
        raise ManifestError(
            f"{where} is a PEFT adapter: apply it with PeftModel.from_pretrained(base, repo).merge_and_unload(), "
            "or share the edit as 'delta' or 'full' for apply_edit."
        )
    if format == "delta":
        sources = [WEIGHTS_NAME]
        if CONFIG_NAME in manifest["files"]:
            _check_selection_file(folder, manifest, where)
    else:
        sources = sorted(
            name for name in manifest["files"] if name.endswith(".safetensors") and name != BASE_WEIGHTS_NAME
        )
    state = model.state_dict() if format == "full" else {}
    if any(value.device.type == "meta" for value in state.values()):
        raise ValueError(
            f"{where} is a full checkpoint, checked against every weight of the model, but this model's device_map "
            "offloads some: load the model without offloading, or apply the edit's 'delta' package."
        )
    after: dict[str, torch.Tensor] = {}
    for source in sources:
        with _opened(_read_file(folder, manifest, source, where), where) as handle:
            for name in handle.keys():
                if name in after:
                    raise ManifestError(f"{where} holds {name!r} twice ({source} and another file): refused.")
                if name in declared:
                    after[name] = handle.get_tensor(name)
                elif format == "delta":
                    raise ManifestError(
                        f"{source} in {where} holds {name!r}, which its manifest does not declare: refused (a package "
                        "may hold only what it declares)."
                    )
                elif not _equal(handle.get_tensor(name), state.get(name)):
                    raise ManifestError(
                        f"{source} in {where} changes {name!r}, which its manifest does not declare (or "
                        f"{type(model).__name__} does not have): refused; a package may change only what it declares."
                    )
    base = _read_tensors(_read_file(folder, manifest, BASE_WEIGHTS_NAME, where), where)
    for what, tensors in (("edited", after), ("base", base)):
        missing = sorted(declared - set(tensors))
        if missing:
            raise ManifestError(
                f"{where} lacks the {what} value of {missing[0]!r}, which its manifest declares: refused."
            )
    extra = sorted(set(base) - declared)
    if extra:
        raise ManifestError(
            f"{BASE_WEIGHTS_NAME} in {where} holds {extra[0]!r}, which its manifest does not declare: refused (a "
            "revert writes only declared tensors)."
        )
    return after, base


def _equal(value: torch.Tensor, other: torch.Tensor | None) -> bool:
    return (
        other is not None
        and value.dtype == other.dtype
        and value.shape == other.shape
        and torch.equal(value, other.detach().cpu())
    )


@contextmanager
def _opened(path: str, where: str) -> Iterator[Any]:
    """A safetensors file of an edit folder, opened lazily; a damaged file is one line, not a SafetensorError."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: {where} is not a complete edit.")
    try:
        with safe_open(path, framework="pt") as handle:
            yield handle
    except SafetensorError as error:
        raise ManifestError(
            f"{os.path.basename(path)} in {where} is not a readable safetensors file ({error}): refused."
        ) from None


def _read_tensors(path: str, where: str) -> dict[str, torch.Tensor]:
    with _opened(path, where) as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def _check_selection_file(folder: str, manifest: dict[str, Any], where: str) -> None:
    """A delta package's `memedit_config.json` selects what its manifest declares (PEFT-style loaders read it)."""
    path = _read_file(folder, manifest, CONFIG_NAME, where)
    with open(path, encoding="utf-8") as handle:
        try:
            saved = BlockSelectorConfig.from_dict(json.load(handle))
        except (ValueError, TypeError) as error:
            raise ManifestError(f"{CONFIG_NAME} in {where} is not a block selection ({error}): refused.") from None
    declared = _scope_of(manifest)
    if saved.selection() != declared.selection():
        raise ManifestError(
            f"{CONFIG_NAME} in {where} selects {saved.selection()} but "
            f"its manifest declares {declared.selection()}: refused."
        )


def run_edit_declaration(
    folder: str, where: str
) -> tuple[Declaration, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The declaration and (edited, base) tensors of a run's `edit/` folder (`EditModel.save_pretrained`): its
    selection, and the sha256 of each tensor, edited and base, and its base's config recorded in the edit file."""
    scope = BlockSelectorConfig.from_pretrained(folder)
    path = safe_path(folder, WEIGHTS_NAME)
    with _opened(path, where) as handle:
        metadata = handle.metadata() or {}
        after = {name: handle.get_tensor(name) for name in handle.keys()}
    try:
        edit_hashes = json.loads(metadata[EDIT_HASHES_KEY])
        base_hashes = json.loads(metadata.get(BASE_HASHES_KEY, "{}"))
        base_config = json.loads(metadata[BASE_CONFIG_KEY]) if BASE_CONFIG_KEY in metadata else None
    except KeyError:
        raise ManifestError(
            f"{path} records no hashes of its edited tensors, so a damaged file could not be told apart: "
            "save the edit again with this version of hf_memedit."
        ) from None
    except json.JSONDecodeError:
        raise ManifestError(f"{path}: its recorded hashes are not JSON: the file was altered. Refused.") from None
    if not isinstance(edit_hashes, dict) or not isinstance(base_hashes, dict) or set(edit_hashes) != set(after):
        raise ManifestError(
            f"{path} holds other tensors than its recorded hashes list: the file was altered. Refused."
        )
    base = _read_tensors(safe_path(folder, BASE_WEIGHTS_NAME), where)
    if set(base) != set(after):
        raise ManifestError(
            f"{BASE_WEIGHTS_NAME} in {where} holds other tensors than {WEIGHTS_NAME}: the folder was altered. Refused."
        )
    declaration = Declaration(
        where=where,
        tensors={name: {"sha256": edit_hashes[name], "base_sha256": base_hashes.get(name)} for name in after},
        scope=scope,
        base_label=repr(scope.base_model_name_or_path),
        base_config=base_config if isinstance(base_config, dict) else None,
    )
    return declaration, after, base


def verify_package(
    model: PreTrainedModel,
    folder: str,
    where: str,
    applying: bool,
    formats: tuple[str, ...] = ("delta", "full"),
) -> tuple[Declaration, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A shared package checked whole against `model` (`check_edit`): its declaration and (edited, base) values."""
    manifest = read_manifest(folder)
    if manifest["format"] not in formats and manifest["format"] != "peft":
        raise ManifestError(
            f"{where} is a {manifest['format']!r} package, which this loader does not take ({', '.join(formats)}): "
            "apply it with hf_memedit.apply_edit."
        )
    declared = package_declaration(where, manifest)
    after, base = package_tensors(model, folder, manifest, where)
    check_edit(model, declared, after, base, applying)
    return declared, after, base


def verify_run_edit(
    model: PreTrainedModel, folder: str, where: str
) -> tuple[Declaration, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A run's `edit/` folder checked whole against `model` before it is applied (`check_edit`)."""
    declared, after, base = run_edit_declaration(folder, where)
    check_edit(model, declared, after, base, applying=True)
    return declared, after, base


def check_edit(
    model: PreTrainedModel,
    declared: Declaration,
    after: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    applying: bool,
) -> None:
    """Refuse, in one line naming the edit, the tensor and the fix, anything `declared` does not allow or that
    does not fit `model`; return only when writing `after` (applying) or `base` (reverting) is safe."""
    where = declared.where
    _check_chain(model, declared, applying)
    params = dict(model.named_parameters())
    try:
        allowed = set(selected_parameter_names(model, declared.scope))
    except ValueError as error:
        raise ManifestError(
            f"{where} declares the {describe_selection(declared.scope)}, which do not fit this model: {error}"
        ) from None
    changes = {}
    for name in sorted(declared.tensors):
        entry, value, before = declared.tensors[name], after[name], base[name]
        param = params.get(name)
        if param is None:
            raise ManifestError(
                f"{where} changes {name!r}, which is not a parameter of {type(model).__name__}: the edit was made for "
                "another architecture."
            )
        if param.device.type == "meta":
            raise ValueError(
                f"{where} changes {name!r}, which the device_map offloads (accelerate keeps it outside "
                "the model): give the edited blocks a device in device_map (offload other blocks)."
            )
        if name not in allowed:
            raise ManifestError(
                f"{where} changes {name!r}, outside the {describe_selection(declared.scope)} it declares: "
                "refused; a package may change only what it declares."
            )
        for tensor in (value, before):
            if tuple(tensor.shape) != tuple(param.shape) or tensor.dtype != param.dtype:
                raise ManifestError(
                    f"{where}: {name!r} is {tensor.dtype} {tuple(tensor.shape)} but the model's is {param.dtype} "
                    f"{tuple(param.shape)}: the edit was made for another model."
                )
        if not (torch.isfinite(value).all() and torch.isfinite(before).all()):
            raise ManifestError(
                f"{where}: {name!r} holds NaN or infinite values: refused "
                "(an edit that diverged cannot be applied or reverted)."
            )
        changes[name] = _check_tensor(where, name, entry, tensor_entry(value, before), tensor_sha256(before))
    if declared.constraint is not None:
        check_constraint(where, declared.constraint, changes)
    if applying and declared.base_config is not None:
        _check_config(model, declared)
    _check_model_values(model, declared, params, applying)


def _check_chain(model: PreTrainedModel, declared: Declaration, applying: bool) -> None:
    if declared.chain is None:
        return
    where, chain = declared.where, chain_of(model)
    if applying and declared.id in chain:
        raise ManifestError(f"{where} is already applied to this model (its edits: {chain}): nothing was changed.")
    if applying and chain != declared.chain:
        raise ManifestError(
            f"{where} was made on top of the edits {declared.chain or 'none'}, but this model "
            f"carries {chain or 'none'}: apply (or revert) edits in the order they were made."
        )
    if not applying and declared.id not in chain:
        raise ManifestError(
            f"{where} was never applied to this model (its edits: {chain or 'none'}): nothing to revert."
        )
    if not applying and chain[-1] != declared.id:
        raise ManifestError(
            f"{where} is not the last edit applied to this model (applied: {chain}); revert the later edits first."
        )


def _check_tensor(
    where: str, name: str, entry: dict[str, Any], actual: dict[str, Any], base_sha256: str
) -> dict[str, Any]:
    """The tensor's values as declared: its sha256 edited and at the base, and (in a package) its shape, dtype and
    the change it declares. Returns `actual` (its max |Δ| and ‖Δ‖₂) for the constraint."""
    if actual["sha256"] != entry["sha256"]:
        raise ManifestError(
            f"{where}: the edited tensor {name!r} differs from the "
            "one saved (its sha256): damaged or altered. Refused."
        )
    if base_sha256 != entry["base_sha256"]:
        raise ManifestError(
            f"{where}: the base tensor {name!r} differs from the one saved (its sha256): damaged or altered. Refused."
        )
    for key in ("shape", "dtype"):
        if key in entry and entry[key] != actual[key]:
            raise ManifestError(f"{where} declares {name!r} with {key} {entry[key]} but holds {actual[key]}: refused.")
    if "max_abs_delta" in entry and entry["max_abs_delta"] != actual["max_abs_delta"]:
        raise ManifestError(
            f"{where}: {name!r} changes by up to {actual['max_abs_delta']:.6g}, but its manifest declares "
            f"max_abs_delta {entry['max_abs_delta']:.6g}: refused; a package must declare the change it makes."
        )
    if "l2_delta" in entry and abs(entry["l2_delta"] - actual["l2_delta"]) > _L2_RELATIVE * actual["l2_delta"]:
        raise ManifestError(
            f"{where}: {name!r} changes by ‖Δ‖₂ = {actual['l2_delta']:.6g}, but its manifest declares l2_delta "
            f"{entry['l2_delta']:.6g}: refused; a package must declare the change it makes."
        )
    return actual


def check_constraint(where: str, constraint: dict[str, Any], changes: dict[str, dict[str, Any]]) -> None:
    """Every change (name -> its max_abs_delta and l2_delta) inside the declared ball: the L∞ box exactly (the
    projection keeps the stored values in it), the L2 ball up to float64 summation order. Fisher and key constraints
    need statistics a package lacks."""
    norm, delta = constraint["norm"], constraint["delta"]
    if norm not in NORMS:
        raise ManifestError(f"{where} declares the norm {norm!r}, which is not one of {', '.join(NORMS)}: refused.")
    if norm == "none" or norm == "fisher" or not changes:
        return
    if delta is None or not math.isfinite(delta) or delta <= 0:
        raise ManifestError(f"{where} declares the norm {norm!r} with δ = {delta!r}, not a positive number: refused.")
    if norm == "linf":
        name = max(changes, key=lambda n: changes[n]["max_abs_delta"])
        largest = changes[name]["max_abs_delta"]
        if largest > delta:
            raise ManifestError(
                f"{where}: {name!r} changes by up to {largest:.6g}, beyond "
                f"its declared bound ‖θ − θ0‖∞ ≤ δ = {delta:g}: refused."
            )
        return
    bound = delta * (1 + _L2_RELATIVE)
    if constraint.get("l2_scope") == "per_tensor":
        name = max(changes, key=lambda n: changes[n]["l2_delta"])
        if changes[name]["l2_delta"] > bound:
            raise ManifestError(
                f"{where}: {name!r} changes by ‖Δ‖₂ = {changes[name]['l2_delta']:.6g}, beyond its declared bound δ = "
                f"{delta:g} per tensor: refused."
            )
        return
    total = math.sqrt(sum(change["l2_delta"] ** 2 for change in changes.values()))
    if total > bound:
        raise ManifestError(
            f"{where} changes its tensors by ‖Δ‖₂ = {total:.6g} "
            f"together, beyond its declared bound δ = {delta:g}: refused."
        )


def _check_config(model: PreTrainedModel, declared: Declaration) -> None:
    actual, recorded = architecture_config(model.config), declared.base_config
    differ = sorted(key for key in set(actual) | set(recorded) if actual.get(key) != recorded.get(key))
    if differ:
        key = differ[0]
        raise ManifestError(
            f"{declared.where} was made for a different base model: its base has "
            f"{key}={recorded.get(key)!r}, this model {key}={actual.get(key)!r} ({len(differ)} config "
            f"field(s) differ). Load the base model the edit was made for ({declared.base_label})."
        )


def _check_model_values(
    model: PreTrainedModel, declared: Declaration, params: dict[str, torch.nn.Parameter], applying: bool
) -> None:
    current = {name: tensor_sha256(params[name]) for name in declared.tensors}
    if not applying:
        for name, entry in sorted(declared.tensors.items()):
            if current[name] != entry["sha256"]:
                raise ManifestError(
                    f"{name!r} no longer holds the value {declared.where} set: the model changed after the edit; "
                    "it cannot be reverted exactly. Nothing was changed."
                )
        return
    differ = sorted(name for name, entry in declared.tensors.items() if current[name] != entry["base_sha256"])
    if not differ:
        return
    if all(current[name] == entry["sha256"] for name, entry in declared.tensors.items()):
        raise ManifestError(
            f"{declared.where} is already applied to the given model: its weights hold the edited values."
        )
    raise ManifestError(
        f"{declared.where} was made for a different base model: {differ[0]!r} of the "
        f"given model differs from the base the edit recorded ({declared.base_label}). "
        "Load that base model, or revert an edit already applied to this one."
    )
