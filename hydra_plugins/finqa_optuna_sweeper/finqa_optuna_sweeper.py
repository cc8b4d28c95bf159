"""Hydra plugin shim for the `finqa_optuna` sweeper: its config schema and plugin class.

Hydra imports every module under `hydra_plugins` at start-up, so this one only declares configs
and defers the real work (and the Optuna import) to finqa_exp/sweep/sweeper.py. Select it with

    python my_app.py -m hydra/sweeper=finqa_optuna hydra.sweeper.n_trials=20

or `defaults: [{override hydra/sweeper: finqa_optuna}]`; switch the pruner with
`hydra/sweeper/pruner=median` and the sampler with `hydra/sweeper/sampler=random`.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig

_PROVIDER = "finqa_exp"


# Samplers: the keys of hydra-optuna-sweeper plus `seed` everywhere; unset knobs keep
# Optuna's own defaults.
@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None
    consider_prior: bool | None = None
    prior_weight: float | None = None
    consider_magic_clip: bool | None = None
    consider_endpoints: bool | None = None
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    multivariate: bool | None = None
    group: bool = False
    constant_liar: bool = True
    warn_independent_sampling: bool | None = None


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None


@dataclass
class GridSamplerConf:
    # The sweeper builds the grid from `params` and calls this partial with it.
    _target_: str = "optuna.samplers.GridSampler"
    _partial_: bool = True
    seed: int | None = None


@dataclass
class CmaEsSamplerConf:
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: int | None = None
    x0: dict[str, Any] | None = None
    sigma0: float | None = None
    n_startup_trials: int = 1
    warn_independent_sampling: bool = True
    consider_pruned_trials: bool = False
    restart_strategy: str | None = None
    popsize: int | None = None
    use_separable_cma: bool = False
    with_margin: bool = False
    lr_adapt: bool = False


@dataclass
class NSGAIISamplerConf:
    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: int | None = None
    population_size: int = 50
    mutation_prob: float | None = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5


@dataclass
class QMCSamplerConf:
    _target_: str = "optuna.samplers.QMCSampler"
    seed: int | None = None
    qmc_type: str = "sobol"
    scramble: bool = False
    warn_asynchronous_seeding: bool = True
    warn_independent_sampling: bool = True


@dataclass
class GPSamplerConf:
    _target_: str = "optuna.samplers.GPSampler"
    seed: int | None = None
    n_startup_trials: int = 10
    deterministic_objective: bool = False
    warn_independent_sampling: bool = True


@dataclass
class NopPrunerConf:
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class MedianPrunerConf:
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class SuccessiveHalvingPrunerConf:
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"  # "auto" or an int
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0
    bootstrap_count: int = 0


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"  # "auto" or an int
    reduction_factor: int = 3
    bootstrap_count: int = 0


@dataclass
class ConfirmConf:
    """After the study's n_trials, train the top_k trials again once per seed (seed_key=seed),
    in the study <study_name>.confirm; top_k 0 is off. See finqa_exp/sweep/confirm.py."""

    top_k: int = 0
    seeds: list[int] = field(default_factory=list)
    seed_key: str | None = None
    # Confirm an existing study's top_k now, asking for no new trial (its n_trials aside).
    only: bool = False


@dataclass
class FinqaOptunaSweeperConf:
    """hydra.sweeper for `hydra/sweeper=finqa_optuna`; semantics in finqa_exp/sweep/sweeper.py."""

    _target_: str = "hydra_plugins.finqa_optuna_sweeper.finqa_optuna_sweeper.FinqaOptunaSweeper"
    # The sweeper instantiates sampler, pruner, storage and callbacks itself (the grid
    # sampler needs the parsed search space first).
    _recursive_: bool = False
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])

    sampler: Any = MISSING
    pruner: Any = MISSING
    # "minimize" | "maximize", or a list of them for a multi-objective study.
    direction: Any = "minimize"
    # What the objective values are, e.g. rougeL or [rougeL, numeric_accuracy]: Optuna's
    # study.metric_names, which optuna-dashboard and trials_dataframe() show (None: unnamed).
    metric_names: Any = None
    # None (in memory), an RDB URL (sqlite:///abs.db, postgresql://...),
    # journal:///abs/path.log, or a config with a _target_ that builds an Optuna storage.
    storage: Any = None
    study_name: str | None = None
    # The study's total: a re-run only runs what is left.
    n_trials: int = 20
    # Trials in flight at once (with a launcher that runs jobs elsewhere: joblib, submitit,
    # ray; Hydra's basic launcher runs one at a time in the sweep's own process).
    n_jobs: int = 2
    # "async": a trial starts as soon as any trial ends; "batch": rounds of n_jobs trials,
    # each round waiting for its slowest trial (as hydra-optuna-sweeper does).
    schedule: str = "async"
    # Stop once this run's failed trials exceed max_failure_rate * n_trials.
    max_failure_rate: float = 0.0
    params: dict[str, str] | None = None
    # Dotted path to fn(cfg, trial) that suggests extra params.
    custom_search_space: str | None = None
    # Params of trials to run first, e.g. [{x: 1.0, kind: a}]; skipped if already in the study.
    enqueue_trials: list[Any] = field(default_factory=list)
    # _target_ configs of objects with on_sweep_start/on_trial_end/on_sweep_end.
    callbacks: list[Any] = field(default_factory=list)
    # Liveness of running trials, so a killed sweep's trials are failed and retried.
    heartbeat_interval: int = 60
    grace_period: int | None = None  # None -> 2 * heartbeat_interval
    max_retry: int = 1
    # Dotted path to fn(cfg) that checks a job's config (composed from the command line's
    # fixed overrides, and once per extreme of each searched value) before the study opens:
    # bad input fails in seconds with no trial created.
    preflight: str | None = None
    # Re-run the best trials with more seeds once the study is done (off by default).
    confirm: ConfirmConf = field(default_factory=ConfirmConf)


def register_configs() -> None:
    """Register the sweeper, sampler and pruner configs in Hydra's ConfigStore."""
    store = ConfigStore.instance()
    store.store(
        group="hydra/sweeper", name="finqa_optuna", node=FinqaOptunaSweeperConf, provider=_PROVIDER
    )
    samplers = {
        "tpe": TPESamplerConf,
        "random": RandomSamplerConf,
        "grid": GridSamplerConf,
        "cmaes": CmaEsSamplerConf,
        "nsgaii": NSGAIISamplerConf,
        "qmc": QMCSamplerConf,
        "gp": GPSamplerConf,
    }
    for name, node in samplers.items():
        store.store(group="hydra/sweeper/sampler", name=name, node=node, provider=_PROVIDER)
    pruners = {
        "none": NopPrunerConf,
        "median": MedianPrunerConf,
        "successive_halving": SuccessiveHalvingPrunerConf,
        "hyperband": HyperbandPrunerConf,
    }
    for name, node in pruners.items():
        store.store(group="hydra/sweeper/pruner", name=name, node=node, provider=_PROVIDER)


register_configs()


class FinqaOptunaSweeper(Sweeper):
    """The plugin Hydra instantiates; finqa_exp.sweep.sweeper.StudySweep does the work."""

    def __init__(self, **settings: Any) -> None:
        from finqa_exp.sweep.sweeper import StudySweep

        super().__init__()
        self._sweep = StudySweep(**settings)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self._sweep.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self._sweep.sweep(arguments)
