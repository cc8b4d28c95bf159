"""Typed configuration: the schema every Hydra config in ``conf/`` is merged onto
(``schema``), and the functions that check a composed config and turn it into objects.

Each group in ``conf/`` (model, data, lora, quant, train, eval, tracking, paths,
objective) fills one dataclass of ``schema`` (``data`` and ``objective`` have their own
modules). Hydra checks keys and types while composing
(a typo or ``train.learning_rate=abc`` fails there); :func:`validate` then checks ranges
and cross-field rules, before any data or model is touched::

    python -m finqa_exp train.learning_rate=-1
    error: train.learning_rate must be > 0, got -1.0
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from finqa_exp.config.checks import ConfigError
from finqa_exp.config.data import ColumnsConfig, DataConfig
from finqa_exp.config.objective import ObjectiveConfig, better_direction
from finqa_exp.config.schema import (
    DTYPES,
    SCHEDULERS,
    EvalConfig,
    FinqaConfig,
    LoraConfig,
    ModelConfig,
    PathsConfig,
    QuantConfig,
    TinyModelConfig,
    TrackingConfig,
    TrainConfig,
)

T = TypeVar("T")

__all__ = [
    "DTYPES",
    "SCHEDULERS",
    "ColumnsConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FinqaConfig",
    "LoraConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "PathsConfig",
    "QuantConfig",
    "TinyModelConfig",
    "TrackingConfig",
    "TrainConfig",
    "better_direction",
    "flatten",
    "register_configs",
    "typed",
    "validate",
]


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore as ``finqa_schema`` (``conf/config.yaml`` uses it)."""
    ConfigStore.instance().store(name="finqa_schema", node=FinqaConfig)


def _register_resolvers() -> None:
    # ${finqa.cwd:} resolves to the absolute folder the command was started in, so paths in
    # conf/paths stay valid in sweep jobs and tests alike.
    if not OmegaConf.has_resolver("finqa.cwd"):
        OmegaConf.register_new_resolver("finqa.cwd", lambda: os.getcwd())
    # ${finqa.gpus:} is the number of GPUs trials can spread over (at least 1): the
    # per_gpu launcher runs that many trials at a time, one on each GPU.
    if not OmegaConf.has_resolver("finqa.gpus"):
        OmegaConf.register_new_resolver("finqa.gpus", _gpus_for_trials)
    # ${finqa.parallel:N} is how many jobs a launcher's n_jobs=N runs at once, in joblib's
    # terms (-1: one per CPU, -2: all CPUs but one): the sweeper launches that many trials.
    # ${finqa.stem:PATH} names data by its file, folder or hub dataset (data=text: so
    # each corpus gets a study of its own): filings/ -> filings, OWNER/NEWS -> NEWS.
    if not OmegaConf.has_resolver("finqa.stem"):
        OmegaConf.register_new_resolver("finqa.stem", lambda p: Path(str(p)).stem or str(p))
    if not OmegaConf.has_resolver("finqa.parallel"):
        OmegaConf.register_new_resolver("finqa.parallel", _parallel_jobs)


def _parallel_jobs(n_jobs: int) -> int:
    n = int(n_jobs)
    return n if n > 0 else max(1, (os.cpu_count() or 1) + 1 + n)


def _gpus_for_trials() -> int:
    from finqa_exp.devices import gpu_count

    return max(gpu_count(), 1)


_register_resolvers()


def validate(cfg: DictConfig | FinqaConfig) -> FinqaConfig:
    """Check every range and cross-field rule; returns the typed config or raises ConfigError."""
    if isinstance(cfg, FinqaConfig):
        cfg = OmegaConf.structured(cfg)
    obj = _to_object(cfg)
    if not isinstance(obj, FinqaConfig):
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(FinqaConfig), cfg))
    assert isinstance(obj, FinqaConfig)
    return obj


def typed(cfg: DictConfig, schema: type[T]) -> T:
    """A composed config as its dataclass ``schema`` (running its range checks), or a
    ConfigError naming the first problem. For the entry points other than the trial's."""
    obj = _to_object(cfg)
    assert isinstance(obj, schema)
    return obj


def _to_object(cfg: DictConfig) -> Any:
    """OmegaConf.to_object, which builds the dataclasses and so runs each __post_init__
    range check; omegaconf's own errors (a type, a missing value) become one-line
    ConfigErrors."""
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(str(err).splitlines()[0]) from err


def flatten(cfg: DictConfig | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Resolved config as ``{"train.learning_rate": 0.001, ...}`` (for MLflow params)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Any] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
