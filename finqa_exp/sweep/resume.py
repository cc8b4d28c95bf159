"""What a trial job needs to survive its process: SIGTERM as preemption, its retry chain,
and where its checkpoints are.

A killed trial (``kill -9``, a lost node) is failed once its heartbeat is stale, and a
preempted one (SIGTERM: Slurm preemption, a spot instance reclaimed) fails itself; both are
queued again with the same params as a new Optuna trial. A job that saves checkpoints
(finqa_exp/checkpoints.py does, at its eval checks) finds the trial it continues with
:func:`retry_chain` and resumes where that one stopped::

    with sigterm_preempts():          # TrialJob does this around each job
        with deferred():              # code that saves and stops by itself when asked
            ...  if requested(): save(); raise TrialPreempted("...")

SIGTERM outside :func:`deferred` raises :class:`TrialPreempted` at once, as Ctrl-C raises
KeyboardInterrupt. The sweeper retries a preempted trial, as it retries a lost job, without
counting it against ``max_failure_rate``. A job records its checkpoint folder in the trial
(:data:`CHECKPOINT_ATTR`), so that the sweeper removes it when the chain ends for good.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import InMemoryStorage
from optuna.trial import FrozenTrial

from finqa_exp.sweep.study_book import trial_id

log = logging.getLogger(__name__)

CHECKPOINT_ATTR = "finqa_optuna:checkpoint"  # system attr: the trial's checkpoint folder
PREEMPTED_EXIT = 128 + 15  # a sweep stopped by SIGTERM exits as a process killed by it


class TrialPreempted(BaseException):
    """The job's process was told to stop (SIGTERM); its trial is retried, not failed.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way
    (a library's retry loop, Hydra's job runner) turns a preemption into a failure."""


_requested = threading.Event()
_state = {"deferred": 0, "installed": 0}
_saved: list[tuple[Any, int]] = []  # (previous handler, deferred depth) per install


def requested() -> bool:
    """Whether this process got SIGTERM (see :func:`deferred`)."""
    return _requested.is_set()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within this block SIGTERM only sets :func:`requested`: the code here saves its
    progress and raises :class:`TrialPreempted` itself (a training loop, at its next
    step). Leaving the block normally after a SIGTERM raises it here (the code returned
    before it could stop itself). Outside the main thread, which takes no signals, it
    does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1
    if _requested.is_set():
        raise TrialPreempted("SIGTERM: the process was told to stop (preempted)")


def _on_sigterm(signum: int, frame: Any) -> None:
    _requested.set()
    if not _state["deferred"]:
        raise TrialPreempted("SIGTERM: the process was told to stop (preempted)")


@contextlib.contextmanager
def sigterm_preempts() -> Iterator[None]:
    """SIGTERM raises :class:`TrialPreempted` (or asks :func:`deferred` code to stop)
    while this block runs; the previous handler comes back after it. A job's block
    (TrialJob) starts undeferred inside a sweep's deferred one, so that a job stops at
    once outside its training. Only the main thread can take signals: elsewhere (a Ray
    worker's thread) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _state["installed"] == 0:
        _requested.clear()
    _saved.append((signal.signal(signal.SIGTERM, _on_sigterm), _state["deferred"]))
    _state["installed"] += 1
    _state["deferred"] = 0
    try:
        yield
    finally:
        _state["installed"] -= 1
        previous, _state["deferred"] = _saved.pop()
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class RetryChain:
    """A trial and the attempts before it (each retry is a new Optuna trial)."""

    root: int  # the first attempt's number: what the chain's checkpoints are named by
    attempts: tuple[int, ...]  # the numbers of the attempts before this one, oldest first
    # A killed attempt is retried with the same params: the study outlives this process
    # (not in memory) and is not a confirmation study (a killed confirmation runs again
    # as a new pair, from step 0).
    retried: bool


def retry_chain(trial: optuna.Trial) -> RetryChain:
    """The retry chain of ``trial`` (Optuna's ``failed_trial``/``retry_history`` attrs)."""
    from finqa_exp.sweep.confirm import CONFIRMED_STUDY_ATTR

    storage = trial.study._storage  # the Trial API has no public read of system attrs
    attrs = storage.get_trial(trial._trial_id).system_attrs
    history = tuple(attrs.get("retry_history") or ())
    retried = not isinstance(storage, InMemoryStorage)
    retried = retried and CONFIRMED_STUDY_ATTR not in trial.study.user_attrs
    return RetryChain(attrs.get("failed_trial", trial.number), history, retried)


def attempt(study: optuna.Study, number: int) -> FrozenTrial:
    """Trial ``number`` of ``study``, read alone (not the whole study)."""
    return study._storage.get_trial(trial_id(study, number))


def record_checkpoint(trial: optuna.Trial, folder: Path) -> None:
    """Name ``folder`` as ``trial``'s checkpoints, for :func:`discard_checkpoint`."""
    trial.study._storage.set_trial_system_attr(trial._trial_id, CHECKPOINT_ATTR, str(folder))


def discard_checkpoint(trial: FrozenTrial) -> None:
    """Remove the checkpoints of a trial whose chain ended for good (it will not be retried;
    its job could not clean up after itself: killed, or its node lost)."""
    folder = trial.system_attrs.get(CHECKPOINT_ATTR)
    if folder and Path(folder).exists():
        shutil.rmtree(folder, ignore_errors=True)
        log.info("Trial %d: removed its checkpoints %s", trial.number, folder)
