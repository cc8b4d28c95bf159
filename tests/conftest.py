"""Shared fixtures: compose the real Hydra config, shrunk for CPU tests.

Tests run the same code as ``python -m finqa_exp``: they compose ``conf/config.yaml``
with overrides (as the command line would) and call the core directly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from finqa_exp.config import register_configs

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# Small enough for a trial in seconds on 2 CPU cores, large enough to learn something.
FAST = [
    "train.epochs=2",
    "train.batch_size=16",
    "train.learning_rate=2e-3",
    "eval.max_new_tokens=24",
    "eval.max_questions=12",
]


def compose_cfg(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """``conf/config.yaml`` composed with ``overrides``, as the command line would."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One model cache for the session: the tiny base is built once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(tmp_path, cache_dir):
    """Compose a config rooted in tmp_path (MLflow store, outputs) with the shared cache."""

    def make(*overrides: str, fast: bool = True) -> DictConfig:
        base = [f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
        return compose_cfg([*base, *(FAST if fast else []), *overrides], tmp_path / "run")

    return make


@pytest.fixture(autouse=True)
def _fresh_base_per_test():
    """Each test starts with no base model kept from another test's trial (a test that
    holds a tuned model keeps it intact: forgetting the base does not unload its adapter)."""
    yield
    modeling = sys.modules.get("finqa_exp.modeling")
    if modeling is not None:
        modeling.shared_base.clear()
