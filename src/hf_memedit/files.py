"""Atomic writes and safe tensor files: a crash mid-save never leaves a half-written file behind."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save


logger = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """`write(tmp)`, then rename over `path`; the file gets the permissions a plain `open` would give it."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(handle)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_target(
    target: str | os.PathLike,
    sources: list[str | os.PathLike],
    is_earlier: Callable[[str], bool],
    what: str,
    overwrite: bool,
) -> str:
    """The absolute `target` folder for a new `what` made from `sources`, or an error that keeps the user's files.

    An overwrite of `target` that was interrupted is first recovered (`recover_directory`). Refused: a
    target that holds a source or lies inside one, an existing file, and a non-empty folder that is not an
    earlier `what` (`is_earlier(folder)`, which may raise to say why); an earlier one only with `overwrite`.
    """
    target = os.path.realpath(target)
    for source in map(os.path.realpath, sources):
        if os.path.commonpath([target, source]) in (target, source):
            raise ValueError(
                f"The {what} folder {target} would hold or lie inside {source}: choose a folder outside it."
            )
    if os.path.isfile(target):
        raise ValueError(f"{target} is a file, not a folder: choose another folder for the {what}.")
    recover_directory(target)
    if os.path.isdir(target) and os.listdir(target):
        if not is_earlier(target):
            raise ValueError(
                f"{target} already exists and is not an earlier {what}: refused, so nothing in it is lost. "
                "Choose a new or empty folder."
            )
        if not overwrite:
            raise ValueError(f"{target} holds an earlier {what}: pass overwrite=True to replace it.")
    return target


def _leftovers(target: str, kind: str) -> list[str]:
    """The `.staging-` or `.replaced-` folders `atomic_directory` made beside `target` (mkdtemp's 8 characters)."""
    parent, prefix = os.path.dirname(target), f".{kind}-{os.path.basename(target)}-"
    if not os.path.isdir(parent):
        return []
    pattern = re.compile(re.escape(prefix) + r"[a-z0-9_]{8}")
    return sorted(os.path.join(parent, name) for name in os.listdir(parent) if pattern.fullmatch(name))


@contextmanager
def _held(folder: str, wait: bool = True) -> Iterator[bool]:
    """An exclusive lock on a folder of `atomic_directory` while it works there (False inside: another process
    holds it, so it is still at work). Never follows a symlink."""
    try:
        handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # gone, or not a folder of ours
        yield False
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(handle)


def recover_directory(target: str | os.PathLike) -> None:
    """Finish what an interrupted `atomic_directory` left beside `target`: when `target` is gone but the
    folder it replaced was set aside whole (`.replaced-*`), that folder comes back; set-aside folders of a
    completed replacement and unfinished `.staging-*` folders are removed. Folders another process is still
    working in (it holds their lock) are left alone."""
    target = os.path.abspath(target)
    for aside in _leftovers(target, "replaced"):
        with _held(aside, wait=False) as ours:
            if not ours:
                continue
            kept = os.path.join(aside, "folder")
            if not os.path.lexists(target) and os.path.isdir(kept) and not os.path.islink(kept):
                os.replace(kept, target)
                logger.warning("Restored %s, which an interrupted replacement had set aside in %s.", target, aside)
            shutil.rmtree(aside)
    for staging in _leftovers(target, "staging"):
        with _held(staging, wait=False) as ours:
            if ours:
                shutil.rmtree(staging)


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[str]:
    """Build a folder under a temporary name beside `target`; it replaces `target` only once complete.

    The old `target` (which the caller has checked, see `check_target`) is moved aside before the
    new one is moved in and deleted after, so a crash leaves one of the two whole; the next call for
    `target` restores or removes what a crash left (`recover_directory`).
    """
    target = os.path.abspath(target)
    parent, name = os.path.dirname(target), os.path.basename(target)
    os.makedirs(parent, exist_ok=True)
    recover_directory(target)
    staging = tempfile.mkdtemp(prefix=f".staging-{name}-", dir=parent)
    with _held(staging):
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private (0700)
        try:
            yield staging
            if not os.path.exists(target):
                os.replace(staging, target)
                return
            aside = tempfile.mkdtemp(prefix=f".replaced-{name}-", dir=parent)
            with _held(aside):
                kept = os.path.join(aside, "folder")
                os.replace(target, kept)
                try:
                    os.replace(staging, target)
                except BaseException:
                    os.replace(kept, target)
                    raise
                shutil.rmtree(aside, ignore_errors=True)  # what is left, the next call removes
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    _atomic_write(path, write)


def read_json(path: str | os.PathLike, missing: str):
    """A JSON file's content; `missing` is the error message when the file does not exist."""
    if not os.path.isfile(path):
        raise FileNotFoundError(missing)
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error.msg}, line {error.lineno}).") from None


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes with its metadata in sorted order, so equal tensors give equal files
    (safetensors writes the metadata map in an order that varies from process to process)."""
    data = save(dict(tensors), metadata={"format": "pt", **(metadata or {})})
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the 8-byte alignment safetensors keeps
    return len(text).to_bytes(8, "little") + text + data[8 + length :]


def save_tensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write tensors as safetensors, atomically and reproducibly; tied or shared storage is copied apart first."""
    plain = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}
    data = safetensors_bytes(plain, metadata)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    _atomic_write(path, write)


def tensors_from_bytes(data: bytes, where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file's bytes (read once, e.g. checked against a seal first)."""
    try:
        length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + length]).get("__metadata__") or {}
        return load(data), metadata
    except (ValueError, SafetensorError) as error:
        raise ValueError(f"{where} is not a safetensors file ({error}).") from None


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file (never a pickle), with a clear error when it is missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist.")
    return load_file(os.fspath(path))


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (with dtype and shape), independent of device and strides."""
    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{data.dtype}:{tuple(data.shape)}:".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def looks_like_path(name: str) -> bool:
    """Whether `name` can only be a local path, never a Hub id ("gpt2", "org/model")."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def edit_folder(
    repo_or_dir: str | os.PathLike,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    allow_patterns: list[str] | None = None,
) -> str:
    """A local edit folder as it is, else a Hub repo id downloaded (as PEFT's `from_pretrained` resolves an
    adapter); a clear error for a path that does not exist."""
    name = os.fspath(repo_or_dir)
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise ValueError(f"{name} is a file: give the folder of an edit (or its Hub repo id).")
    if looks_like_path(name) or name.count("/") != 1:  # a shared edit's repo id is always "owner/name"
        raise FileNotFoundError(
            f"The edit folder {os.path.abspath(name)} does not exist (nor is {name!r} a Hub repo id)."
        )
    from huggingface_hub import snapshot_download

    return snapshot_download(name, revision=revision, token=token, endpoint=endpoint, allow_patterns=allow_patterns)
