"""Fixtures of the real sweeps that share one study (test_workers.py, test_cluster.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST
from tests.sweep.shared_study import worker_env


@pytest.fixture(scope="session")
def warm_cache(cache_dir, tmp_path_factory) -> Path:
    """The session's model cache with the tiny base and its base score in it, built by one
    short run before any worker starts (else every worker would build it)."""
    root = tmp_path_factory.mktemp("warmup")
    warmup = [*FAST, "train.max_steps=1", "tracking=none", f"paths.cache_dir={cache_dir}"]
    proc = subprocess.run(
        [sys.executable, "-m", "finqa_exp", *warmup, f"paths.root_dir={root}"],
        cwd=root,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cache_dir
