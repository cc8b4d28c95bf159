"""Fault injectors for real sweeps: transformers TrainerCallbacks given as ``train.callbacks``.

Each fires in one trial of a sweep (``trial``: its Optuna number, from
``finqa_exp.sweep.current_trial()``; None fires in any trial or single run) and, when
``record`` names a file, appends one JSON line saying what it injected, so a test in
another process can count the faults that really fired::

    python -m finqa_exp -m \
        '+train.callbacks.fault={_target_: tests.faults.RaiseAt, step: 3, trial: 1}'

(the repo root must be on PYTHONPATH so that ``tests.faults`` imports.) Used by
tests/sweep/test_faults.py.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback


class _Fault(TrainerCallback):
    """Base: decides whether this trial is the one to break, and records what was done."""

    kind = "fault"

    def __init__(self, trial: int | None = None, record: str | None = None) -> None:
        self.trial = trial
        self.record = record

    def armed(self) -> bool:
        from finqa_exp.sweep import current_trial

        if self.trial is None:
            return True
        running = current_trial()
        return running is not None and running.number == self.trial

    def note(self, **details: Any) -> None:
        if self.record:
            with open(self.record, "a", encoding="utf-8") as out:
                out.write(json.dumps({"fault": self.kind, "trial": self.trial, **details}) + "\n")


class RaiseAt(_Fault):
    """Raises torch.OutOfMemoryError (what CUDA raises) at the end of optimizer step ``step``."""

    kind = "oom"

    def __init__(self, step: int, trial: int | None = None, record: str | None = None) -> None:
        super().__init__(trial, record)
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and self.armed():
            self.note(step=self.step)
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (injected at step {self.step})"
            )


class NanAt(_Fault):
    """Fills one LoRA weight with NaN at the end of step ``step``: every later loss is NaN.

    Nothing is raised here; the trial's own NaN guard (training.MetricsCallback) must see
    the NaN at the next logging step (``train.logging_steps``) and fail the trial.
    """

    kind = "nan"

    def __init__(self, step: int, trial: int | None = None, record: str | None = None) -> None:
        super().__init__(trial, record)
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != self.step or not self.armed():
            return
        name, weight = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)
        with torch.no_grad():
            weight.fill_(math.nan)
        self.note(step=self.step, weight=name)


class FullDiskAdapter(_Fault):
    """Makes the adapter write fail half-way with a real ENOSPC from the kernel.

    When training ends, ``adapter/adapter_config.json`` is created as a symlink to /dev/full
    (a device on which every write fails with "No space left on device"). peft writes the
    weights first, atomically (a temp file renamed into place, so a symlink on the weights
    file would just be replaced), then the config through the symlink: the trial is left
    with a half-written adapter folder, weights without config. The trial saves to
    ``<job dir>/adapter`` (the Trainer's own output_dir holds checkpoints, elsewhere in a
    sweep). A chmod-based fault would not work: CI runs as root.
    """

    kind = "enospc"

    def on_train_end(self, args, state, control, **kwargs):
        from hydra.core.hydra_config import HydraConfig

        if not self.armed():
            return
        adapter = Path(HydraConfig.get().runtime.output_dir) / "adapter"
        adapter.mkdir(parents=True, exist_ok=True)
        target = adapter / "adapter_config.json"
        os.symlink("/dev/full", target)
        self.note(path=str(target))


# Weak references to the model, optimizer and LoRA weights of the trial WatchAndRaiseAt
# broke: a test checks that none of them outlives the failed trial.
WATCHED: list[Any] = []


class WatchAndRaiseAt(RaiseAt):
    """RaiseAt that first takes weak references (in WATCHED) to what the failing trial
    holds: its peft model, its optimizer and every LoRA weight."""

    kind = "oom-watched"

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == self.step and self.armed():
            lora = [p for n, p in model.named_parameters() if "lora_" in n]
            WATCHED[:] = [weakref.ref(x) for x in (model, optimizer, *lora)]
        super().on_step_end(args, state, control, **kwargs)


class SignalAt(_Fault):
    """Sends this process ``signal`` (SIGTERM: preemption; SIGKILL: ``kill -9``) at the end
    of optimizer step ``step``, as Slurm or a user would from outside, at a known point."""

    kind = "signal"

    def __init__(
        self, step: int, signal: str = "SIGTERM", trial: int | None = None,
        record: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(trial, record)
        self.step = step
        self.signal = signal

    def on_step_end(self, args, state, control, **kwargs):
        import signal as signals
        import time

        if state.global_step == self.step and self.armed():
            self.note(step=self.step, signal=self.signal, epoch=state.epoch, at=time.time())
            os.kill(os.getpid(), getattr(signals, self.signal))
