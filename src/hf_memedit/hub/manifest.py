"""`memedit_manifest.json`: exactly what an edit changed, checkable before anything is applied.

Schema (version 2; documented in docs/sharing.md):

    schema, version             "hf_memedit/manifest", 2
    format                      "delta" | "full" | "peft"
    base_model                  {repo_id, revision (its Hub id and revision, or null for a local model),
                                 config: the base's architecture fields (`architectures.architecture_config`),
                                 config_sha256, tensors: {name: sha256 of the base value}}
    tensors                     {name: {shape, dtype, sha256 (after the edit), max_abs_delta, l2_delta}}
    constraint                  {norm, delta, blocks, and the key constraint with its parameters and corpus}
                                (`edit_config.constraint_record`; no key_constraint: made before it was recorded),
                                and `modules`, `blocks_path`, `embeddings_paths` of the selection where set
    facts                       [{uuid, relation, subject, old, new, ...}]
    metrics, config, seed, versions
    chain                       ids of the edits this one was made on top of (oldest first)
    files                       {file name in the folder: sha256 of its bytes}
    id                          sha256 of the manifest without `id` (canonical JSON): detects any changed byte

Tensor hashes cover dtype, shape and raw bytes (`io.tensor_sha256`); file names must stay inside
the folder. The seal (`files`, `id`) proves only that the folder is as its publisher left it: anyone
can recompute it. What a package may do to a model is checked against the model (`hub.verify`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import torch

from ..files import atomic_write_text, file_sha256, tensor_sha256


MANIFEST_NAME = "memedit_manifest.json"
SCHEMA = "hf_memedit/manifest"
VERSION = 2
FORMATS = ("delta", "full", "peft")


class ManifestError(ValueError):
    """A manifest or the files it names cannot be trusted; nothing was applied."""


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def manifest_id(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in manifest.items() if k != "id"})).hexdigest()


def config_sha256(config: dict[str, Any]) -> str:
    """The hash that identifies a base model's architecture fields (canonical JSON)."""
    return hashlib.sha256(_canonical(config)).hexdigest()


def tensor_entry(after: torch.Tensor, base: torch.Tensor) -> dict[str, Any]:
    change = after.detach().cpu().double() - base.detach().cpu().double()
    return {
        "shape": list(after.shape),
        "dtype": str(after.dtype).removeprefix("torch."),
        "sha256": tensor_sha256(after),
        "max_abs_delta": float(change.abs().max()) if change.numel() else 0.0,
        "l2_delta": float(change.norm()),
    }


def build_manifest(
    *,
    format: str,
    base_repo_id: str | None,
    base_revision: str | None,
    base_config: dict[str, Any],
    after: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    constraint: dict[str, Any],
    facts: list[dict[str, Any]] | None = None,
    metrics: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    seed: int | None = None,
    versions: dict[str, str] | None = None,
    chain: list[str] | None = None,
) -> dict[str, Any]:
    """A manifest without `files` and `id` (`write_manifest` adds both once the folder is complete)."""
    if format not in FORMATS:
        raise ValueError(f"Unknown format {format!r}: choose one of {', '.join(FORMATS)}.")
    manifest = {
        "schema": SCHEMA,
        "version": VERSION,
        "format": format,
        "base_model": {
            "repo_id": base_repo_id,
            "revision": base_revision if base_repo_id else None,
            "config": base_config,
            "config_sha256": config_sha256(base_config),
            "tensors": {name: tensor_sha256(base[name]) for name in sorted(after)},
        },
        "tensors": {name: tensor_entry(after[name], base[name]) for name in sorted(after)},
        "constraint": constraint,
        "facts": facts or [],
        "metrics": metrics or {},
        "config": config or {},
        "seed": seed,
        "versions": versions or {},
        "chain": chain or [],
    }
    try:
        _canonical(manifest)
    except ValueError:
        raise ValueError(
            "The run's record holds NaN or an infinite number (in its metrics, facts or config), which a manifest, "
            "strict JSON, cannot hold: the edit cannot be shared as it is."
        ) from None
    return manifest


