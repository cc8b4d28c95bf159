"""Checkpoints at a sweep trial's eval checks, so that a killed or preempted trial resumes.

In a sweep whose study outlives its processes (SQLite, PostgreSQL, journal storage), a
trial saves the Trainer's own checkpoint (adapter, optimizer, scheduler, RNG states and
the trainer state, which holds the data position) right after each eval check, keeps only
the newest, and removes it when the trial ends for good (complete, pruned, or failed for a
reason a retry would not change). A retry of the trial (a new Optuna trial with the same
params, see finqa_exp/sweep/resume.py) finds the folder by its chain's first trial and
resumes from the newest complete checkpoint::

    <paths.checkpoints_dir>/<study>/trial-<first trial of the chain>/checkpoint-<step>/

A checkpoint counts once its marker file is written, after everything else: one cut off
half-way (``kill -9`` while saving) is ignored and removed, and the one before it is used.
``train.checkpoints=false`` turns this off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from finqa_exp.config import FinqaConfig

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"
MARKER = "finqa_complete.json"  # written last: the checkpoint is whole
STATE_FILE = "trainer_state.json"


def step_of(path: Path) -> int:
    return int(path.name.removeprefix(PREFIX))


def is_complete(ckpt: Path) -> bool:
    """Whether ``ckpt`` was written to its end: its marker is there, and its trainer
    state parses and names the step the folder is named for."""
    try:
        marker = json.loads((ckpt / MARKER).read_text())
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("global_step") == state.get("global_step") == step_of(ckpt)


def newest_complete(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder``; every other one is removed (older
    ones are superseded, newer ones were cut off while being written)."""
    found = sorted(folder.glob(f"{PREFIX}[0-9]*"), key=step_of, reverse=True)
    keep = next((c for c in found if is_complete(c)), None)
    for ckpt in found:
        if ckpt != keep:
            log.warning("removing checkpoint %s (%s)", ckpt, "incomplete" if keep is None or
                        step_of(ckpt) > step_of(keep) else "superseded")  # fmt: skip
            shutil.rmtree(ckpt, ignore_errors=True)
    return keep


def mark_complete(ckpt: Path, state: Any) -> None:
    """Write the marker (flushed to disk), then drop the older checkpoints beside it."""
    marker = {"global_step": state.global_step, "epoch": state.epoch}
    with open(ckpt / MARKER, "w") as f:
        json.dump(marker, f)
        f.flush()
        os.fsync(f.fileno())
    for old in ckpt.parent.glob(f"{PREFIX}[0-9]*"):
        if step_of(old) < step_of(ckpt):
            shutil.rmtree(old, ignore_errors=True)


def saved_state(ckpt: Path) -> dict[str, Any]:
    """The trainer state a checkpoint holds (global_step, epoch, log_history, ...)."""
    return json.loads((ckpt / STATE_FILE).read_text())


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' LengthGroupedSampler, with each epoch's order drawn from its own seed
    (``seed + epoch``) instead of the global RNG.

    The Trainer restores the RNG states of a checkpoint only after it has started the
    resumed epoch's iterator, so the stock sampler would replay another order for a
    resume inside an epoch and skip the wrong batches. accelerate seeds the random
    sampler (``data_seed``) the same way.
    """

    def __init__(self, *args: Any, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + epoch)


class Checkpointing(TrainerCallback):
    """Saves a checkpoint after each eval (where the pruner was asked), and at once when
    the process is told to stop (SIGTERM), then stops the trial.

    A loss is logged at each check too, so that every logged loss averages the same steps
    in a resumed trial as in one that ran through (a log after a resume starts counting
    at the checkpoint).
    """

    def __init__(self) -> None:
        self.stopping = False

    def _align(self, control: Any, save_now: bool = True) -> None:
        if control.should_evaluate:
            control.should_log = True
        if self.stopping or _stop_requested():
            self.stopping = True
            control.should_save = control.should_save or save_now

    def on_step_end(self, args, state, control, **kwargs):
        # At an epoch's last step the epoch-end eval is still to come (on_epoch_end asks
        # for it): a stop saves after it, or its resume would never run that check.
        epoch = state.epoch or 0.0
        self._align(control, save_now=abs(epoch - round(epoch)) > 1e-6)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._align(control)

    def on_evaluate(self, args, state, control, **kwargs):
        control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"{PREFIX}{state.global_step}"
        mark_complete(ckpt, state)
        if self.stopping:
            from finqa_exp.sweep.resume import TrialPreempted

            raise TrialPreempted(
                f"SIGTERM at step {state.global_step} (epoch {state.epoch:.2f}); "
                f"checkpoint {ckpt} saved"
            )


def _stop_requested() -> bool:
    from finqa_exp.sweep import resume

    return resume.requested()


@dataclass(frozen=True)
class Plan:
    """Where a trial checkpoints, and what it resumes from."""

    folder: Path
    resume_from: Path | None  # the newest complete checkpoint of the trial's chain
    previous: Any | None  # the attempt it continues (optuna FrozenTrial), if resuming


def plan(conf: FinqaConfig, trial: Any | None) -> Plan | None:
    """The checkpoint plan of a trial in a sweep with persistent storage (None otherwise,
    or with ``train.checkpoints=false``)."""
    if trial is None or not conf.train.checkpoints:
        return None
    from finqa_exp.sweep.resume import record_checkpoint, retry_chain

    chain = retry_chain(trial)
    if not chain.persistent:
        return None  # an in-memory study dies with its process: nothing could resume
    folder = Path(conf.paths.checkpoints_dir) / trial.study.study_name / f"trial-{chain.root}"
    record_checkpoint(trial, folder)
    if chain.previous is None:
        # A first attempt resumes nothing: a folder there is a deleted study's leftover.
        shutil.rmtree(folder, ignore_errors=True)
        return Plan(folder, None, None)
    resume_from = newest_complete(folder) if folder.exists() else None
    return Plan(folder, resume_from, chain.previous if resume_from else None)


@contextlib.contextmanager
def owned(p: Plan | None) -> Iterator[None]:
    """Remove the trial's checkpoints when it ends for good; keep them when it is stopped
    from outside (SIGTERM, Ctrl-C: its retry resumes from them)."""
    try:
        yield
    except Exception:  # failed or pruned: a retry, if any, starts afresh
        if p is not None:
            shutil.rmtree(p.folder, ignore_errors=True)
        raise
    if p is not None:
        shutil.rmtree(p.folder, ignore_errors=True)
