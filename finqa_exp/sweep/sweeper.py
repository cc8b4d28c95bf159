"""The `finqa_optuna` Hydra sweeper: an Optuna study run through Hydra's launcher.

    python -m finqa_exp -m                                   # conf/search/default.yaml's study
    python tests/toy_app/app.py -m hydra.sweeper.n_trials=6  # any Hydra app
    python my_app.py -m hydra/sweeper=finqa_optuna hydra/sweeper/pruner=median \
        hydra.sweeper.storage=journal:///abs/path/study.log 'lr=tag(log, interval(1e-5, 1e-3))'

StudySweep checks the input, opens the study and hands it to rounds.SweepRun, which keeps
up to `n_jobs` trials in flight (launches.JobSlots): it asks Optuna for a trial whenever a
worker is free, turns its params into overrides (search_space), launches it as a Hydra job
numbered by its trial number, and tells Optuna how it ended.
Inside a job, `current_trial()` gives the objective its own trial to report intermediate
values to and to ask whether to prune.

Each worker's running trials carry a heartbeat (a system attr refreshed every
`heartbeat_interval` s), so that another sweep can fail and retry the trials of a killed one.
The job side (binding a job to its trial, the heartbeat thread): finqa_exp/sweep/job.py.
Which trials fill the study's `n_trials` slots across re-runs and workers, and how trials are
failed, retried and told: finqa_exp/sweep/study_book.py. Storage and sampler construction:
finqa_exp/sweep/study_setup.py.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.distributions import CategoricalDistribution
from optuna.storages import BaseStorage, InMemoryStorage

from finqa_exp.sweep.confirm import ConfirmRun, ConfirmSettings, notify
from finqa_exp.sweep.job import TrialJob

# The objective's handle on its trial, documented as finqa_exp.sweep.sweeper.current_trial().
from finqa_exp.sweep.job import current_trial as current_trial
from finqa_exp.sweep.launches import SCHEDULES, launcher_name, prepare_launcher
from finqa_exp.sweep.resume import PREEMPTED_EXIT, TrialPreempted
from finqa_exp.sweep.rounds import SweepRun
from finqa_exp.sweep.search_space import SearchSpace, parse_search_space
from finqa_exp.sweep.study_book import (
    study_results,
)
from finqa_exp.sweep.study_setup import (
    SweepConfigError,
    build_sampler,
    continued_sampler_conf,
    open_storage,
    study_directions,
    study_metric_names,
)

log = logging.getLogger(__name__)

_BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


# ---------------------------------------------------------------- the sweep


class StudySweep:
    """The work behind hydra_plugins.finqa_optuna_sweeper.FinqaOptunaSweeper.

    Takes the keys of FinqaOptunaSweeperConf (sampler, pruner, storage and callbacks still
    as configs); `setup` and `sweep` follow hydra.plugins.sweeper.Sweeper.
    """

    def __init__(
        self,
        sampler: Any,
        pruner: Any,
        direction: Any = "minimize",
        metric_names: Any = None,
        storage: Any = None,
        study_name: str | None = None,
        n_trials: int = 20,
        n_jobs: int = 2,
        schedule: str = "async",
        max_failure_rate: float = 0.0,
        params: Any = None,
        custom_search_space: str | None = None,
        enqueue_trials: Any = (),
        callbacks: Any = (),
        heartbeat_interval: int = 60,
        grace_period: int | None = None,
        max_retry: int = 1,
        preflight: str | None = None,
        confirm: Any = None,
    ) -> None:
        if not 0.0 <= max_failure_rate <= 1.0:
            raise SweepConfigError(
                f"max_failure_rate must be within [0, 1], got {max_failure_rate}"
            )
        if n_trials < 0 or n_jobs < 1 or heartbeat_interval <= 0 or max_retry < 0:
            raise SweepConfigError(
                "need n_trials >= 0, n_jobs >= 1, heartbeat_interval > 0 and max_retry >= 0; "
                f"got {n_trials}, {n_jobs}, {heartbeat_interval}, {max_retry}"
            )
        if schedule not in SCHEDULES:
            raise SweepConfigError(
                f"hydra.sweeper.schedule must be one of {list(SCHEDULES)}, got {schedule!r}"
            )
        self.sampler_conf = sampler
        self.pruner_conf = pruner
        self.directions = study_directions(direction)
        self.metric_names = study_metric_names(metric_names, len(self.directions))
        self.storage_spec = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.schedule = schedule
        self.max_failure_rate = max_failure_rate
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        self.custom_search_space = custom_search_space
        self.enqueue = [_plain(p) for p in enqueue_trials or ()]
        self.callback_confs = list(callbacks or ())
        self.heartbeat_interval = float(heartbeat_interval)
        self.grace_period = float(grace_period or 2 * heartbeat_interval)
        self.max_retry = max_retry
        self.preflight = preflight
        try:
            self.confirm = ConfirmSettings(**_plain(confirm or {}))
        except (TypeError, ValueError) as err:
            raise SweepConfigError(f"hydra.sweeper.confirm: {err}") from err
        if self.confirm.only and not self.confirm.enabled:
            raise SweepConfigError("hydra.sweeper.confirm.only=true needs confirm.top_k > 0")
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self.config: DictConfig | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context = hydra_context
        self.task_function = task_function
        self.config = config

    def sweep(self, arguments: list[str]) -> optuna.Study:
        """Run the study up to n_trials trials in total; returns it."""
        assert self.hydra_context is not None and self.config is not None
        assert self.task_function is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        try:
            space = parse_search_space(overrides, parser)
        except ValueError as err:  # e.g. a log-scale interval that starts at 0
            _bad_input(f"hydra.sweeper.params: {err}")
        if self.preflight:
            self._preflight(space)
        sampler, n_trials = build_sampler(self.sampler_conf, space, self.n_trials)
        pruner = instantiate(self.pruner_conf) if self.pruner_conf else optuna.pruners.NopPruner()
        storage = open_storage(self.storage_spec)
        study = self._open_study(storage, sampler, pruner)
        existing = len(study.get_trials(deepcopy=False))
        if existing:
            # With the same seed, a re-run (or a second worker) would propose the first
            # run's params again; shifting the seed by the trials already there keeps runs
            # reproducible without repeating them.
            conf = continued_sampler_conf(self.sampler_conf, existing)
            sampler, n_trials = build_sampler(conf, space, self.n_trials)
            study.sampler = sampler
        job = TrialJob(self.task_function, storage, study.study_name, sampler, pruner)
        launcher = self.make_launcher(job)
        if isinstance(storage, InMemoryStorage) and not self.in_process(launcher):
            raise SweepConfigError(
                f"hydra.sweeper.storage is null (in memory), but {type(launcher).__name__} runs "
                "jobs in other processes that cannot reach it: set hydra.sweeper.storage, e.g. "
                "journal:///abs/path/study.log or sqlite:////abs/path/study.db"
            )
        # A launcher without n_jobs of its own (submitit, ray) leaves n_jobs at 1.
        no_own = "n_jobs" not in self.config.hydra.launcher
        if self.n_jobs == 1 and no_own and not self.in_process(launcher):
            log.warning(
                "hydra.sweeper.n_jobs=1: %s runs one trial at a time; set hydra.sweeper.n_jobs "
                "to keep more trials in flight",
                type(launcher).__name__,
            )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        log.info(
            "Study %s (%s, %s): %d trials in total, %d at a time (%s, %s); sampler %s, pruner %s",
            study.study_name,
            type(storage).__name__,
            "/".join(self.directions),
            n_trials,
            1 if self.in_process(launcher) else self.n_jobs,
            self.schedule,
            type(launcher).__name__,
            type(sampler).__name__,
            type(pruner).__name__,
        )
        callbacks = [instantiate(conf) for conf in self.callback_confs]
        persistent = not isinstance(storage, InMemoryStorage)
        in_process = self.in_process(launcher)
        run = SweepRun(self, study, launcher, space, n_trials, persistent, callbacks, in_process)
        notify(callbacks, "on_sweep_start", study)
        workers = None
        try:
            if self.confirm.only:
                log.info("confirm.only: no new trial; confirming the study's top trials")
            else:
                workers = run.execute()
                if workers.jobs:
                    log.info(
                        "Workers idle %.1f%% of the time: %d trials, %d at a time (%s), %.0f s",
                        100 * workers.idle_share,
                        workers.jobs,
                        workers.slots,
                        self.schedule,
                        workers.wall_s,
                    )
            # Only once the study has all its trials: the top k are final then.
            ConfirmRun(self, study, space, self.confirm, callbacks).execute()
        except TrialPreempted as err:
            # Told to stop (SIGTERM): the trials in flight are queued again (SweepRun).
            print(f"stopped: {err}; run the same command to resume", file=sys.stderr)
            raise SystemExit(PREEMPTED_EXIT) from err
        finally:
            results = study_results(study)
            if workers is not None and workers.jobs:
                # This process's trials (not its confirmations): what the bench compares.
                results["workers"] = {"schedule": self.schedule, **workers.as_dict()}
            OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
            log.info("Results: %s", results)
            notify(callbacks, "on_sweep_end", study)
        return study

    def make_launcher(self, job: TrialJob) -> Any:
        """The configured Hydra launcher, running ``job`` for each set of overrides."""
        launcher = Plugins.instance().instantiate_launcher(
            hydra_context=self.hydra_context, task_function=job, config=self.config
        )
        prepare_launcher(launcher)
        return launcher

    @staticmethod
    def in_process(launcher: Any) -> bool:
        """Whether ``launcher`` runs jobs in this process (Hydra's basic launcher)."""
        return launcher_name(launcher) == _BASIC_LAUNCHER

    def _preflight(self, space: SearchSpace) -> None:
        """Check the jobs' configs before any trial exists; exit 2 with one line if one is bad."""
        assert self.hydra_context is not None and self.config is not None
        check = get_method(self.preflight)
        for extra in [[], *preflight_overrides(space)]:
            try:
                cfg = self.hydra_context.config_loader.load_sweep_config(
                    self.config, [*space.fixed, *extra]
                )
                with open_dict(cfg):
                    # No job folder exists yet; ${hydra:...} in the app's config must resolve.
                    cfg.hydra.runtime.output_dir = str(self.config.hydra.sweep.dir)
                    HydraConfig.instance().set_config(cfg)
                    del cfg["hydra"]
                check(cfg)
            except Exception as err:
                message = str(err).splitlines()[0]
                cause = ""
                if err.__cause__ is not None:
                    text = str(err.__cause__).splitlines()[0]
                    # Name the cause once: a message may already quote it (a DataError
                    # quotes its JSONDecodeError's msg).
                    if getattr(err.__cause__, "msg", text) not in message:
                        cause = f": {text}"
                where = f" (with {' '.join(extra)})" if extra else ""
                _bad_input(f"{message}{cause}{where}")

    def _open_study(
        self,
        storage: BaseStorage,
        sampler: optuna.samplers.BaseSampler,
        pruner: optuna.pruners.BasePruner,
    ) -> optuna.Study:
        study = optuna.create_study(
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            study_name=self.study_name,
            directions=self.directions,
            load_if_exists=True,
        )
        found = [d.name.lower() for d in study.directions]
        if found != self.directions:
            raise SweepConfigError(
                f"study {study.study_name} is {found}, but hydra.sweeper.direction asks for "
                f"{self.directions}: use another study_name"
            )
        if self.metric_names:
            # Read once: workers opening one study race, and a second read may already see
            # the names another worker has just set.
            names = study.metric_names
            if names is None:
                with warnings.catch_warnings():  # set_metric_names is experimental in Optuna
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    study.set_metric_names(self.metric_names)
                names = study.metric_names
            if names != self.metric_names:
                raise SweepConfigError(
                    f"study {study.study_name} has the values {names}, but "
                    f"hydra.sweeper.metric_names says {self.metric_names}: use another "
                    "study_name"
                )
        return study


def _bad_input(message: str) -> NoReturn:
    # Bad input is the user's to fix, not a crash: one line, exit code 2, nothing recorded.
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def preflight_overrides(space: SearchSpace) -> list[list[str]]:
    """One override list per extreme of each searched value: low and high ends, every choice."""
    checks = []
    for name, dist in space.distributions.items():
        key = space.keys[name]
        if isinstance(dist, CategoricalDistribution):
            values = space.choice_text.get(name) or [str(c) for c in dist.choices]
        else:
            values = [str(dist.low), str(dist.high)]
        checks.extend([f"{key}={value}"] for value in values)
    return checks


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
