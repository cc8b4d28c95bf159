"""Confirmation: after a study's trials, train its top trials again with other seeds.

    python -m finqa_exp -m                  # conf/search/default.yaml: top 3 x 2 more seeds
    python my_app.py -m hydra.sweeper.confirm.top_k=3 'hydra.sweeper.confirm.seeds=[1,2]' \
        hydra.sweeper.confirm.seed_key=seed

One training run per configuration cannot tell a better configuration from a lucky seed.
Once the study has its ``n_trials``, the sweeper re-runs each of the ``top_k`` complete
trials once per seed in ``seeds``, with the trial's params and ``<seed_key>=<seed>``. Their
runs live in a study of their own, ``<study>.confirm`` in the same storage, so they never
count toward ``n_trials`` or steer the sampler; each holds the params of the trial it
confirms plus the seed, and the user attrs ``confirms`` (that trial's number) and ``seed``.
The confirmation study copies the main study's user attrs (an app's parent run, say) and
names the main study in ``confirms_study``.

Re-running the command runs only what is missing: a confirmation that completed is kept, a
failed one is run again, one left RUNNING by a killed sweep is failed once its heartbeat is
stale and run again (the sweep's callbacks get ``on_trial_end`` with the confirmation study
for each, so an app can close its runs). Nothing is pruned: a confirmation trains to the
end. The job folder of confirmation ``n`` is ``confirm-<n>`` in the sweep folder. A failed
confirmation counts against ``max_failure_rate`` (of the pairs to run) as a failed trial
does; the next run of the command runs it again.

In a multi-objective study the first objective ranks the trials (the top_k, and the best
mean); every objective's values are recorded.

``hydra.sweeper.confirm.only=true`` confirms an existing study without asking for any new
trial, e.g. more of its trials, or with more seeds::

    python -m finqa_exp -m hydra.sweeper.confirm.only=true hydra.sweeper.confirm.top_k=5

:func:`confirmed` turns both studies into each configuration's values over its seeds, for
whoever picks the winner.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from finqa_exp.sweep.job import Heartbeat, TrialJob
from finqa_exp.sweep.launches import JobSlots
from finqa_exp.sweep.resume import discard_checkpoint
from finqa_exp.sweep.search_space import SearchSpace, format_value, trial_overrides
from finqa_exp.sweep.study_book import (
    Outcome,
    check_failure_budget,
    fail_trial,
    last_beat,
    tell,
)
from finqa_exp.sweep.study_setup import SweepError

log = logging.getLogger(__name__)

CONFIRM_SUFFIX = ".confirm"
CONFIRMS_ATTR = "confirms"  # user attr of a confirmation trial: the number it confirms
SEED_ATTR = "seed"  # user attr of a confirmation trial: its seed
CONFIRMED_STUDY_ATTR = "confirms_study"  # user attr of a confirmation study: the main study


def notify(callbacks: Sequence[Any], event: str, *args: Any) -> None:
    for callback in callbacks:
        method = getattr(callback, event, None)
        if method is not None:
            method(*args)


def confirm_study_name(study_name: str) -> str:
    return study_name + CONFIRM_SUFFIX


@dataclass
class ConfirmSettings:
    """``hydra.sweeper.confirm``: top_k 0 (the default) turns confirmation off."""

    top_k: int = 0
    seeds: list[int] = field(default_factory=list)
    seed_key: str | None = None
    only: bool = False  # confirm an existing study; ask for no new trial

    def __post_init__(self) -> None:
        self.seeds = [int(s) for s in self.seeds or ()]
        if self.top_k < 0:
            raise ValueError(f"confirm.top_k must be >= 0, got {self.top_k}")
        if self.top_k and (not self.seeds or not self.seed_key):
            raise ValueError("confirm.top_k > 0 needs confirm.seeds and confirm.seed_key")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"confirm.seeds lists a seed twice: {self.seeds}")

    @property
    def enabled(self) -> bool:
        return self.top_k > 0


def _sign(study: optuna.Study) -> float:
    """-1 if the (first) objective is maximized: sorting sign * value puts the best first."""
    return -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0


def top_trials(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The study's ``k`` best complete trials by its (first) objective, best first (ties: the
    earlier trial)."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(done, key=lambda t: (_sign(study) * float(t.values[0]), t.number))[:k]


def pair(trial: FrozenTrial) -> tuple[int, int] | None:
    """(confirmed trial number, seed) of a confirmation trial; None for any other trial."""
    if CONFIRMS_ATTR not in trial.user_attrs:
        return None
    return int(trial.user_attrs[CONFIRMS_ATTR]), int(trial.user_attrs[SEED_ATTR])


def open_confirm_study(study: optuna.Study) -> optuna.Study:
    """The confirmation study of ``study`` (created on first use), never pruning."""
    confirm = optuna.create_study(
        storage=study._storage,  # the same storage object: no second connection pool
        study_name=confirm_study_name(study.study_name),
        directions=study.directions,
        sampler=optuna.samplers.RandomSampler(),  # every trial's params are given
        pruner=optuna.pruners.NopPruner(),
        load_if_exists=True,
    )
    for key, value in {**study.user_attrs, CONFIRMED_STUDY_ATTR: study.study_name}.items():
        if confirm.user_attrs.get(key) != value:
            confirm.set_user_attr(key, value)
    if study.metric_names and confirm.metric_names != study.metric_names:
        with warnings.catch_warnings():  # set_metric_names is experimental in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            confirm.set_metric_names(study.metric_names)
    return confirm


def missing_pairs(
    top: Sequence[FrozenTrial], seeds: Sequence[int], trials: Sequence[FrozenTrial]
) -> list[tuple[FrozenTrial, int]]:
    """The (trial, seed) confirmations not complete, running or waiting yet."""
    have = {
        p
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
        and (p := pair(t)) is not None
    }
    return [(t, s) for t in top for s in seeds if (t.number, s) not in have]


class ConfirmRun:
    """One sweep process's confirmation pass: queue what is missing, run it, tell it."""

    def __init__(
        self,
        sweep: Any,  # the StudySweep: its settings, launcher factory and Hydra context
        study: optuna.Study,
        space: SearchSpace,
        settings: ConfirmSettings,
        callbacks: Sequence[Any] = (),
    ) -> None:
        self.sweep = sweep
        self.study = study
        self.space = space
        self.settings = settings
        self.callbacks = callbacks  # on_trial_end(confirm study, trial) as for trials
        self.failures: list[str] = []  # this pass's, for max_failure_rate
        self.queued = 0

    def execute(self) -> optuna.Study | None:
        """Run the missing confirmations; returns the confirmation study (None if off)."""
        if not self.settings.enabled:
            return None
        top = top_trials(self.study, self.settings.top_k)
        if not top:
            return None
        confirm = open_confirm_study(self.study)
        self._fail_stale(confirm)
        seed_key = self.settings.seed_key
        assert seed_key is not None
        seeds = self.settings.seeds
        missing = missing_pairs(top, seeds, confirm.get_trials(deepcopy=False))
        self.queued = len(missing) + len(
            confirm.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        )
        for trial, seed in missing:
            confirm.add_trial(
                optuna.trial.create_trial(
                    state=TrialState.WAITING,
                    params={**trial.params, seed_key: seed},
                    distributions={**trial.distributions, seed_key: CategoricalDistribution(seeds)},
                    user_attrs={CONFIRMS_ATTR: trial.number, SEED_ATTR: seed},
                )
            )
        log.info(
            "Confirming trials %s with seeds %s (%s): study %s",
            [t.number for t in top], seeds, seed_key, confirm.study_name,
        )  # fmt: skip
        job = TrialJob(
            self.sweep.task_function,
            self.study._storage,
            confirm.study_name,
            confirm.sampler,
            confirm.pruner,
        )
        launcher = self.sweep.make_launcher(job)
        slots = JobSlots(
            launcher,
            self.sweep.n_jobs,
            len(confirm.directions),
            self.sweep.schedule,
            in_process=self.sweep.in_process(launcher),
        )
        asked: dict[int, FrozenTrial] = {}
        stop: SweepError | None = None  # too many failures: start nothing, let the rest end
        with Heartbeat(confirm, self.sweep.heartbeat_interval) as heartbeat:
            while True:
                free = 0 if stop else slots.free()
                for trial in self._ask(confirm, heartbeat, free):
                    asked[trial.number] = trial
                    slots.start(trial.number, self._overrides(trial))
                if not slots.running:
                    break
                for number, outcome in slots.wait():
                    heartbeat.discard(number)
                    self._finish(confirm, asked.pop(number), outcome)
                try:
                    self._check_failures()
                except SweepError as err:
                    stop = stop or err
        if stop is not None:
            raise stop
        return confirm

    def _ask(self, confirm: optuna.Study, heartbeat: Heartbeat, count: int) -> list[FrozenTrial]:
        asked: list[FrozenTrial] = []
        for _ in range(count):
            trials = confirm.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if not trials:
                break
            number = confirm.ask().number  # the oldest waiting one; another worker's race
            heartbeat.add(number)
            frozen = confirm.get_trials(deepcopy=False)[number]
            if pair(frozen) is None:  # another worker took the last waiting one meanwhile
                heartbeat.discard(number)
                fail_trial(confirm, number, "surplus: no confirmation was waiting")
                break
            asked.append(frozen)
        return asked

    def _overrides(self, trial: FrozenTrial) -> list[str]:
        seed_key = self.settings.seed_key
        params = {k: v for k, v in trial.params.items() if k != seed_key}
        return [
            *trial_overrides(params, self.space),
            f"{seed_key}={format_value(trial.user_attrs[SEED_ATTR])}",
            f"hydra.sweep.subdir=confirm-{trial.number}",
        ]

    def _finish(self, confirm: optuna.Study, trial: FrozenTrial, outcome: Outcome) -> None:
        confirmed, seed = pair(trial) or (-1, -1)
        if outcome.state == TrialState.PRUNED:  # an app may prune; a confirmation may not
            outcome = Outcome(TrialState.FAIL, reason="pruned: a confirmation trains to the end")
        if outcome.state == TrialState.FAIL:
            frozen = fail_trial(confirm, trial.number, outcome.reason or "unknown")
            log.error(
                "Confirmation %d of trial %d, seed %d: FAIL: %s (run the command again to "
                "retry it)", trial.number, confirmed, seed, outcome.reason,
            )  # fmt: skip
            self.failures.append(f"confirmation {trial.number}: {outcome.reason}")
        else:
            frozen = tell(confirm, trial.number, outcome)
            log.info(
                "Confirmation %d of trial %d, seed %d: %s %s",
                trial.number, confirmed, seed, frozen.state.name, _fmt(frozen.values),
            )  # fmt: skip
        if frozen is not None:
            notify(self.callbacks, "on_trial_end", confirm, frozen)

    def _check_failures(self) -> None:
        """SweepError once this pass's failures exceed max_failure_rate x the pairs queued
        (checked once nothing runs, so no confirmation is left RUNNING)."""
        rate = self.sweep.max_failure_rate
        check_failure_budget(self.failures, rate, self.queued, "confirmations", "pairs queued")

    def _fail_stale(self, confirm: optuna.Study) -> None:
        now = time.time()
        for trial in confirm.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            silence = now - last_beat(trial)
            if silence > self.sweep.grace_period:
                reason = f"stale: no heartbeat for {silence:.0f}s, its sweep process died"
                frozen = fail_trial(confirm, trial.number, reason)
                if frozen is not None:
                    discard_checkpoint(frozen)  # its pair runs again as a new trial
                    log.warning("Confirmation %d was left RUNNING (%s)", trial.number, reason)
                    notify(self.callbacks, "on_trial_end", confirm, frozen)


