"""Study bookkeeping for the finqa_optuna sweeper: slots, retries, surplus and heartbeats.

finqa_exp/sweep/sweeper.py runs the sweep (`python -m finqa_exp -m`, or any Hydra app with
`-m hydra/sweeper=finqa_optuna`); this module decides, from the study's trials alone, how many
trials are still to ask, which trial fills which slot, which RUNNING trials are stale, how a
job ended, and writes FAIL / retry / tell records to the study.

- every trial fills one slot; a retry fills the slot of the trial it retries (Optuna's
  `failed_trial` / `retry_history` system attrs), and a trial another worker asked for after
  the last slot was taken is marked surplus (SURPLUS_ATTR) and fills none;
- a RUNNING trial whose heartbeat (HEARTBEAT_ATTR) is older than the grace period belongs to
  a killed sweep: it is failed and re-enqueued with the same params, up to max_retry times.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from finqa_exp.sweep.study_setup import SweepError

FAIL_REASON = "fail_reason"  # user attr of a FAIL trial
HEARTBEAT_ATTR = "finqa_optuna:heartbeat"
SURPLUS_ATTR = "finqa_optuna:surplus"
WORKER_ATTR = "finqa_optuna:worker"  # "<host>:<pid>" of the process that ran the trial's job
_MAX_REASON = 1000


# ---------------------------------------------------------------- study bookkeeping (pure)


def _root(trial: FrozenTrial) -> int:
    return trial.system_attrs.get("failed_trial", trial.number)


def replaced_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of trials that a retry replaced (each retry names its predecessor last)."""
    return {
        t.system_attrs["retry_history"][-1] for t in trials if t.system_attrs.get("retry_history")
    }


