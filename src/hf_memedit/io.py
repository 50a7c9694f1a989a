"""Atomic writes and safe tensor files: a crash mid-save never leaves a half-written file behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from safetensors.torch import load_file, save


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


def check_target(target: str | os.PathLike, sources: list[str | os.PathLike], is_earlier: Callable[[str], bool],
                 what: str, overwrite: bool) -> str:
    """The absolute `target` folder for a new `what` made from `sources`, or an error that keeps the user's files.

    Refused: a target that holds a source or lies inside one, an existing file, and a non-empty
    folder that is not an earlier `what` (`is_earlier(folder)`); an earlier one only with `overwrite`.
    """
    target = os.path.realpath(target)
    for source in map(os.path.realpath, sources):
        if os.path.commonpath([target, source]) in (target, source):
            raise ValueError(f"The {what} folder {target} would hold or lie inside {source}: choose a folder outside it.")
    if os.path.isfile(target):
        raise ValueError(f"{target} is a file, not a folder: choose another folder for the {what}.")
    if os.path.isdir(target) and os.listdir(target):
        if not is_earlier(target):
            raise ValueError(
                f"{target} already exists and is not an earlier {what}: refused, so nothing in it is lost. "
                "Choose a new or empty folder."
            )
        if not overwrite:
            raise ValueError(f"{target} holds an earlier {what}: pass overwrite=True to replace it.")
    return target


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[str]:
    """Build a folder under a temporary name beside `target`; it replaces `target` only once complete.

    The old `target` (which the caller has checked, see `check_target`) is moved aside before the
    new one is moved in and deleted after, so a crash leaves one of the two whole.
    """
    target = os.path.abspath(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=os.path.dirname(target))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private (0700)
    try:
        yield staging
        old = None
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=".replaced-", dir=os.path.dirname(target))
            os.replace(target, os.path.join(old, "folder"))
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old)
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
    repo_or_dir: str | os.PathLike, revision: str | None = None, token: str | None = None, endpoint: str | None = None,
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
        raise FileNotFoundError(f"The edit folder {os.path.abspath(name)} does not exist (nor is {name!r} a Hub repo id).")
    from huggingface_hub import snapshot_download

    return snapshot_download(name, revision=revision, token=token, endpoint=endpoint, allow_patterns=allow_patterns)
