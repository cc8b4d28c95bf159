"""Devices: which device a process trains on, one GPU per trial process, native bf16.

A trial process sees exactly one GPU. transformers' Trainer, run in one process on a
machine with several GPUs, multiplies the per-device batch by the GPU count (it skips
DataParallel for 4-bit models but not the multiplication), so ``train.batch_size=8``
would train on batches of 64 on ``cuda:0``. :func:`device` therefore pins the process to
one GPU before CUDA starts: it sets ``CUDA_VISIBLE_DEVICES`` to a GPU that no other
trial process on this machine holds (a lock file per GPU, held for the life of the
process). Parallel trials (``hydra/launcher=per_gpu``: one joblib worker per GPU, or
several sweep commands on one machine) so spread over the GPUs, one trial on each.

    FINQA_DEVICE=cpu python -m finqa_exp       # stay on the CPU on a GPU machine
    CUDA_VISIBLE_DEVICES=2 python -m finqa_exp # choose the GPU yourself

Only the standard library at import: the sweep's parent process counts GPUs through
this module without importing torch until it must.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finqa_exp.errors import BadInput

if TYPE_CHECKING:
    import torch
    from transformers import TrainingArguments

    from finqa_exp.config import TrainConfig

log = logging.getLogger(__name__)

DEVICE_ENV = "FINQA_DEVICE"  # auto (default) | cpu | cuda
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
LOCK_DIR_ENV = "FINQA_GPU_LOCK_DIR"  # where the per-GPU lock files live (tests move it)
# One folder for every process and user of the machine (not $TMPDIR, which may differ).
DEFAULT_LOCK_DIR = "/tmp/finqa-exp-gpus"
WAIT_POLL_S = 1.0  # how often a process that found every GPU taken tries them all again

# This process's GPU: (CUDA_VISIBLE_DEVICES entry, open lock file). The lock is released
# by the operating system when the process ends, however it ends.
_claim: tuple[str, Any] | None = None


class DeviceError(BadInput, RuntimeError):
    """The process cannot be given the device it asks for."""


def device_choice() -> str:
    choice = os.environ.get(DEVICE_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"{DEVICE_ENV} must be auto, cpu or cuda, got {choice!r}")
    return choice


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (indices or UUIDs).

    Read from ``CUDA_VISIBLE_DEVICES`` when it is set; otherwise counted by torch, which
    asks NVML first and so does not start CUDA (starting it would fix the visible set).
    """
    if device_choice() == "cpu":
        return []
    listed = os.environ.get(VISIBLE_ENV)
    if listed is not None:
        # CUDA stops at the first entry it cannot use (a negative index); an empty value
        # hides every GPU.
        entries = [e.strip() for e in listed.split(",") if e.strip()]
        return list(takewhile(lambda e: not e.startswith("-"), entries))
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_count() -> int:
    """Number of GPUs the trials of this machine can spread over (0 on a CPU machine)."""
    return len(visible_gpus())


def _lock_dir() -> Path:
    folder = Path(os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR)
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # every user's trial processes share it
            folder.chmod(0o1777)
    return folder


def _try_lock(entry: str) -> Any | None:
    """An open file holding an exclusive lock for GPU ``entry``; None if another process has
    it. The lock lasts as long as the file stays open (the process's life)."""
    import fcntl  # POSIX: the GPU machines this runs on

    path = _lock_dir() / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', entry)}.lock"
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def pin_one_gpu() -> str | None:
    """Make this process see exactly one GPU; returns its ``CUDA_VISIBLE_DEVICES`` entry.

    None when there is no GPU (or ``FINQA_DEVICE=cpu``). With several visible GPUs, takes
    the first that no other process on this machine holds; when all are held (more
    parallel trials than GPUs), waits for one. Must run before CUDA starts in this
    process: torch reads ``CUDA_VISIBLE_DEVICES`` once, when CUDA starts.
    """
    global _claim
    if _claim is not None:
        return _claim[0]
    gpus = visible_gpus()
    if not gpus:
        return None
    if len(gpus) == 1:
        # Nothing to choose; the lock still tells a per_gpu worker that this GPU is taken.
        handle = _try_lock(gpus[0])
        if handle is None:
            log.warning("GPU %s is also used by another trial process", gpus[0])
        _claim = (gpus[0], handle)
        return gpus[0]
    torch = _torch_if_imported()
    if torch is not None and torch.cuda.is_initialized():
        raise DeviceError(
            f"CUDA started in this process before a GPU was chosen, and it sees {len(gpus)} "
            f"GPUs; set {VISIBLE_ENV} to one GPU"
        )
    waiting = False
    while True:  # the first GPU that no other trial process holds, when one frees up
        for entry in gpus:
            handle = _try_lock(entry)
            if handle is not None:
                break
        if handle is not None:
            break
        if not waiting:
            log.warning(
                "all %d GPUs are held by other trial processes on this machine; waiting for "
                "one (run at most as many trials at a time as there are GPUs)",
                len(gpus),
            )
            waiting = True
        time.sleep(WAIT_POLL_S)
    os.environ[VISIBLE_ENV] = entry
    _claim = (entry, handle)
    log.info("this process trains on GPU %s (%s=%s)", entry, VISIBLE_ENV, entry)
    return entry


