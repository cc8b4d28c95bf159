"""The CUDA path, on a real GPU: skipped where there is none.

    python -m pytest -m gpu tests/test_gpu.py        # bash .ci/gpu-proof runs it, and the bench

Each test asks for CUDA (``FINQA_DEVICE=cuda``) and runs on a TinyLlama-shaped Llama with
random weights (1.1B parameters, no download) in 4-bit NF4, or on the tiny model where
the shape does not matter. Set FINQA_TEST_CACHE to keep the random model between runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finqa_exp import devices, modeling, tiny, training
from finqa_exp.config import DataConfig, LoraConfig, ModelConfig, QuantConfig, TrainConfig
from finqa_exp.tracking import NullTracker
from tests.conftest import FAST, ORIGINAL_ENV, compose_cfg

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "### Question: {question}\n\n### Answer: "
# The environment and GPUs this session started with: the per-GPU sweep must see every
# GPU, though this process pinned one (tests/conftest.py) for its own tests.
START_ENV = ORIGINAL_ENV


def _all_gpus() -> int:
    listed = START_ENV.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return len([e for e in listed.split(",") if e.strip()])
    import subprocess as sp

    # This process may see only its pinned GPU now: count them all in a clean process.
    code = "import torch; print(torch.cuda.device_count())"
    env = {k: v for k, v in START_ENV.items() if k != "FINQA_DEVICE"}
    return int(sp.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout)


@pytest.fixture(autouse=True)
def _on_cuda(monkeypatch):
    monkeypatch.setenv(devices.DEVICE_ENV, "cuda")


@pytest.fixture(scope="session")
def gpu_cache(tmp_path_factory) -> Path:
    return Path(os.environ.get("FINQA_TEST_CACHE") or tmp_path_factory.mktemp("gpu-cache"))


@pytest.fixture(scope="session")
def tinyllama(gpu_cache) -> Path:
    """TinyLlama's shape with random weights and a BPE tokenizer from our data (the bench's
    model, in the same cache folder)."""
    from finqa_exp.bench.measure import TINYLLAMA_SHAPE, random_llama
    from finqa_exp.data import load_splits

    choice = os.environ[devices.DEVICE_ENV]
    os.environ[devices.DEVICE_ENV] = "cuda"
    try:
        devices.device()  # pin this process's GPU before CUDA starts
    finally:
        os.environ[devices.DEVICE_ENV] = choice
    texts = tiny.pretraining_texts(load_splits(DataConfig()).train)
    tokenizer = tiny.train_tokenizer(texts, TINYLLAMA_SHAPE["vocab_size"])
    return random_llama(tokenizer, gpu_cache / "bench" / "tinyllama_shape")


def trial_cfg(root: Path, cache: Path, source: Path, *overrides: str):
    root.mkdir(parents=True, exist_ok=True)
    return compose_cfg(
        [
            f"paths.root_dir={root}",
            f"paths.cache_dir={cache}",
            "tracking=none",
            f"model.name_or_path={source}",
            "model.name=tinyllama_shape",
            "train.max_steps=6",
            "train.batch_size=8",
            "train.learning_rate=2e-4",
            "train.eval_strategy=no",
            "objective.metric=rougeL",
            "eval.max_questions=8",
            "eval.max_new_tokens=16",
            *overrides,
        ],
        root / "run",
    )


def test_native_bf16_follows_the_compute_capability():
    dev = devices.device()
    assert dev.type == "cuda"
    native = torch.cuda.get_device_capability(dev)[0] >= 8
    assert devices.native_bf16(dev) == native
    assert modeling.resolve_dtype("auto", dev) == (torch.bfloat16 if native else torch.float16)
    flags = devices.mixed_precision(TrainConfig(), dev)
    assert flags == {"bf16": native, "fp16": not native}


def test_a_trial_in_4bit_on_cuda(tmp_path, gpu_cache, tinyllama):
    from finqa_exp.trial import execute

    result = execute(trial_cfg(tmp_path, gpu_cache, tinyllama))
    model, metrics = result.model, result.metrics
    assert torch.cuda.device_count() == 1  # this process sees its one GPU
    assert next(model.parameters()).device.type == "cuda"
    assert any(type(p).__name__ == "Params4bit" for p in model.parameters())
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    # The dtype policy: what is not 4-bit stays in the compute dtype it was loaded in.
    dtype = modeling.resolve_dtype("auto", devices.device())
    plain = {
        p.dtype
        for n, p in model.named_parameters()
        if type(p).__name__ != "Params4bit" and "lora_" not in n
    }
    assert plain == {dtype}
    assert metrics["train_batch_size"] == 8  # the batch the optimizer saw
    assert 0 < metrics["peak_memory_mb"] <= metrics["peak_memory_reserved_mb"]
    assert metrics["train_steps"] == 6 and metrics["final_train_loss"] > 0
    print(
        f"\n4-bit trial on {torch.cuda.get_device_name()}: peak {metrics['peak_memory_mb']:.0f} "
        f"MiB allocated, {metrics['peak_memory_reserved_mb']:.0f} MiB reserved; "
        f"{metrics['tokens_per_s']:.0f} tokens/s; rougeL {metrics['rougeL']:.4f}"
    )


def _train_steps(base, tokenizer, checkpointing: bool, tmp_path: Path) -> tuple[list, float]:
    from transformers import set_seed

    from finqa_exp.data import load_splits, tokenize

    data = tokenize(
        tokenizer, TEMPLATE, load_splits(DataConfig()).train[:64], 512, f"gpu-ckpt-{id(base)}"
    )
    set_seed(0)
    model = modeling.add_lora(base, LoraConfig(r=16), gradient_checkpointing=checkpointing)
    cfg = TrainConfig(
        batch_size=16, max_steps=4, logging_steps=1, eval_strategy="no", learning_rate=2e-4
    )
    dev = devices.device()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    result = training.train(model, tokenizer, data, None, cfg, tmp_path, dev, NullTracker())
    peak = torch.cuda.max_memory_allocated() / 2**20
    modeling.remove_lora(model)
    return [loss for _, loss in result.history.train], peak


def test_activation_checkpointing_on_and_off(tmp_path, tinyllama):
    dev = devices.device()
    tokenizer = modeling.load_tokenizer(tinyllama, ModelConfig())
    base = modeling.load_base_model(tinyllama, ModelConfig(), QuantConfig(), dev)
    plain_losses, plain_peak = _train_steps(base, tokenizer, False, tmp_path / "plain")
    ckpt_losses, ckpt_peak = _train_steps(base, tokenizer, True, tmp_path / "ckpt")
    print(
        f"\ncheckpointing off/on: peak {plain_peak:.0f}/{ckpt_peak:.0f} MiB; "
        f"losses {plain_losses} / {ckpt_losses}"
    )
    assert len(plain_losses) == 4
    assert ckpt_losses == pytest.approx(plain_losses, rel=2e-2)
    assert ckpt_peak < plain_peak


def test_a_failed_trial_gives_its_gpu_memory_back(tmp_path, gpu_cache, tinyllama, monkeypatch):
    import optuna

    from finqa_exp.sweep.job import TRIAL_ENV, TrialJob
    from finqa_exp.trial import run_trial
    from tests import faults

    study = optuna.create_study(study_name="gpu", storage=optuna.storages.InMemoryStorage())
    job = TrialJob(run_trial, study._storage, "gpu", study.sampler, study.pruner)
    # A first trial completes: the base is loaded and CUDA's workspaces (forward and
    # backward threads) exist. Measured once its adapter is out, as the next trial finds it.
    monkeypatch.setenv(TRIAL_ENV, str(study.ask().number))
    job(trial_cfg(tmp_path / "first", gpu_cache, tinyllama, "lora.r=64"))
    base = modeling.shared_base.model
    modeling.shared_base.discard_adapter()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()

    # Rank 64: its LoRA weights alone are 72 MiB; with gradients and Adam's states, 288.
    monkeypatch.setenv(TRIAL_ENV, str(study.ask().number))
    watch = "+train.callbacks.fault={_target_: tests.faults.WatchAndRaiseAt, step: 2}"
    cfg = trial_cfg(tmp_path / "failed", gpu_cache, tinyllama, "lora.r=64", watch)
    with pytest.raises(torch.OutOfMemoryError) as failed:
        job(cfg)
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    print(f"\nallocated before {before / 2**20:.0f} MiB, after the failure {after / 2**20:.0f}")
    assert failed.value.__traceback__ is not None  # still held, as Hydra's JobReturn holds it
    assert [ref() for ref in faults.WATCHED if ref() is not None] == []
    assert modeling.shared_base.model is base  # the base stays for the next trial
    assert after - before < 32 * 2**20


def test_one_trial_per_gpu(tmp_path):
    """A sweep with the per_gpu launcher: as many trials at a time as GPUs, each process
    seeing exactly one GPU, and the Trainer's batch the configured one."""
    record = tmp_path / "devices.jsonl"
    path = os.pathsep.join(p for p in (str(REPO), START_ENV.get("PYTHONPATH")) if p)
    env = {**START_ENV, "PYTHONPATH": path, devices.DEVICE_ENV: "cuda"}
    env[devices.LOCK_DIR_ENV] = str(tmp_path / "locks")
    n_gpus = _all_gpus()
    n_trials = 2 * n_gpus
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "finqa_exp",
            "-m",
            "hydra/launcher=per_gpu",
            f"hydra.sweep.dir={tmp_path}/multirun",
            f"paths.root_dir={tmp_path}",
            "tracking=none",
            *FAST,
            "train.epochs=1",
            "model.tiny.pretrain_epochs=1",  # the tiny base is built here: keep it quick
            "hydra/sweeper/pruner=none",
            f"hydra.sweeper.n_trials={n_trials}",
            "hydra.sweeper.confirm.top_k=0",
            f"+train.callbacks.probe={{_target_: tests.probes.RecordDevice, record: {record}}}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in record.read_text().splitlines()]
    print(f"\n{n_gpus} GPU(s), {n_trials} trials: {lines}")
    assert len(lines) == n_trials
    assert all(x["device_count"] == 1 and x["n_gpu"] == 1 for x in lines)
    assert all(x["train_batch_size"] == x["per_device_batch"] == 16 for x in lines)
    assert all(x["model_device"].startswith("cuda") for x in lines)
    # One worker process per GPU, each keeping its own GPU.
    by_pid: dict[int, set] = {}
    for x in lines:
        by_pid.setdefault(x["pid"], set()).add(x["cuda_visible_devices"])
    assert all(len(v) == 1 for v in by_pid.values())
    if n_gpus > 1:
        assert len({next(iter(v)) for v in by_pid.values()}) == len(by_pid) == n_gpus
