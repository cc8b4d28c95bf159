"""Sweeper settings -> Optuna objects: the storage, directions and sampler of a finqa_optuna study.

Used by finqa_exp/sweep/sweeper.py when a sweep starts, e.g.

    python -m finqa_exp -m                                   # conf/search/default.yaml's study
    python my_app.py -m hydra/sweeper=finqa_optuna hydra.sweeper.storage=journal:///abs/study.log

and by the report (finqa_exp/report/data.py) to open the same storages.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import optuna
from hydra.errors import CompactHydraException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.storages import BaseStorage, InMemoryStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from sqlalchemy.exc import SQLAlchemyError

from finqa_exp.sweep.search_space import SearchSpace, grid_size, grid_values

log = logging.getLogger(__name__)


class SweepError(RuntimeError):
    """The sweep cannot go on: too many of its trials failed, or its settings are wrong."""


class SweepConfigError(SweepError, CompactHydraException):
    """The sweeper's settings are wrong: a config error, which Hydra prints as one message
    (no traceback) like its own."""


def open_storage(spec: Any) -> BaseStorage:
    """None -> in memory; journal:///abs/file.log -> journal file; a URL -> RDB; _target_ -> it.

    journal:// paths and sqlite files get their parent folder created.
    """
    if spec is None:
        return InMemoryStorage()
    if isinstance(spec, BaseStorage):
        return spec
    if OmegaConf.is_dict(spec) or isinstance(spec, dict):
        storage = instantiate(spec)
        if not isinstance(storage, BaseStorage):
            raise SweepConfigError(
                f"hydra.sweeper.storage built {type(storage).__name__}, not a storage"
            )
        return storage
    # Files are made absolute: a job that changes directory (hydra.job.chdir) must still
    # reach the same study.
    url = str(spec)
    if url.startswith("journal://"):
        path = Path(url.removeprefix("journal://")).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = Path(url.removeprefix("sqlite:///")).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
        # Several sweep processes write one file: wait for its lock instead of failing.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    return _rdb_storage(url, engine_kwargs)


def _rdb_storage(url: str, engine_kwargs: dict[str, Any], tries: int = 3) -> RDBStorage:
    # Workers started together on a new database race to create its tables (the loser gets
    # an IntegrityError from alembic's version row); on a later try the tables are there.
    for attempt in range(1, tries):
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs)
        except SQLAlchemyError:
            log.info("Storage %s not ready (another worker creating it?), retrying", url)
            time.sleep(attempt)
    return RDBStorage(url, engine_kwargs=engine_kwargs)


def study_directions(direction: Any) -> list[str]:
    """`direction` as Optuna's list of "minimize"/"maximize" (Enum names accepted)."""
    many = OmegaConf.is_list(direction) or isinstance(direction, (list, tuple))
    items = list(direction) if many else [direction]
    names = [str(getattr(item, "name", item)).lower() for item in items]
    bad = [name for name in names if name not in ("minimize", "maximize")]
    if not names or bad:
        raise SweepConfigError(
            f"hydra.sweeper.direction must be minimize/maximize or a list; got {bad}"
        )
    return names


def study_metric_names(names: Any, n_objectives: int) -> list[str] | None:
    """``metric_names`` as a list with one name per objective (None stays None)."""
    if names is None:
        return None
    many = OmegaConf.is_list(names) or isinstance(names, (list, tuple))
    found = [str(n) for n in (names if many else [names])]
    if len(found) != n_objectives:
        raise SweepConfigError(
            f"hydra.sweeper.metric_names names {len(found)} values for {n_objectives} "
            f"direction(s): {found}"
        )
    return found


def build_sampler(
    sampler_conf: Any, space: SearchSpace, n_trials: int
) -> tuple[optuna.samplers.BaseSampler, int]:
    """Instantiate the sampler; the grid sampler gets its grid and caps n_trials at its size."""
    sampler = instantiate(sampler_conf)
    if not callable(sampler) or isinstance(sampler, optuna.samplers.BaseSampler):
        return sampler, n_trials
    grid = {name: grid_values(name, dist) for name, dist in space.distributions.items()}
    if not grid:
        raise SweepConfigError("the grid sampler needs params to sweep (hydra.sweeper.params)")
    size = grid_size(grid)
    if size < n_trials:
        log.info("The grid has %d points: n_trials %d -> %d", size, n_trials, size)
    return sampler(search_space=grid), min(n_trials, size)


def continued_sampler_conf(sampler_conf: Any, n_existing: int) -> Any:
    """The sampler config for a study that already holds ``n_existing`` trials."""
    if sampler_conf is None or OmegaConf.select(sampler_conf, "seed") is None:
        return sampler_conf  # unseeded: every run draws differently anyway
    conf = OmegaConf.create(OmegaConf.to_container(sampler_conf))
    conf.seed = int(conf.seed) + n_existing
    return conf


def suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    """Sample one param through the trial's public suggest API."""
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    raise TypeError(f"{name}: unsupported distribution {dist}")
