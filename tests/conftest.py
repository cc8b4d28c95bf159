"""Shared fixtures: compose the real Hydra config, shrunk for CPU tests.

Tests run the same code as ``python -m finqa_exp``: they compose ``conf/config.yaml``
with overrides (as the command line would) and call the core directly.

The CPU tiers run on the CPU on a GPU machine too (``FINQA_DEVICE=cpu`` for the session,
inherited by the commands tests start): their bit-exact checks assume it. Tests marked
``gpu`` (tests/test_gpu.py) ask for CUDA and are skipped where there is none::

    python -m pytest -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from finqa_exp.config import register_configs
from finqa_exp.devices import DEVICE_ENV, gpu_count, pin_one_gpu

# The environment the session started with (the per-GPU sweep test gives it every GPU).
ORIGINAL_ENV = dict(os.environ)
# On a machine with several GPUs this process takes one now, before any import starts CUDA
# (importing bitsandbytes does): the gpu tests train in-process on it.
pin_one_gpu()
# The CPU tiers run on the CPU; gpu tests set FINQA_DEVICE=cuda themselves.
os.environ[DEVICE_ENV] = "cpu"

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


def pytest_collection_modifyitems(config, items):
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    os.environ.pop(DEVICE_ENV)  # count the GPUs there are
    try:
        have_gpu = gpu_count() > 0
    finally:
        os.environ[DEVICE_ENV] = "cpu"
    if not have_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in gpu_tests:
            item.add_marker(skip)


def toy_base(folder: Path) -> Path:
    """A 1-layer Llama and a BPE tokenizer trained on the bundled questions, saved."""
    import torch
    from transformers import LlamaForCausalLM

    from finqa_exp import tiny as tiny_model
    from finqa_exp.config import TinyModelConfig
    from finqa_exp.data import bundled_path, read_table

    texts = [f"{r['instruction']}\n{r['output']}" for r in read_table(bundled_path())]
    tokenizer = tiny_model.train_tokenizer(texts, 300)
    shape = TinyModelConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_model.llama_config(shape, tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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
