"""Probes for real runs: a TrainerCallback given as ``train.callbacks`` that records, as
one JSON line per trial, what the trial's process saw of its GPUs::

    python -m finqa_exp -m hydra/launcher=per_gpu \
        '+train.callbacks.probe={_target_: tests.probes.RecordDevice, record: /abs/devices.jsonl}'

(the repo root must be on PYTHONPATH so that ``tests.probes`` imports.) Used by
tests/test_gpu.py.
"""

from __future__ import annotations

import json
import os

import torch
from transformers import TrainerCallback


class RecordDevice(TrainerCallback):
    def __init__(self, record: str) -> None:
        self.record = record

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from finqa_exp.sweep import current_trial

        trial = current_trial()
        line = {
            "trial": trial.number if trial is not None else None,
            "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device_count": torch.cuda.device_count(),
            "model_device": str(next(model.parameters()).device),
            "n_gpu": args.n_gpu,
            "train_batch_size": args.train_batch_size,
            "per_device_batch": args.per_device_train_batch_size,
        }
        with open(self.record, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")