def safe_path(folder: str, name: str) -> str:
    """`folder/name`, refusing names that are absolute, climb out of the folder, or pass through a
    symlinked folder that leads out of it.

    The file itself may be a symlink: the Hub cache keeps snapshot files as links into its blob store
    (what it holds is checked by its sha256, and it must be a regular file).
    """
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise ManifestError(f"The manifest names the file {name!r}, which is not a plain relative path: refused.")
    normal = os.path.normpath(name)
    if os.path.isabs(name) or normal in (".", "..") or normal.startswith(".." + os.sep) or normal.startswith("/"):
        raise ManifestError(f"The manifest names the file {name!r}, which lies outside {folder}: refused.")
    path = os.path.join(folder, normal)
    root, parent = os.path.realpath(folder), os.path.realpath(os.path.dirname(path))
    if os.path.commonpath([root, parent]) != root:
        raise ManifestError(
            f"The manifest names the file {name!r}, whose folder in {folder} is a link to {parent}, outside the "
            "package: refused."
        )
    return path


def _package_files(folder: str) -> list[str]:
    """Every file of a package folder but its manifest (and hidden files, which the Hub and git add)."""
    files = []
    for root, _, names in os.walk(folder):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if relative != MANIFEST_NAME and not relative.startswith(".") and "/." not in relative:
                files.append(relative)
    return sorted(files)


def write_manifest(folder: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file of the folder (but the manifest) into `files`, seal with `id`, write atomically (strict JSON:
    a non-finite number is refused, never written as `NaN`)."""
    sealed = {**manifest, "files": {name: file_sha256(os.path.join(folder, name)) for name in _package_files(folder)}}
    sealed["id"] = manifest_id(sealed)
    text = json.dumps(sealed, indent=2, sort_keys=True, allow_nan=False)
    atomic_write_text(os.path.join(folder, MANIFEST_NAME), text + "\n")
    return sealed


def _strict_json(path: str) -> Any:
    def refuse(constant: str):
        raise ManifestError(f"{path} holds {constant}, which is not JSON (a manifest is strict JSON): refused.")

    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle, parse_constant=refuse)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path} is not valid JSON ({error}): it was damaged or tampered with.") from None


def _sealed(folder: str) -> dict[str, Any]:
    """The manifest of `folder` after the checks every version shares: a JSON object of this schema whose `id`
    matches its content."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):  # a link in the Hub cache
        raise ManifestError(f"{folder} has no {MANIFEST_NAME}: it is not an edit shared by hf_memedit.")
    manifest = _strict_json(path)
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise ManifestError(f"{path} is not an hf_memedit manifest (schema {SCHEMA!r} expected).")
    if not isinstance(manifest.get("id"), str) or manifest["id"] != manifest_id(manifest):
        raise ManifestError(f"{path} does not match its own id: it was changed after it was written. Refused.")
    if not isinstance(manifest.get("files"), dict) or not all(isinstance(v, str) for v in manifest["files"].values()):
        raise ManifestError(f"{path}: `files` is not a map of file name to sha256: refused.")
    return manifest


def _check_files(folder: str, files: dict[str, str]) -> None:
    for name, digest in files.items():
        path = safe_path(folder, name)
        if not os.path.isfile(path):
            raise ManifestError(
                f"{folder} lacks {name}, which the manifest lists (or it is not a regular file): refused."
            )
        if file_sha256(path) != digest:
            raise ManifestError(f"{name} in {folder} does not match the manifest's sha256: it was changed. Refused.")


def read_manifest(folder: str, check_files: bool = True) -> dict[str, Any]:
    """The manifest of an edit folder, after checking its seal, its schema and (by default) every file it names.

    Version 1 manifests are refused: they did not record the base model's config nor the modules an edit
    was narrowed to, so what a package may change could not be checked. Re-package such an edit from its run folder.
    """
    manifest = _sealed(folder)
    path = os.path.join(folder, MANIFEST_NAME)
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"{path} has version {version!r}, which no hf_memedit wrote: it is damaged. Refused.")
    if version == 1:
        raise ManifestError(
            f"{path} is a version 1 manifest (an earlier hf_memedit), which records neither the base model's config "
            "nor the modules the edit was narrowed to, so what it changes cannot be checked: re-package the edit "
            "from its run folder (package_edit or `memedit push`) with this hf_memedit."
        )
    if version > VERSION:
        raise ManifestError(
            f"{path} has manifest version {version}, newer than the version {VERSION} this hf_memedit reads: "
            "upgrade hf_memedit."
        )
    _check_schema(manifest, path)
    for name in manifest["files"]:
        safe_path(folder, name)
    if check_files:
        _check_files(folder, manifest["files"])
    return manifest


