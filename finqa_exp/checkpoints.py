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


# What a checkpoint of a LoRA trial holds besides its state; the Trainer resumes without a
# missing optimizer, scheduler or RNG file and says so only at info level.
FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth")


def marker(ckpt: Path) -> dict[str, Any]:
    """What the marker says: global_step, epoch, and the trial and run that wrote it."""
    return json.loads((ckpt / MARKER).read_text())


def is_complete(ckpt: Path) -> bool:
    """Whether ``ckpt`` was written to its end: its marker is there, its files are, and
    its trainer state parses and names the step the folder is named for."""
    try:
        mark = marker(ckpt)
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not all((ckpt / name).is_file() for name in FILES):
        return False
    return mark.get("global_step") == state.get("global_step") == step_of(ckpt)


def remove(path: Path) -> None:
    """Remove a checkpoint (or a folder of them), markers first: one cut off half-way
    through its removal is never taken for complete."""
    for mark in [path / MARKER, *path.glob(f"{PREFIX}*/{MARKER}")]:
        mark.unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def newest_complete(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder``; every other one is removed (older
    ones are superseded, newer ones were cut off while being written)."""
    found = sorted(folder.glob(f"{PREFIX}[0-9]*"), key=step_of, reverse=True)
    keep = next((c for c in found if is_complete(c)), None)
    for ckpt in found:
        if ckpt != keep:
            log.warning("removing checkpoint %s (%s)", ckpt, "incomplete" if keep is None or
                        step_of(ckpt) > step_of(keep) else "superseded")  # fmt: skip
            remove(ckpt)
    return keep


def mark_complete(ckpt: Path, state: Any, writer: dict[str, Any]) -> None:
    """Flush the checkpoint's files to disk, write the marker (flushed too), then drop the
    older checkpoints beside it."""
    for path in ckpt.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    mark = {"global_step": state.global_step, "epoch": state.epoch, **writer}
    with open(ckpt / MARKER, "w") as f:
        json.dump(mark, f)
        f.flush()
        os.fsync(f.fileno())
    for old in ckpt.parent.glob(f"{PREFIX}[0-9]*"):
        if step_of(old) < step_of(ckpt):
            remove(old)


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
    """Saves a checkpoint after each eval (where the pruner was asked) and, when the
    process is told to stop (SIGTERM), at the next step that logs a loss or is checked,
    then stops the trial.

    A loss is logged at each check, and a stop saves where a loss is logged, so that
    every logged loss averages the same steps in a resumed trial as in one that ran
    through (the Trainer's loss window starts afresh at a resume).
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.stopping = False

    def _notice(self) -> bool:
        if not self.stopping and _stop_requested():
            self.stopping = True
            log.warning("SIGTERM: saving a checkpoint at the next logged step, then stopping")
        return self.stopping

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_evaluate:
            control.should_log = True
        # At an epoch's last step the epoch-end eval is still to come (on_epoch_end asks
        # for it): a stop saves after it, or its resume would never run that check.
        epoch = state.epoch or 0.0
        if self._notice() and abs(epoch - round(epoch)) > 1e-6 and control.should_log:
            control.should_save = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_evaluate:
            control.should_log = True
        if self._notice():
            control.should_save = True

    def on_evaluate(self, args, state, control, **kwargs):
        control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"{PREFIX}{state.global_step}"
        mark_complete(ckpt, state, {"trial": self.plan.trial_number, "run_id": self.plan.run_id})
        if self._notice():
            from finqa_exp.sweep.resume import TrialPreempted

            raise TrialPreempted(
                f"SIGTERM at step {state.global_step} (epoch {state.epoch:.2f}); "
                f"checkpoint {ckpt} saved"
            )


def _stop_requested() -> bool:
    from finqa_exp.sweep import resume

    return resume.requested()


@dataclass
class Plan:
    """Where a trial checkpoints, and what it resumes from."""

    folder: Path
    trial_number: int  # of the trial that writes the checkpoints
    resume_from: Path | None = None  # the newest complete checkpoint of the trial's chain
    run_id: str | None = None  # of the trial's MLflow run, once started (trial.py)

    def writer(self) -> dict[str, Any]:
        """The trial and run that wrote ``resume_from`` (from its marker)."""
        assert self.resume_from is not None
        return marker(self.resume_from)


def plan(conf: FinqaConfig, trial: Any | None) -> Plan | None:
    """The checkpoint plan of a trial that the sweep retries if it is killed (one in a
    study with persistent storage, not a confirmation); None otherwise, or with
    ``train.checkpoints=false``."""
    if trial is None or not conf.train.checkpoints:
        return None
    from finqa_exp.sweep.resume import record_checkpoint, retry_chain

    chain = retry_chain(trial)
    if not chain.retried:
        return None  # nothing would resume it: an in-memory study, a confirmation
    folder = Path(conf.paths.checkpoints_dir) / trial.study.study_name / f"trial-{chain.root}"
    record_checkpoint(trial, folder)
    p = Plan(folder, trial.number)
    newest = newest_complete(folder) if chain.attempts and folder.exists() else None
    if newest is not None and marker(newest).get("trial") in chain.attempts:
        p.resume_from = newest
    elif folder.exists():
        # Not written by an earlier attempt of this trial: a deleted study's leftover.
        log.warning("removing %s: no earlier attempt of this trial wrote it", folder)
        remove(folder)
    return p


@contextlib.contextmanager
def owned(p: Plan | None) -> Iterator[None]:
    """Remove the trial's checkpoints when it ends for good; keep them when it is stopped
    from outside (SIGTERM, Ctrl-C: its retry resumes from them)."""
    try:
        yield
    except Exception:  # failed or pruned: a retry, if any, starts afresh
        if p is not None:
            remove(p.folder)
        raise
    if p is not None:
        remove(p.folder)