# ---------------------------------------------------------------- reading the result


@dataclass(frozen=True)
class Confirmed:
    """One configuration's objective over its seeds: the trial's own run first."""

    trial: FrozenTrial
    values: tuple[float, ...]
    seeds: tuple[int | None, ...]  # None: the trial's own seed, whatever the app set
    confirmations: tuple[FrozenTrial, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 with one value)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def confirmed(study: optuna.Study) -> list[Confirmed]:
    """Each confirmed configuration of ``study`` with its values over seeds, best mean first
    (only trials with at least one complete confirmation); [] if nothing was confirmed."""
    name = confirm_study_name(study.study_name)
    names = {s.study_name for s in optuna.get_all_study_summaries(study._storage)}
    if name not in names:
        return []
    confirm = optuna.load_study(study_name=name, storage=study._storage)
    by_trial: dict[int, list[FrozenTrial]] = {}
    seen: set[tuple[int, int]] = set()
    for t in confirm.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        p = pair(t)
        if p is not None and p not in seen:  # two workers racing may both run a pair
            seen.add(p)
            by_trial.setdefault(p[0], []).append(t)
    trials = study.get_trials(deepcopy=False)
    out = []
    for number, runs in by_trial.items():
        original = trials[number]
        if original.state != TrialState.COMPLETE:
            continue
        runs.sort(key=lambda t: int(t.user_attrs[SEED_ATTR]))
        values = (float(original.values[0]), *(float(t.values[0]) for t in runs))
        seeds = (None, *(int(t.user_attrs[SEED_ATTR]) for t in runs))
        out.append(Confirmed(original, values, seeds, tuple(runs)))
    return sorted(out, key=lambda c: (_sign(study) * c.mean, c.trial.number))


def _fmt(values: Sequence[float] | None) -> str:
    return ", ".join(f"{v:.4g}" for v in values or ())