def is_earlier_package(folder: str) -> bool:
    """Whether `folder` holds exactly an earlier package (any version): its manifest, sealed, and the files it
    lists, each matching. False when it holds no manifest; an error naming the rest when it holds more."""
    if not os.path.lexists(os.path.join(folder, MANIFEST_NAME)):
        return False
    try:
        manifest = _sealed(folder)
        _check_files(folder, manifest["files"])
    except ManifestError as error:
        raise ValueError(
            f"{folder} holds a {MANIFEST_NAME} but is not an intact earlier package, so nothing in it is replaced: "
            f"choose a new folder ({error})"
        ) from None
    owned = set(manifest["files"]) | {MANIFEST_NAME}
    foreign = set()
    for root, folders, names in os.walk(folder):
        for name in folders + names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder).replace(os.sep, "/")
            if os.path.islink(path) or (name in names and relative not in owned):
                foreign.add(relative.split("/")[0])
    if foreign:
        raise ValueError(
            f"{folder} holds an earlier package and other things ({', '.join(sorted(foreign)[:4])}): refused, so "
            "nothing in it is lost. Move them out, or choose a new folder."
        )
    return True


# The schema of a version 2 manifest: key -> the JSON types its value may have.
_NUMBER = (int, float)
_TOP = {
    "format": (str,),
    "base_model": (dict,),
    "tensors": (dict,),
    "constraint": (dict,),
    "facts": (list,),
    "metrics": (dict,),
    "config": (dict,),
    "seed": (int, type(None)),
    "versions": (dict,),
    "chain": (list,),
}
_BASE = {
    "repo_id": (str, type(None)),
    "revision": (str, type(None)),
    "config": (dict,),
    "config_sha256": (str,),
    "tensors": (dict,),
}
_TENSOR = {"shape": (list,), "dtype": (str,), "sha256": (str,), "max_abs_delta": _NUMBER, "l2_delta": _NUMBER}
_CONSTRAINT = {"norm": (str,), "delta": (*_NUMBER, type(None)), "blocks": (list,)}
_SELECTION = {"modules": (list, type(None)), "blocks_path": (str, type(None)), "embeddings_paths": (list, type(None))}


def _expect(
    data: dict[str, Any], spec: dict[str, tuple[type, ...]], where: str, path: str, required: bool = True
) -> None:
    for key, types in spec.items():
        if key not in data:
            if required:
                raise ManifestError(
                    f"{path} lacks `{where}{key}`: it is damaged or was not written by hf_memedit. Refused."
                )
            continue
        value = data[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ManifestError(f"{path}: `{where}{key}` is {value!r}, not {names}: it is damaged. Refused.")


def _check_schema(manifest: dict[str, Any], path: str) -> None:
    """Every key a version 2 manifest has, with its type: a malformed manifest is one line, never a KeyError."""
    _expect(manifest, _TOP, "", path)
    if manifest["format"] not in FORMATS:
        raise ManifestError(
            f"{path} has format {manifest['format']!r}, which hf_memedit does not write (it writes "
            f"{', '.join(FORMATS)}): it is damaged or was made by another tool. Refused."
        )
    base = manifest["base_model"]
    _expect(base, _BASE, "base_model.", path)
    if config_sha256(base["config"]) != base["config_sha256"]:
        raise ManifestError(f"{path}: `base_model.config_sha256` is not the hash of `base_model.config`: refused.")
    if not all(isinstance(v, str) for v in base["tensors"].values()):
        raise ManifestError(f"{path}: `base_model.tensors` is not a map of tensor name to sha256: refused.")
    for name, entry in manifest["tensors"].items():
        if not isinstance(entry, dict):
            raise ManifestError(f"{path}: `tensors.{name}` is not an object: it is damaged. Refused.")
        _expect(entry, _TENSOR, f"tensors.{name}.", path)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in entry["shape"]):
            raise ManifestError(f"{path}: `tensors.{name}.shape` is {entry['shape']!r}, not a list of sizes. Refused.")
        if not (math.isfinite(entry["max_abs_delta"]) and math.isfinite(entry["l2_delta"])):
            raise ManifestError(f"{path}: `tensors.{name}` declares a non-finite change. Refused.")
    _expect(manifest["constraint"], _CONSTRAINT, "constraint.", path)
    _expect(manifest["constraint"], _SELECTION, "constraint.", path, required=False)
    for key in ("modules", "embeddings_paths"):
        if not all(isinstance(item, str) for item in manifest["constraint"].get(key) or []):
            raise ManifestError(f"{path}: `constraint.{key}` is not a list of module paths: it is damaged. Refused.")
    if not all(isinstance(item, str) for item in manifest["chain"]):
        raise ManifestError(f"{path}: `chain` is not a list of manifest ids: it is damaged. Refused.")
