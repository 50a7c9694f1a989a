"""A run folder is one consistent whole, owned by one run at a time.

- `claim_run_folder` checks, before anything is loaded, that `output_dir` can be written and holds
  no earlier run (unless the user asked to overwrite or resume), and locks it, so a second run
  into a busy folder stops at once instead of interleaving its checkpoints with the first's.
- The run's outputs (`edit/`, `results.json`, ...) are tied together by `memedit_run.json`,
  written last with the sha256 of each: `begin_outputs` removes it before the first output is
  replaced, so a run killed halfway leaves a folder that `verify_run` refuses instead of one
  whose edit and results belong to different runs.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from .files import atomic_write_text, read_json


logger = logging.getLogger(__name__)

RUN_MANIFEST = "memedit_run.json"
LOCK_NAME = ".memedit.lock"
# What a run writes, relative to its folder; `overwrite_output_dir` removes these (and checkpoints) first.
RUN_OUTPUTS = ("edit", "results.json", "results.md", "log_history.json", RUN_MANIFEST)
CHECKPOINT_PREFIX = "checkpoint-"


def check_writable(folder: str, what: str = "output_dir") -> str:
    """Create `folder` if needed and prove a file can be written in it; a clear error otherwise."""
    folder = os.path.abspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{what} {folder} is a file, not a folder: choose another {what}.")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ValueError(
            f"{what} {folder} cannot be written ({error.strerror or error}): choose a folder you can write to."
        ) from None
    return folder


def holds_run(folder: str) -> list[str]:
    """The entries of `folder` that belong to an earlier run (its outputs and checkpoints)."""
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder) if name in RUN_OUTPUTS or name.startswith(CHECKPOINT_PREFIX))


@contextmanager
def claim_run_folder(folder: str, overwrite: bool, resuming: bool, lock: bool = True) -> Iterator[str]:
    """Check and lock a run's `output_dir` for the duration of the run (only the main process locks).

    A folder holding an earlier run is refused unless `resuming` (its checkpoints are used) or
    `overwrite` (its outputs and checkpoints are removed first; a saved FT model is kept, it is
    reused only when its inputs match).
    """
    folder = check_writable(folder)
    with _locked(folder) if lock else nullcontext():
        earlier = holds_run(folder)
        if earlier and not resuming:
            if not overwrite:
                raise ValueError(
                    f"output_dir {folder} already holds a run ({', '.join(earlier[:4])}): choose another "
                    "--output_dir, pass --overwrite_output_dir true to replace it, or --resume_from_checkpoint "
                    "true to continue it."
                )
            for name in earlier:
                path = os.path.join(folder, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
            logger.warning("overwrite_output_dir: removed the earlier run's %s from %s.", ", ".join(earlier), folder)
        yield folder


@contextmanager
def _locked(folder: str, shared: bool = False) -> Iterator[None]:
    """An advisory lock on `folder/.memedit.lock`, exclusive for a run, shared for readers (`read_run`); the
    kernel drops it when the process ends. The lock file is opened without following a symlink and must be
    a regular file, so a planted link or FIFO is refused instead of truncating (or blocking on) its target."""
    path = os.path.join(folder, LOCK_NAME)
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as error:
        if shared and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            yield  # a folder this process cannot write to: `read_run` still checks every byte it reads
            return
        reason = "is a symbolic link" if error.errno == errno.ELOOP else f"cannot be opened ({error.strerror})"
        raise ValueError(f"The lock file {path} {reason}: remove it, hf_memedit writes its own lock there.") from None
    if not stat.S_ISREG(os.fstat(handle).st_mode):
        os.close(handle)
        raise ValueError(
            f"The lock file {path} is not a regular file: remove it, hf_memedit writes its own lock there."
        )
    try:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            if shared:
                raise ValueError(
                    f"The run folder {folder} is being written by a run: wait for it to finish."
                ) from None
            owner = os.pread(handle, 64, 0).decode(errors="replace").strip() or "unknown"
            raise ValueError(
                f"output_dir {folder} is in use by another run (process {owner}) or read by a packager: wait for it "
                "to finish, or choose another --output_dir."
            ) from None
        if not shared:
            os.ftruncate(handle, 0)
            os.pwrite(handle, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(handle)


def begin_outputs(folder: str) -> None:
    """Called before a run replaces any of its outputs: the folder is not whole until `seal_run`."""
    path = os.path.join(folder, RUN_MANIFEST)
    if os.path.exists(path):
        os.unlink(path)


def _file_hashes(folder: str, keep: tuple[str, ...] = ()) -> tuple[dict[str, str], dict[str, bytes]]:
    """The sha256 of every output file, and the bytes of those named in `keep` (hashed from those very bytes)."""
    hashes, kept = {}, {}
    for name in RUN_OUTPUTS:
        path = os.path.join(folder, name)
        paths = [path] if os.path.isfile(path) else []
        if os.path.isdir(path):
            paths = sorted(os.path.join(root, file) for root, _, files in os.walk(path) for file in files)
        for file in paths:
            relative = os.path.relpath(file, folder).replace(os.sep, "/")
            digest = hashlib.sha256()
            with open(file, "rb") as handle:
                if relative in keep:
                    kept[relative] = handle.read()
                    digest.update(kept[relative])
                else:
                    for chunk in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(chunk)
            hashes[relative] = digest.hexdigest()
    return hashes, kept


def seal_run(folder: str) -> None:
    """Write `memedit_run.json` last: the sha256 of every output, so readers can tell the folder is whole."""
    hashes, _ = _file_hashes(folder)
    hashes.pop(RUN_MANIFEST, None)
    atomic_write_text(
        os.path.join(folder, RUN_MANIFEST), json.dumps({"files": hashes}, indent=2, sort_keys=True) + "\n"
    )


def _verified(folder: str, keep: tuple[str, ...] = ()) -> dict[str, bytes]:
    path = os.path.join(folder, RUN_MANIFEST)
    sealed = read_json(
        path,
        f"{folder} has no {RUN_MANIFEST}: the run did not finish writing its outputs (or is not an hf_memedit run "
        "folder). Run the edit again.",
    )
    files = sealed.get("files") if isinstance(sealed, dict) else None
    if not isinstance(files, dict):
        raise ValueError(f"{path} is not an hf_memedit run manifest.")
    actual, kept = _file_hashes(folder, keep)
    actual.pop(RUN_MANIFEST, None)
    changed = sorted(name for name in set(files) | set(actual) if files.get(name) != actual.get(name))
    if changed:
        raise ValueError(
            f"{folder} is not one consistent run: {', '.join(changed[:4])} changed since the run sealed it "
            f"({RUN_MANIFEST}). Run the edit again rather than mixing the outputs of two runs."
        )
    missing = sorted(set(keep) - set(kept))
    if missing:
        raise ValueError(f"{folder} lacks {', '.join(missing)}: it is not a run folder written by `memedit edit`.")
    return kept


def verify_run(folder: str) -> None:
    """Refuse a run folder whose outputs are not those its last complete run sealed together."""
    _verified(folder)


def read_run(folder: str, names: tuple[str, ...]) -> dict[str, bytes]:
    """The bytes of the outputs `names` (relative paths, e.g. "edit/memedit_edit.safetensors") of a whole run.

    The folder is locked against a run writing it while it is read, and every byte returned is the byte
    that was hashed against the run's seal: a reader never mixes the outputs of two runs, even where the
    lock cannot be taken.
    """
    with _locked(folder, shared=True):
        return _verified(folder, names)
