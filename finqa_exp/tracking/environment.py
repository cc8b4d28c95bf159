"""What a run was measured on: the git commit (and whether the checkout had local
changes), package versions and device, as tags."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "optuna", "mlflow", "finqa-exp")


def _git(*args: str) -> str:
    # The commit of the code that ran: the checkout holding this package, wherever the
    # command was started.
    return subprocess.run(
        ["git", *args],
        cwd=Path(__file__).resolve().parent,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.strip()


def environment_tags(device: str) -> dict[str, str]:
    """Git commit (and whether the checkout had local changes), package versions and device."""
    tags = {"device": device}
    try:
        commit = _git("rev-parse", "HEAD")
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
        tags["git_dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
    except (OSError, subprocess.SubprocessError):
        tags["git_commit"] = "unknown"  # installed from a wheel, or git missing
    for pkg in PACKAGES:
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            tags[f"version.{pkg}"] = "not installed"
    return tags