def slot_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that fill the study's slots, in slot order.

    One per retry chain (its latest trial, ordered by the chain's first number, so a retry
    keeps its original's place); surplus trials fill none. The first n_trials are the study.
    """
    replaced = replaced_numbers(trials)
    kept = [t for t in trials if t.number not in replaced and not t.system_attrs.get(SURPLUS_ATTR)]
    return sorted(kept, key=lambda t: (_root(t), t.number))


def trials_to_ask(trials: Sequence[FrozenTrial], n_trials: int) -> int:
    """How many more trials to ask for: waiting ones within the total, plus free slots."""
    slots = slot_trials(trials)
    waiting = sum(t.state == TrialState.WAITING for t in slots[:n_trials])
    return waiting + max(0, n_trials - len(slots))


def within_total(trials: Sequence[FrozenTrial], number: int, n_trials: int) -> bool:
    """Whether trial `number` got one of the first n_trials slots."""
    slots = [t.number for t in slot_trials(trials)]
    return number in slots[:n_trials]


def running_in_total(trials: Sequence[FrozenTrial], n_trials: int) -> list[FrozenTrial]:
    """RUNNING trials within the total (another worker's, or a killed one not yet stale)."""
    return [t for t in slot_trials(trials)[:n_trials] if t.state == TrialState.RUNNING]


def last_beat(trial: FrozenTrial) -> float:
    """Unix time the trial was last known alive."""
    beat = trial.system_attrs.get(HEARTBEAT_ATTR)
    if beat is not None:
        return float(beat)
    return trial.datetime_start.timestamp() if trial.datetime_start else 0.0


def stale_trials(trials: Sequence[FrozenTrial], now: float, grace: float) -> list[FrozenTrial]:
    """RUNNING trials whose worker has not beaten their heartbeat for `grace` seconds."""
    return [t for t in trials if t.state == TrialState.RUNNING and now - last_beat(t) > grace]


def contiguous_runs(numbers: Sequence[int]) -> list[list[int]]:
    """Split ascending trial numbers into runs of consecutive ones ([3, 4, 7] -> [[3, 4], [7]])."""
    runs = []
    for _, group in itertools.groupby(enumerate(numbers), key=lambda pair: pair[1] - pair[0]):
        runs.append([number for _, number in group])
    return runs


@dataclass(frozen=True)
class Outcome:
    """How a trial ended, as Optuna should be told."""

    state: TrialState
    values: list[float] | None = None
    reason: str | None = None
    error: BaseException | None = field(default=None, compare=False)  # for the log's traceback
    # The job was lost with its worker (the launcher raised: a dead node, a killed process),
    # so the trial itself is not to blame: it is retried as a killed sweep's trials are.
    lost: bool = False


def check_failure_budget(
    failures: Sequence[str], rate: float, total: int, kind: str, total_name: str
) -> None:
    """SweepError once this run's ``failures`` (of ``kind``: "trials") exceed max_failure_rate
    ``rate`` x ``total`` (named ``total_name``: "n_trials")."""
    allowed = rate * total
    if len(failures) > allowed:
        raise SweepError(
            f"{len(failures)} {kind} failed in this sweep, more than max_failure_rate {rate} x "
            f"{total_name} {total} = {allowed:g}; stopping. Last: {failures[-1]}"
        )


def describe(error: BaseException) -> str:
    """The text of a trial's fail_reason: the exception type and message."""
    return f"{type(error).__name__}: {error}"[:_MAX_REASON]


def objective_outcome(value: Any, n_objectives: int) -> Outcome:
    """COMPLETE with the values if the objective returned finite floats, else FAIL with why."""
    expected = "a float" if n_objectives == 1 else f"a sequence of {n_objectives} floats"
    try:
        values = [float(value)] if n_objectives == 1 else [float(v) for v in value]
    except (TypeError, ValueError):
        return Outcome(TrialState.FAIL, reason=f"the objective returned {value!r}, not {expected}")
    if len(values) != n_objectives:
        return Outcome(TrialState.FAIL, reason=f"the objective returned {values}, not {expected}")
    if not all(math.isfinite(v) for v in values):
        return Outcome(TrialState.FAIL, reason=f"the objective returned {values}: not finite")
    return Outcome(TrialState.COMPLETE, values)


def job_outcome(ret: JobReturn, n_objectives: int) -> Outcome:
    """Read a Hydra JobReturn: a value, optuna.TrialPruned, or any other exception."""
    if ret.status == JobStatus.COMPLETED:
        return objective_outcome(ret.return_value, n_objectives)
    # JobReturn.return_value re-raises a job's exception; the exception itself is stored here.
    error = ret._return_value
    if isinstance(error, optuna.TrialPruned):
        return Outcome(TrialState.PRUNED)
    if isinstance(error, BaseException):
        return Outcome(TrialState.FAIL, reason=describe(error), error=error)
    return Outcome(TrialState.FAIL, reason=f"the job ended with status {ret.status.name}")


def study_results(study: optuna.Study) -> dict[str, Any]:
    """optimization_results.yaml, as hydra-optuna-sweeper writes it (plus study_name)."""
    results: dict[str, Any] = {"name": "optuna", "study_name": study.study_name}
    if len(study.directions) > 1:
        results["solutions"] = [{"params": t.params, "values": t.values} for t in study.best_trials]
        return results
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = study.best_trial if done else None
    results["best_params"] = best.params if best else None
    results["best_value"] = best.value if best else None
    return results


# ---------------------------------------------------------------- study writes


def trial_id(study: optuna.Study, number: int) -> int:
    """The storage's id of trial `number` of `study`."""
    # Reopening or annotating a trial by number (from another process, or a trial this
    # process did not ask for) needs the storage's id: Optuna has no public API for it.
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)


def set_trial_attr(study: optuna.Study, number: int, key: str, value: Any, system: bool) -> None:
    """Set a system (or user) attr of trial `number`, which this process need not have asked."""
    storage = study._storage
    setter = storage.set_trial_system_attr if system else storage.set_trial_user_attr
    setter(trial_id(study, number), key, value)


def enqueue_retry(study: optuna.Study, failed: FrozenTrial, max_retry: int) -> bool:
    """Queue `failed` again with the same params, unless its chain used up max_retry.

    Uses the system attrs of optuna.storages.RetryFailedTrialCallback, so its
    `retried_trial_number` / `retry_history` read our retries too.
    """
    history = [*failed.system_attrs.get("retry_history", []), failed.number]
    if len(history) > max_retry:
        return False
    system_attrs = {
        k: v for k, v in failed.system_attrs.items() if not k.startswith("finqa_optuna")
    }
    system_attrs.update(failed_trial=history[0], retry_history=history)
    user_attrs = {k: v for k, v in failed.user_attrs.items() if k != FAIL_REASON}
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=failed.params,
            distributions=failed.distributions,
            user_attrs=user_attrs,
            system_attrs=system_attrs,
        )
    )
    return True


