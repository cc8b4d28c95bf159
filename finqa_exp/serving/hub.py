"""Upload an exported model to the Hugging Face hub (``ask --export DIR --push-to-hub REPO``).

:func:`check_access` runs first, before any model loads: offline (``HF_HUB_OFFLINE``), no
token, or a hub that does not answer is one line, not a traceback after minutes of work.
"""

from __future__ import annotations

import os
from pathlib import Path

from finqa_exp.errors import BadInput

_TRUE = ("1", "true", "yes", "on")


class HubError(BadInput, RuntimeError):
    """The hub cannot take the upload (offline, no token, unreachable); one line."""


def check_access(repo: str) -> str:
    """The token to push ``repo`` with; HubError if the hub cannot be used from here."""
    import huggingface_hub
    from huggingface_hub import constants

    where = f"--push-to-hub {repo}"
    if "/" not in repo.strip("/"):
        raise HubError(f"{where}: give the repo as <user or org>/<name>")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE or constants.HF_HUB_OFFLINE:
        raise HubError(f"{where}: HF_HUB_OFFLINE is set, so nothing can be uploaded")
    token = huggingface_hub.get_token()
    if not token:
        raise HubError(f"{where}: no Hugging Face token (set HF_TOKEN or run `hf auth login`)")
    try:
        huggingface_hub.HfApi(token=token).whoami()
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise HubError(f"{where}: the hub at {constants.ENDPOINT} refused: {first}") from err
    return token


def push(folder: Path, repo: str, token: str, private: bool = True) -> str:
    """Create ``repo`` if needed (private by default) and upload ``folder``; its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message="Upload from finqa-exp")
    return str(url)
