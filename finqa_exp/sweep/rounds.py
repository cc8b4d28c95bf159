"""One sweep process's pass over the study: keep up to ``n_jobs`` trials in flight (ask
Optuna, launch each as a Hydra job through finqa_exp.sweep.launches, tell Optuna how it
ended) until the study has its total. Failing and retrying the trials of killed sweeps,
and stopping on too many failures, happen here too. finqa_exp.sweep.sweeper sets it up."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from hydra.utils import get_method
from omegaconf import DictConfig
from optuna.trial import TrialState

from finqa_exp.sweep.confirm import notify
from finqa_exp.sweep.job import Heartbeat
from finqa_exp.sweep.launches import JobSlots, WorkerTime
from finqa_exp.sweep.resume import (
    TrialPreempted,
    deferred,
    discard_checkpoint,
    requested,
    sigterm_preempts,
)
from finqa_exp.sweep.search_space import SearchSpace
from finqa_exp.sweep.search_space import trial_overrides as params_to_overrides
from finqa_exp.sweep.study_book import (
    SURPLUS_ATTR,
    Outcome,
    check_failure_budget,
    describe,
    ending_line,
    enqueue_retry,
    fail_trial,
    last_beat,
    running_in_total,
    set_trial_attr,
    stale_trials,
    tell,
    trials_to_ask,
    within_total,
)
from finqa_exp.sweep.study_setup import SweepError, suggest

log = logging.getLogger(__name__)

_PEER_POLL_S = 1.0  # how often a worker with nothing left to ask checks its peers' trials
_SIGNAL_POLL_S = 2.0  # how soon a sweep waiting on its jobs notices SIGTERM
STOP_GRACE_S = 30.0  # how long a preempted sweep's jobs have to save before they are killed


class SweepRun:
    """One sweep process's pass over the study: ask, launch, tell until the total is reached."""

    def __init__(
        self,
        sweep: Any,  # the StudySweep: its settings
        study: optuna.Study,
        launcher: Any,
        space: SearchSpace,
        n_trials: int,
        persistent: bool,
        callbacks: Sequence[Any] = (),
        in_process: bool = False,
    ) -> None:
        self.sweep = sweep
        self.study = study
        self.launcher = launcher
        self.space = space
        self.n_trials = n_trials
        self.persistent = persistent
        self.extend: Callable[[DictConfig, optuna.Trial], None] | None = (
            get_method(sweep.custom_search_space) if sweep.custom_search_space else None
        )
        self.callbacks = callbacks
        self.in_process = in_process  # the launcher runs jobs here, one at a time
        self.failures: list[str] = []  # this run's failed trials, for max_failure_rate

    def execute(self) -> WorkerTime:
        """Run trials until the study has its total; returns how busy the workers were."""
        self._fail_stale()
        for params in self.sweep.enqueue:
            self.study.enqueue_trial(params, skip_if_exists=True)
        slots = JobSlots(
            self.launcher,
            self.sweep.n_jobs,
            len(self.sweep.directions),
            self.sweep.schedule,
            self.in_process,
        )
        # SIGTERM here only sets a flag that _fill reads between jobs (never between a
        # job's end and its tell); a job run in this process stops at once (TrialJob).
        with (
            Heartbeat(self.study, self.sweep.heartbeat_interval) as heartbeat,
            sigterm_preempts(),
            deferred(),
        ):
            try:
                self._fill(slots, heartbeat)
            except BaseException as err:
                # Interrupted (Ctrl-C) or stopped: tell what has ended, stop what runs where
                # the launcher allows it, fail the rest and queue it again, as a killed
                # sweep's trials would be at the next start.
                for number, outcome in slots.wait(timeout=0):
                    heartbeat.discard(number)
                    self._finish(number, outcome)
                # Preempted: the jobs get SIGTERM too and a moment to save a checkpoint.
                grace = STOP_GRACE_S if isinstance(err, TrialPreempted) else 0.0
                for number, outcome in slots.stop(grace_s=grace):
                    heartbeat.discard(number)
                    self._finish(number, outcome)
                for number in slots.running:
                    heartbeat.discard(number)
                    frozen = fail_trial(self.study, number, f"sweep interrupted: {describe(err)}")
                    if frozen is not None and not enqueue_retry(
                        self.study, frozen, self.sweep.max_retry
                    ):
                        discard_checkpoint(frozen)
                if isinstance(err, TrialPreempted) and slots.running:
                    log.warning(
                        "Sweep stopped by SIGTERM: trials %s are queued again and resume from "
                        "their last checkpoint when the same command runs again",
                        slots.running,
                    )
                raise
        return slots.worker_time()

    def _fill(self, slots: JobSlots, heartbeat: Heartbeat) -> None:
        """Keep the slots busy until the study has its total and nothing runs."""
        waiting_logged = False
        stop: SweepError | None = None  # too many failures: start nothing, let the rest end
        while True:
            trials = self.study.get_trials(deepcopy=False)
            count = 0 if stop else min(slots.free(), trials_to_ask(trials, self.n_trials))
            for number, overrides in self._ask(count, heartbeat):
                slots.start(number, overrides)
            if requested():
                raise TrialPreempted("SIGTERM: the sweep was told to stop (preempted)")
            if slots.running or count:
                for number, outcome in self._wait(slots):
                    heartbeat.discard(number)
                    self._finish(number, outcome)
                try:
                    self._check_failures()
                except SweepError as err:
                    stop = stop or err
                self._fail_stale()
                waiting_logged = False
                continue
            if stop is not None:
                raise stop
            running = running_in_total(trials, self.n_trials)
            if not running:
                return
            if not waiting_logged:
                log.info("Waiting for trials %s of other workers", [t.number for t in running])
                waiting_logged = True
            time.sleep(_PEER_POLL_S)
            self._fail_stale()

    def _wait(self, slots: JobSlots) -> list[tuple[int, Outcome]]:
        """Jobs that ended, within a heartbeat at most (to fail dead workers' trials
        meanwhile), looking every few seconds (not at the study: at a flag in memory)
        whether the sweep was told to stop."""
        deadline = time.monotonic() + self.sweep.heartbeat_interval
        while slots.running and (left := deadline - time.monotonic()) > 0 and not requested():
            ended = slots.wait(timeout=min(left, _SIGNAL_POLL_S))
            if ended:
                return ended
        return []

    def _finish(self, number: int, outcome: Outcome) -> None:
        if outcome.state == TrialState.FAIL:
            # The traceback for whoever debugs; the log's line for the trial comes below.
            log.debug("Trial %d failed", number, exc_info=outcome.error)
            frozen = fail_trial(self.study, number, outcome.reason or "unknown")
            max_retry = self.sweep.max_retry
            if outcome.lost and frozen is not None and enqueue_retry(self.study, frozen, max_retry):
                log.warning("Trial %d: %s; retrying it", number, outcome.reason)
                notify(self.callbacks, "on_trial_end", self.study, frozen)
                return
            if frozen is not None:  # else another worker failed it first, and retries it
                self.failures.append(f"trial {number}: {outcome.reason}")
                discard_checkpoint(frozen)  # failed for good: nothing will resume it
        else:
            frozen = tell(self.study, number, outcome)
        if frozen is None:
            log.warning(
                "Trial %d was finished by another worker (its heartbeat looked stale)", number
            )
            return
        line = ending_line(frozen, self.study)
        (log.error if frozen.state == TrialState.FAIL else log.info)(line)
        notify(self.callbacks, "on_trial_end", self.study, frozen)

    def _ask(self, count: int, heartbeat: Heartbeat) -> list[tuple[int, list[str]]]:
        """Ask for `count` trials and sample them; returns (number, overrides) to launch."""
        batch = []
        for _ in range(count):
            trial = self.study.ask()
            heartbeat.add(trial.number)
            if not within_total(self.study.get_trials(deepcopy=False), trial.number, self.n_trials):
                # Another worker took the last slot between our count and our ask.
                heartbeat.discard(trial.number)
                self._drop_surplus(trial.number)
                break
            try:
                batch.append((trial.number, self._configure(trial)))
            except Exception as err:
                heartbeat.discard(trial.number)
                outcome = Outcome(TrialState.FAIL, reason=describe(err), error=err)
                self._finish(trial.number, outcome)
        return batch

    def _drop_surplus(self, number: int) -> None:
        set_trial_attr(self.study, number, SURPLUS_ATTR, True, system=True)
        fail_trial(self.study, number, "surplus: the study already had n_trials trials")

    def _configure(self, trial: optuna.Trial) -> list[str]:
        assert self.sweep.config is not None and self.sweep.hydra_context is not None
        for name, dist in self.space.distributions.items():
            suggest(trial, name, dist)
        if self.extend is not None:
            self.extend(self.sweep.config, trial)
        overrides = params_to_overrides(trial.params, self.space)
        # Compose now so a bad sampled value fails this trial, not the whole batch.
        self.sweep.hydra_context.config_loader.load_sweep_config(self.sweep.config, overrides)
        return overrides

    def _fail_stale(self) -> None:
        if not self.persistent:
            return  # an in-memory study dies with its only process
        trials = self.study.get_trials(deepcopy=False)
        now = time.time()
        for trial in stale_trials(trials, now, self.sweep.grace_period):
            silence = now - last_beat(trial)
            reason = f"stale: no heartbeat for {silence:.0f}s, its sweep process died"
            frozen = fail_trial(self.study, trial.number, reason)
            if frozen is None:
                continue  # another worker failed it first, and retries it
            retried = enqueue_retry(self.study, frozen, self.sweep.max_retry)
            if not retried:
                discard_checkpoint(frozen)
            log.warning(
                "Trial %d was left RUNNING (%s)%s",
                trial.number,
                reason,
                "; retrying it" if retried else "",
            )
            notify(self.callbacks, "on_trial_end", self.study, frozen)

    def _check_failures(self) -> None:
        rate = self.sweep.max_failure_rate
        check_failure_budget(self.failures, rate, self.n_trials, "trials", "n_trials")