def fail_trial(study: optuna.Study, number: int, reason: str) -> FrozenTrial | None:
    """Record trial `number` as FAIL with its reason; None if another worker finished it."""
    try:
        set_trial_attr(study, number, FAIL_REASON, reason[:_MAX_REASON], system=False)
        return tell(study, number, Outcome(TrialState.FAIL, reason=reason))
    except (UpdateFinishedTrialError, ValueError):
        return None


def tell(study: optuna.Study, number: int, outcome: Outcome) -> FrozenTrial:
    """study.tell, tolerating the grid sampler's study.stop() outside optimize(); a pruned
    trial is stored without a value (:func:`tell_pruned`)."""
    try:
        if outcome.state == TrialState.PRUNED:
            tell_pruned(study, number)
        else:
            study.tell(number, values=outcome.values, state=outcome.state)
    except RuntimeError as err:
        # The state is stored before the grid sampler's after_trial raises this.
        if "Study.stop" not in str(err) or isinstance(err, UpdateFinishedTrialError):
            raise
    return study.get_trials(deepcopy=False)[number]


def tell_pruned(study: optuna.Study, number: int) -> None:
    """Record trial ``number`` as PRUNED with no value.

    ``study.tell`` would store the trial's last intermediate value as its value (Optuna's own
    TODO there asks whether it should). Intermediate values are the pruner's signal, not the
    objective: ours are negated eval losses (about -4.4) beside ROUGE-L values (about 0.16),
    and optuna-dashboard, ``trials_dataframe()`` and the history plots would show them as
    objective values. So the sampler hears of the trial as ``tell`` would tell it (TPE ranks
    pruned trials by their intermediate values, never by a value), and the storage records
    the state alone.
    """
    frozen = study.get_trials(deepcopy=False)[number]
    if frozen.state != TrialState.RUNNING:
        raise ValueError(f"Cannot tell a {frozen.state.name} trial.")  # as study.tell says
    try:
        study.sampler.after_trial(study, frozen, TrialState.PRUNED, None)
    finally:
        # _trial_id: the storage's key of the trial (study.tell uses the same one).
        study._storage.set_trial_state_values(frozen._trial_id, TrialState.PRUNED, None)


def ending_line(trial: FrozenTrial, study: optuna.Study) -> str:
    """How a trial ended, in one line of the sweep's log, with the study's best so far:
    ``Trial 3 COMPLETE: 0.1673; best so far 0.1673 (trial 3)``, ``Trial 4 PRUNED at step
    83 (value there 4.21); ...``, ``Trial 5 FAIL: OutOfMemoryError: ...; ...``."""
    state = trial.state.name
    if state == "COMPLETE":
        what = f"COMPLETE: {_values(trial.values)}"
    elif state == "PRUNED" and trial.intermediate_values:
        step = max(trial.intermediate_values)
        what = f"PRUNED at step {step} (value there {trial.intermediate_values[step]:.4g})"
    elif state == "FAIL":
        what = f"FAIL: {trial.user_attrs.get(FAIL_REASON, 'unknown')}"
    else:
        what = state
    best = ""
    if len(study.directions) == 1:
        try:
            top = study.best_trial
            best = f"; best so far {_values(top.values)} (trial {top.number})"
        except ValueError:
            best = "; no complete trial yet"
    return f"Trial {trial.number} {what}{best}"


def _values(values: Sequence[float] | None) -> str:
    return ", ".join(f"{v:.4g}" for v in values or ())
