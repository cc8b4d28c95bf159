"""One GPU per trial process, native bf16, and the Trainer's batch: on CPU, with the GPUs
and compute capabilities faked (tests/test_gpu.py runs the real thing on CUDA)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from finqa_exp import devices, modeling, training
from finqa_exp.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def test_visible_gpus_come_from_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv(devices.DEVICE_ENV, "auto")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3,GPU-8e1f")
    assert devices.visible_gpus() == ["2", "3", "GPU-8e1f"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,2")
    assert devices.visible_gpus() == ["0"]  # CUDA stops at the first invalid entry
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert devices.visible_gpus() == []  # an empty value hides every GPU
    monkeypatch.setenv(devices.DEVICE_ENV, "cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert devices.visible_gpus() == [] and devices.device() == torch.device("cpu")
    monkeypatch.setenv(devices.DEVICE_ENV, "tpu")
    with pytest.raises(devices.DeviceError, match="must be auto, cpu or cuda, got 'tpu'"):
        devices.device()


def _line(stream, timeout: float = 60.0) -> str:
    """The next line of a child's output; fails instead of hanging if none comes."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no line within {timeout:.0f} s"
    return stream.readline()


def _holder(env: dict[str, str]) -> subprocess.Popen:
    """A process that pins one GPU, prints it, and holds it until its stdin closes."""
    code = (
        "import sys; from finqa_exp import devices; "
        "print(devices.pin_one_gpu(), flush=True); sys.stdin.read()"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_parallel_trial_processes_take_one_gpu_each_and_wait_when_all_are_taken(tmp_path):
    env = {
        **os.environ,
        devices.DEVICE_ENV: "auto",
        "CUDA_VISIBLE_DEVICES": "0,1,2",
        devices.LOCK_DIR_ENV: str(tmp_path),
    }
    holders = []
    try:
        for _ in range(3):
            holders.append(_holder(env))
            _line(holders[-1].stdout)  # wait until it holds its GPU
        taken = list(holders)
        late = _holder(env)
        holders.append(late)
        # The fourth finds every GPU held: it says so, then waits for one.
        assert "all 3 GPUs are held" in _line(late.stderr)
        for holder in taken:
            holder.stdin.close()
        assert _line(late.stdout).strip() in {"0", "1", "2"}
        late.stdin.close()
        outs = [h.wait(timeout=60) for h in holders]
        assert outs == [0, 0, 0, 0]
    finally:
        for h in holders:
            h.kill()


def test_each_process_pins_a_different_gpu_and_keeps_it(tmp_path):
    env = {
        **os.environ,
        devices.DEVICE_ENV: "auto",
        "CUDA_VISIBLE_DEVICES": "4,5",
        devices.LOCK_DIR_ENV: str(tmp_path),
    }
    code = (
        "import os; from finqa_exp import devices; a = devices.pin_one_gpu(); "
        "b = devices.pin_one_gpu(); print(a, b, os.environ['CUDA_VISIBLE_DEVICES'])"
    )
    first = _holder(env)
    try:
        assert _line(first.stdout).strip() == "4"
        second = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True
        )
        assert second.stdout.split() == ["5", "5", "5"], second.stderr
    finally:
        first.stdin.close()
        first.wait(timeout=60)


def _fake_gpu(monkeypatch, major: int, minor: int) -> torch.device:
    """A CUDA device of compute capability major.minor on which bf16 tensors can be made
    (as on a T4 or V100, where bf16 is emulated)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    props = types.SimpleNamespace(major=major, minor=minor, name="fake")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    monkeypatch.setattr(torch.version, "hip", None)
    return torch.device("cuda")


@pytest.mark.parametrize(
    ("capability", "dtype", "flags"),
    [
        ((7, 5), torch.float16, {"bf16": False, "fp16": True}),  # T4: bf16 only emulated
        ((7, 0), torch.float16, {"bf16": False, "fp16": True}),  # V100
        ((8, 0), torch.bfloat16, {"bf16": True, "fp16": False}),  # A100
        ((9, 0), torch.bfloat16, {"bf16": True, "fp16": False}),  # H100/H200
    ],
)
def test_only_native_bf16_counts(monkeypatch, capability, dtype, flags):
    dev = _fake_gpu(monkeypatch, *capability)
    # What torch says when emulation counts: yes, everywhere.
    assert torch.cuda.is_bf16_supported()
    assert devices.native_bf16(dev) == (capability[0] >= 8)
    assert modeling.resolve_dtype("auto", dev) == dtype
    assert devices.mixed_precision(TrainConfig(), dev) == flags


def test_trainer_batch_must_be_the_configured_batch(tmp_path):
    cfg = TrainConfig(batch_size=8)
    args = training.training_arguments(cfg, tmp_path, torch.device("cpu"), has_eval=False)
    assert devices.check_batch_size(args, 8) == 8
    # What the Trainer does in one process that sees 8 GPUs: 8 x 8 per step on cuda:0.
    assert args.n_gpu == 0
    args._n_gpu = 8
    assert args.train_batch_size == 64
    with pytest.raises(devices.BatchSizeError, match=r"batches of 64, not train\.batch_size=8"):
        devices.check_batch_size(args, 8)


def test_per_gpu_launcher_runs_a_trial_on_each_gpu_at_a_time(monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from finqa_exp.config import register_configs
    from tests.conftest import CONF

    monkeypatch.setenv(devices.DEVICE_ENV, "auto")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", ["hydra/launcher=per_gpu"], return_hydra_config=True)
    assert cfg.hydra.launcher.n_jobs == 3
    assert cfg.hydra.sweeper.n_jobs == 3  # the sweeper launches as many at a time
    assert "JoblibLauncher" in cfg.hydra.launcher._target_
    monkeypatch.setenv(devices.DEVICE_ENV, "cpu")
    assert cfg.hydra.launcher.n_jobs == 1  # no GPU: one at a time
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", ["hydra/launcher=joblib"], return_hydra_config=True)
    # joblib's n_jobs=-1 is one job per CPU: the sweeper launches as many trials at a time.
    assert cfg.hydra.launcher.n_jobs == -1
    assert cfg.hydra.sweeper.n_jobs == os.cpu_count()
