"""Upload a packaged edit (or an exported benchmark) to the Hub."""

from __future__ import annotations

import os
import tempfile

from huggingface_hub import HfApi
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .package import package_edit


try:  # the HTTP client huggingface_hub uses (httpx2 in huggingface_hub 2.x, httpx before)
    from httpx2 import TransportError as _TransportError
except ImportError:  # pragma: no cover - older huggingface_hub
    from httpx import TransportError as _TransportError


def push_folder(
    folder: str,
    repo_id: str,
    repo_type: str = "model",
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str = "Upload with hf_memedit",
) -> str:
    """Create the repo (if needed) and upload the folder; the token comes from the HF login or HF_TOKEN."""
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type=repo_type, commit_message=commit_message)
    except _TransportError as error:  # huggingface_hub's HTTP client could not connect
        raise ConnectionError(
            f"could not reach {api.endpoint} to push {repo_id} ({error}); nothing was uploaded"
        ) from None
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    return f"{api.endpoint}/{prefix}{repo_id}"


def push_edit(
    run_dir: str,
    repo_id: str,
    format: str = "delta",
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    license: str | None = None,
    base_model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> str:
    """Package a run folder in `format` and push it as a model repo; returns its URL.

    `full` and `peft` need the base model the edit was made on (see `package_edit`)."""
    with tempfile.TemporaryDirectory(prefix="memedit-push-") as tmp:
        folder = os.path.join(tmp, "edit")
        manifest = package_edit(
            run_dir,
            folder,
            format=format,
            repo_id=repo_id,
            license=license,
            base_model=base_model,
            tokenizer=tokenizer,
        )
        facts = len(manifest["facts"])
        return push_folder(
            folder,
            repo_id,
            private=private,
            token=token,
            endpoint=endpoint,
            commit_message=f"hf_memedit edit: {facts} facts ({format})",
        )
