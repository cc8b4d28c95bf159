"""A sweep's trial job, seen from inside: its Optuna trial, its heartbeat, its memory.

The `finqa_optuna` sweeper (finqa_exp/sweep/sweeper.py) launches each trial as a Hydra job
wrapped in :class:`TrialJob`; the objective (finqa_exp/trial.py, or any Hydra app run with
``hydra/sweeper=finqa_optuna``) gets its trial from :func:`current_trial` to report
intermediate values and ask whether to prune. While jobs run, :class:`Heartbeat` keeps
their trials' heartbeat fresh, so that another worker can tell a killed sweep's trials.
"""

from __future__ import annotations

import contextvars
import gc
import logging
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import optuna
from hydra.types import TaskFunction
from omegaconf import DictConfig
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage

from finqa_exp.sweep.resume import sigterm_preempts
from finqa_exp.sweep.study_book import HEARTBEAT_ATTR, WORKER_ATTR, set_trial_attr, trial_id

log = logging.getLogger(__name__)

# A job's trial number is its Hydra job number: the sweeper launches each run of consecutive
# trials with initial_job_idx = its first trial's number. This variable overrides it for a
# TrialJob called outside Hydra's launchers (as tests do).
TRIAL_ENV = "FINQA_OPTUNA_TRIAL"

_current_trial: contextvars.ContextVar[optuna.Trial | None] = contextvars.ContextVar(
    "finqa_optuna_trial", default=None
)


def current_trial() -> optuna.Trial | None:
    """The Optuna trial of the job this code runs in, or None outside a finqa_optuna sweep.

    The trial is bound to the study's storage: `report`, `should_prune`, `set_user_attr`,
    `number` and `study.study_name` work in-process and in a joblib worker alike.
    """
    return _current_trial.get()


def release_memory(failed: bool = False) -> None:
    """Free the memory a finished job left behind before the next one runs here.

    After a completed job, only on a GPU: a full collection walks every object of torch
    and transformers (0.4 s a trial on the tiny model's CPU runs, 5 % of its time), and
    on a CPU Python's own collector returns the job's garbage soon enough. After a failed
    or pruned job, always: its model and optimizer may sit in reference cycles (Trainer <->
    callbacks), and a job that failed for lack of memory must not leave the next one short.
    """
    torch = sys.modules.get("torch")  # only if the job imported it: never import it here
    # is_initialized first: is_available would start CUDA in a process that never used it.
    on_gpu = torch is not None and torch.cuda.is_initialized()
    if failed or on_gpu:
        gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()


def drop_frames(err: BaseException) -> None:
    """Clear the locals of the frames in ``err``'s traceback (and its causes').

    A failed job's traceback keeps every frame it passed through alive, and with them the
    trial's model, optimizer and CUDA tensors, for as long as the exception is kept: Hydra
    stores it in the job's JobReturn and the sweep logs it after the job. The frames still
    running (this one and its callers) are left alone.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        stack += [current.__cause__, current.__context__]
        stack += list(getattr(current, "exceptions", ()))  # an ExceptionGroup's members


@dataclass(frozen=True)
class TrialJob:
    """The task function as the launcher sees it: binds the job to its trial, then runs it.

    It travels to joblib workers by pickle, so it holds the storage itself (RDB and journal
    storages reconnect on unpickling); the job's trial number is its Hydra job number.
    """

    task_function: TaskFunction
    storage: BaseStorage
    study_name: str
    sampler: optuna.samplers.BaseSampler
    pruner: optuna.pruners.BasePruner

    def __call__(self, cfg: DictConfig) -> Any:
        study = optuna.load_study(
            study_name=self.study_name,
            storage=self.storage,
            sampler=self.sampler,
            pruner=self.pruner,
        )
        number = job_trial_number()
        # Where it runs (a joblib worker, a Slurm node, a Ray worker): for whoever debugs a
        # lost node, and for the tests that check jobs ran outside the sweep's process.
        where = f"{socket.gethostname()}:{os.getpid()}"
        set_trial_attr(study, number, WORKER_ATTR, where, system=True)
        token = _current_trial.set(_bind_trial(study, number))
        failed = False
        try:
            with sigterm_preempts():  # SIGTERM: the job stops, its trial is retried
                return self.task_function(cfg)
        except BaseException as err:
            failed = True
            drop_frames(err)
            raise
        finally:
            _current_trial.reset(token)
            release_memory(failed)


def job_trial_number() -> int:
    """The Optuna trial number of the job running here (its Hydra job number)."""
    if TRIAL_ENV in os.environ:
        return int(os.environ[TRIAL_ENV])
    from hydra.core.hydra_config import HydraConfig

    return int(HydraConfig.get().job.num)


def _bind_trial(study: optuna.Study, number: int) -> optuna.Trial:
    return optuna.Trial(study, trial_id(study, number))


class Heartbeat:
    """Refreshes HEARTBEAT_ATTR of this worker's running trials every `interval` seconds."""

    def __init__(self, study: optuna.Study, interval: float) -> None:
        self._study = study
        self._interval = interval
        self._numbers: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="finqa-optuna-heartbeat", daemon=True
        )

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def add(self, number: int) -> None:
        with self._lock:
            self._numbers.add(number)
        self._beat(number)

    def discard(self, number: int) -> None:
        with self._lock:
            self._numbers.discard(number)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                numbers = sorted(self._numbers)
            for number in numbers:
                self._beat(number)

    def _beat(self, number: int) -> None:
        try:
            set_trial_attr(self._study, number, HEARTBEAT_ATTR, time.time(), system=True)
        except UpdateFinishedTrialError:
            self.discard(number)  # told meanwhile, or failed as stale by another worker
        except Exception:
            log.warning("heartbeat of trial %d failed", number, exc_info=True)
