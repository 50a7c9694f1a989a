"""`memedit_manifest.json`: exactly what an edit changed, checkable before anything is applied.

Schema (version 1; documented in the README):

    schema, version             "hf_memedit/manifest", 1
    format                      "delta" | "full" | "peft"
    base_model                  {repo_id, revision, tensors: {name: sha256 of the base value}}
    tensors                     {name: {shape, dtype, sha256 (after the edit), max_abs_delta, l2_delta}}
    constraint                  {norm, delta, blocks, and the key constraint with its parameters and corpus}
                                (`edit_config.constraint_record`; no key_constraint: made before it was recorded)
    facts                       [{uuid, relation, subject, old, new, ...}]
    metrics, config, seed, versions
    chain                       ids of the edits this one was made on top of (oldest first)
    files                       {file name in the folder: sha256 of its bytes}
    id                          sha256 of the manifest without `id` (canonical JSON): detects any changed byte

Tensor hashes cover dtype, shape and raw bytes (`io.tensor_sha256`); file names must stay inside
the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

from ..io import atomic_write_text, file_sha256, tensor_sha256


MANIFEST_NAME = "memedit_manifest.json"
SCHEMA = "hf_memedit/manifest"
VERSION = 1
FORMATS = ("delta", "full", "peft")


class ManifestError(ValueError):
    """A manifest or the files it names cannot be trusted; nothing was applied."""


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def manifest_id(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in manifest.items() if k != "id"})).hexdigest()


def tensor_entry(after: torch.Tensor, base: torch.Tensor) -> dict[str, Any]:
    change = (after.detach().cpu().double() - base.detach().cpu().double())
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
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "format": format,
        "base_model": {
            "repo_id": base_repo_id,
            "revision": base_revision,
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


def safe_path(folder: str, name: str) -> str:
    """`folder/name`, refusing names that are absolute or climb out of the folder.

    The check is on the name itself, not on where the file's symlink points: the Hub cache keeps
    snapshot files as links into its blob store.
    """
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise ManifestError(f"The manifest names the file {name!r}, which is not a plain relative path: refused.")
    normal = os.path.normpath(name)
    if os.path.isabs(name) or normal == ".." or normal.startswith(".." + os.sep) or normal.startswith("/"):
        raise ManifestError(f"The manifest names the file {name!r}, which lies outside {folder}: refused.")
    return os.path.join(folder, normal)


def write_manifest(folder: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file of the folder (but the manifest) into `files`, seal with `id`, write atomically."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if relative != MANIFEST_NAME and not relative.startswith(".") and "/." not in relative:
                files[relative] = file_sha256(os.path.join(root, name))
    sealed = {**manifest, "files": dict(sorted(files.items()))}
    sealed["id"] = manifest_id(sealed)
    atomic_write_text(os.path.join(folder, MANIFEST_NAME), json.dumps(sealed, indent=2, sort_keys=True) + "\n")
    return sealed


def read_manifest(folder: str, check_files: bool = True) -> dict[str, Any]:
    """The manifest of an edit folder, after checking its seal and (by default) every file it names."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise ManifestError(f"{folder} has no {MANIFEST_NAME}: it is not an edit shared by hf_memedit.")
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path} is not valid JSON ({error}): it was damaged or tampered with.") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise ManifestError(f"{path} is not an hf_memedit manifest (schema {SCHEMA!r} expected).")
    if manifest.get("version") != VERSION:
        raise ManifestError(
            f"{path} has manifest version {manifest.get('version')!r}; this hf_memedit reads version {VERSION}. "
            "Upgrade hf_memedit."
        )
    if manifest.get("id") != manifest_id(manifest):
        raise ManifestError(f"{path} does not match its own id: it was changed after it was written. Refused.")
    for name, digest in manifest.get("files", {}).items():
        file_path = safe_path(folder, name)
        if check_files:
            if not os.path.isfile(file_path):
                raise ManifestError(f"{folder} lacks {name}, which the manifest lists.")
            if file_sha256(file_path) != digest:
                raise ManifestError(f"{name} in {folder} does not match the manifest's sha256: it was changed. Refused.")
    return manifest