def _torch_if_imported() -> Any | None:
    import sys

    return sys.modules.get("torch")


def device() -> torch.device:
    """The device this process trains on: its one GPU (pinned at the first call), else CPU."""
    import torch

    choice = device_choice()
    if choice == "cpu":
        return torch.device("cpu")
    pinned = pin_one_gpu()
    if torch.cuda.is_available():
        if pinned is not None and torch.cuda.device_count() != 1:
            # CUDA started (is_available, an import) before the pin, and kept every GPU.
            raise DeviceError(
                f"this process sees {torch.cuda.device_count()} GPUs though it was given one "
                f"({VISIBLE_ENV}={pinned}): CUDA started before the GPU was chosen"
            )
        return torch.device("cuda")
    if choice == "cuda":
        raise DeviceError(f"{DEVICE_ENV}=cuda, but torch finds no CUDA device")
    return torch.device("cpu")


def describe_device(dev: torch.device) -> str:
    """``cuda:<name> (GPU <entry>)`` or ``cpu:<n> cores``: the run's ``device`` tag."""
    import torch

    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        entry = os.environ.get(VISIBLE_ENV)
        return f"cuda:{name} (GPU {entry})" if entry else f"cuda:{name}"
    return f"cpu:{os.cpu_count()} cores"


def native_bf16(dev: torch.device) -> bool:
    """Whether ``dev`` computes in bf16 natively (Ampere and later, compute capability 8+).

    ``torch.cuda.is_bf16_supported()`` also says yes on a T4 or V100, where bf16 is only
    emulated (and slow), so ask without emulation: those GPUs get fp16.
    """
    import torch

    if dev.type != "cuda":
        return False
    return torch.cuda.is_bf16_supported(including_emulation=False)


@dataclass(frozen=True)
class PeakMemory:
    """What a trial's peak memory measured (``kind``, the run's ``peak_memory_kind`` tag)
    and the metrics it is logged as."""

    kind: str
    metrics: dict[str, float]


def peak_memory(dev: torch.device) -> PeakMemory:
    """Peak memory of this process's device: on GPU, PyTorch's peak allocated and reserved
    memory since the last reset (a trial resets it once its base is ready; nvidia-smi
    shows reserved plus the CUDA context); on CPU, the process's peak RSS."""
    import resource

    import torch

    if dev.type == "cuda":
        return PeakMemory(
            "cuda_max_allocated",
            {
                "peak_memory_mb": torch.cuda.max_memory_allocated(dev) / 2**20,
                "peak_memory_reserved_mb": torch.cuda.max_memory_reserved(dev) / 2**20,
            },
        )
    # ru_maxrss is in KiB on Linux; it is the process's peak, so it includes loading.
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return PeakMemory("cpu_max_rss", {"peak_memory_mb": rss_mb})


def mixed_precision(train: TrainConfig, dev: torch.device) -> dict[str, bool]:
    """Trainer's bf16/fp16 flags: autocast only on GPU, bf16 where the GPU computes in it
    natively, fp16 on older GPUs (T4, V100)."""
    choice = train.mixed_precision
    if dev.type != "cuda" or choice == "no":
        return {"bf16": False, "fp16": False}
    if choice == "auto":
        choice = "bf16" if native_bf16(dev) else "fp16"
    return {"bf16": choice == "bf16", "fp16": choice == "fp16"}


class BatchSizeError(RuntimeError):
    """The Trainer would train on other batches than the config asks for."""


def check_batch_size(args: TrainingArguments, batch_size: int) -> int:
    """The batch the optimizer sees per step and device; must be ``train.batch_size``.

    In one process on a machine with several GPUs, the Trainer multiplies the per-device
    batch by the GPU count (``n_gpu``), even for 4-bit models, which it never wraps in
    DataParallel: batch 8 on an 8-GPU node would train on batches of 64 on one GPU and be
    recorded as 8. finqa_exp.devices pins each trial process to one GPU; this checks it.
    """
    seen = args.train_batch_size
    if seen != batch_size:
        raise BatchSizeError(
            f"the Trainer would train on batches of {seen}, not train.batch_size={batch_size}: "
            f"this process sees {args.n_gpu} GPUs; give each trial one GPU "
            f"(CUDA_VISIBLE_DEVICES, or hydra/launcher=per_gpu)"
        )
    return seen
