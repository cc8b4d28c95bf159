"""Real sweeps under faults: nothing is lost when a trial breaks.

Each test runs ``python -m finqa_exp -m`` on tiny-model trials with one fault injected into
trial 1 (tests/faults.py, through ``train.callbacks``, or a sampled value the model rejects)
and checks what "nothing lost" means: the broken trial is FAIL with its reason in Optuna
(``fail_reason``) and MLflow (tag ``error``, run FAILED); the sweep goes on within its
failure budget and exits 0; the study holds exactly n_trials trials and nothing is left
RUNNING in Optuna or MLflow; and the trial after the fault scores exactly what the same
params score in a clean sweep. See the figures with::

    pytest -s tests/sweep/test_faults.py
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import Run
from optuna.trial import FrozenTrial

from tests.conftest import FAST

REPO = Path(__file__).resolve().parents[2]
STUDY = "finqa_tiny_finqa_sample"  # the default hydra.sweeper.study_name: finqa_<model>_<data>

pytestmark = pytest.mark.slow

N_TRIALS = 3
# One failure in three trials is within budget: the sweep stops only when this run's
# failures exceed max_failure_rate x n_trials = 1.5.
MAX_FAILURE_RATE = 0.5
# Learning rate and batch size are fixed by FAST; the study searches LoRA rank and modules.
SEARCH = [
    "lora.r=choice(4, 8)",
    "lora.target_modules=choice([q_proj,v_proj], [q_proj,k_proj,v_proj,o_proj])",
]
# Every trial is enqueued, so each test knows the params of the trial after the fault.
TRIAL_0 = {"lora.r": 8, "lora.target_modules": "[q_proj,k_proj,v_proj,o_proj]"}
TRIAL_1 = {"lora.r": 4, "lora.target_modules": "[q_proj,v_proj]"}  # the trial a fault breaks
TRIAL_2 = {"lora.r": 4, "lora.target_modules": "[q_proj,k_proj,v_proj,o_proj]"}


def enqueue(*trials: dict[str, Any]) -> str:
    items = ", ".join(
        "{"
        + ", ".join(f"{k}: '{v}'" if isinstance(v, str) else f"{k}: {v}" for k, v in t.items())
        + "}"
        for t in trials
    )
    return f"hydra.sweeper.enqueue_trials=[{items}]"


def fault(name: str, root: Path, **kwargs: Any) -> str:
    """The override that adds fault injector ``tests.faults.<name>`` to every trial."""
    args = "".join(f", {k}: {v}" for k, v in kwargs.items())
    return (
        f"+train.callbacks.fault={{_target_: tests.faults.{name}{args}, "
        f"record: '{root / 'faults.jsonl'}'}}"
    )


@dataclass
class Sweep:
    """One finished sweep process and the stores it wrote under ``root``."""

    root: Path
    proc: subprocess.CompletedProcess
    seconds: float
    before: tuple[int, int]  # (trials, MLflow runs) in the stores before the sweep ran

    @property
    def output(self) -> str:
        return (self.proc.stdout + self.proc.stderr)[-4000:]

    def faults(self) -> list[dict[str, Any]]:
        record = self.root / "faults.jsonl"
        if not record.exists():
            return []
        return [json.loads(line) for line in record.read_text().splitlines()]


def study_trials(root: Path) -> list[FrozenTrial]:
    """The study's trials; [] when no study was created."""
    db = root / "studies" / f"{STUDY}.db"
    if not db.exists():
        return []
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{db}").get_trials()


def mlflow_client(root: Path) -> MlflowClient | None:
    db = root / "mlflow.db"  # checked first: a client on a missing path would create it
    return MlflowClient(f"sqlite:///{db}") if db.exists() else None


def mlflow_runs(root: Path) -> list[Run]:
    client = mlflow_client(root)
    if client is None:
        return []
    experiment = client.get_experiment_by_name("finqa")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def run_sweep(root: Path, cache_dir: Path, *args: str, n_trials: int = N_TRIALS) -> Sweep:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FINQA_EXP_ROOT": str(root)}
    cmd = [
        sys.executable,
        "-m",
        "finqa_exp",
        "-m",
        f"hydra.sweep.dir={root}/multirun",
        f"paths.cache_dir={cache_dir}",  # the tiny base is built once per session
        *FAST,
        "train.epochs=1",  # instead of FAST's 2: each test trains two or three trials
        # No pruning: every trial after the fault trains to the end and has an objective.
        "hydra/sweeper/pruner=none",
        f"hydra.sweeper.n_trials={n_trials}",
        "hydra.sweeper.confirm.top_k=0",  # faults of trials; confirmation: test_sweeper
        f"hydra.sweeper.max_failure_rate={MAX_FAILURE_RATE}",
        *SEARCH,
        *args,
    ]
    before = (len(study_trials(root)), len(mlflow_runs(root)))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    return Sweep(root, proc, time.perf_counter() - start, before)


# What must come out identical when the same params run again: the objective (ROUGE-L of
# greedy answers), the last eval loss and the last logged training loss.
COMPARED = ("rougeL", "eval_loss", "final_train_loss")


@pytest.fixture(scope="module")
def clean(tmp_path_factory, cache_dir) -> dict[str, float]:
    """TRIAL_2's params in a clean sweep (one trial, no fault, a fresh process): its
    objective and COMPARED metrics."""
    root = tmp_path_factory.mktemp("clean")
    sweep = run_sweep(root, cache_dir, enqueue(TRIAL_2), n_trials=1)
    assert sweep.proc.returncode == 0, sweep.output
    [trial] = study_trials(root)
    assert trial.state.name == "COMPLETE" and trial.params == TRIAL_2
    [run] = [r for r in mlflow_runs(root) if r.info.run_id == trial.user_attrs["mlflow_run_id"]]
    metrics = {"objective": trial.value, **{k: run.data.metrics[k] for k in COMPARED}}
    print(f"\nclean sweep: {TRIAL_2} -> {metrics} in {sweep.seconds:.1f}s")
    return metrics


def check_one_failed_trial(
    sweep: Sweep, clean: dict[str, float], error: str, label: str
) -> tuple[list[FrozenTrial], dict[int, Run]]:
    """What "nothing lost" means when trial 1 of 3 breaks; prints the sweep's figures.

    Returns the trials and the MLflow run of each trial by number.
    """
    assert sweep.proc.returncode == 0, sweep.output  # within max_failure_rate: not fatal
    trials = study_trials(sweep.root)
    runs = mlflow_runs(sweep.root)
    states = [t.state.name for t in trials]
    assert len(trials) == N_TRIALS, states  # the exact total: no retry of a failed trial
    running_runs = [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    by_id = {r.info.run_id: r for r in runs}
    trial_runs = {t.number: by_id[t.user_attrs["mlflow_run_id"]] for t in trials}
    failed = trials[1]
    after = {
        "objective": trials[2].value,
        **{k: trial_runs[2].data.metrics.get(k) for k in COMPARED},
    }
    diff = {k: None if after[k] is None else after[k] - clean[k] for k in after}
    print(
        f"\n{label}: faults injected {len(sweep.faults())} {sweep.faults()}"
        f"\n  sweep: exit {sweep.proc.returncode} in {sweep.seconds:.1f}s"
        f"\n  trials: {sweep.before[0]} before, {len(trials)} after: {states}"
        f"\n  MLflow runs: {sweep.before[1]} before, {len(runs)} after: "
        f"{sorted((r.info.run_name, r.info.status) for r in runs)}"
        f"\n  RUNNING leftovers: {states.count('RUNNING')} trials, {len(running_runs)} runs"
        f"\n  trial 1 fail_reason: {failed.user_attrs.get('fail_reason')!r}"
        f"\n  trial 1 MLflow error tag: {trial_runs[1].data.tags.get('error', '')[:200]!r}"
        f"\n  trial 2 (after the fault): {after}"
        f"\n  difference from the clean sweep: {diff}"
    )

    assert sweep.before == (0, 0)
    assert states == ["COMPLETE", "FAIL", "COMPLETE"]
    assert [t.params for t in trials] == [TRIAL_0, failed.params, TRIAL_2]
    assert failed.value is None
    assert failed.user_attrs["fail_reason"].startswith(error), failed.user_attrs
    assert states.count("RUNNING") == 0 and running_runs == []

    # One parent run for the study and one child run per trial, each closed as it ended.
    parent = [r for r in runs if r.data.tags.get("optuna_role") == "study"]
    assert len(parent) == 1 and len(runs) == 1 + N_TRIALS
    assert parent[0].info.status == "FINISHED"
    assert parent[0].data.metrics["trials_fail"] == 1
    assert parent[0].data.metrics["trials_complete"] == N_TRIALS - 1
    for number, run in trial_runs.items():
        assert run.data.tags["trial_number"] == str(number)
        assert run.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert run.data.tags["optuna_state"] == states[number]
    assert trial_runs[1].info.status == "FAILED"
    assert trial_runs[1].data.tags["error"].startswith(error)
    assert trial_runs[0].info.status == trial_runs[2].info.status == "FINISHED"

    # The trial after the fault is unaffected: exactly the clean sweep's objective and
    # losses for its params (trials are deterministic for a seed on CPU: no tolerance).
    assert after == clean
    return trials, trial_runs


def test_out_of_memory_in_one_trial_fails_it_and_the_sweep_goes_on(tmp_path, cache_dir, clean):
    sweep = run_sweep(
        tmp_path,
        cache_dir,
        enqueue(TRIAL_0, TRIAL_1, TRIAL_2),
        fault("RaiseAt", tmp_path, step=3, trial=1),
    )
    _, runs = check_one_failed_trial(
        sweep, clean, "OutOfMemoryError: CUDA out of memory", "OOM at step 3 of trial 1"
    )
    assert sweep.faults() == [{"fault": "oom", "trial": 1, "step": 3}]
    assert "train_loss" not in runs[1].data.metrics  # stopped before its first logging step


def test_nan_loss_in_one_trial_fails_it_and_the_sweep_goes_on(tmp_path, cache_dir, clean):
    # The LoRA weight turns NaN after step 3, so the loss logged at step 5
    # (train.logging_steps=5) is NaN: the trial's own guard must stop it there.
    sweep = run_sweep(
        tmp_path,
        cache_dir,
        enqueue(TRIAL_0, TRIAL_1, TRIAL_2),
        "train.logging_steps=5",
        fault("NanAt", tmp_path, step=3, trial=1),
    )
    trials, runs = check_one_failed_trial(
        sweep, clean, "NonFiniteLossError: loss is nan at step 5", "NaN loss in trial 1"
    )
    [injected] = sweep.faults()
    assert injected["fault"] == "nan" and injected["trial"] == 1 and "lora_A" in injected["weight"]
    assert "rougeL" not in runs[1].data.metrics  # a NaN trial is never scored
    assert trials[1].intermediate_values == {}  # stopped before its first eval


def test_a_sampled_value_the_model_rejects_fails_that_trial_only(tmp_path, cache_dir, clean):
    # query_key_value is a real LoRA target (Falcon's fused attention), but this Llama has
    # no such module. The value passes config validation and the sweep's preflight (a
    # non-empty list of names); only peft, at trial time, can tell.
    bad = {"lora.r": 4, "lora.target_modules": "[query_key_value]"}
    sweep = run_sweep(
        tmp_path,
        cache_dir,
        "lora.target_modules=choice([q_proj,v_proj], [q_proj,k_proj,v_proj,o_proj],"
        " [query_key_value])",
        enqueue(TRIAL_0, bad, TRIAL_2),
    )
    trials, _ = check_one_failed_trial(
        sweep,
        clean,
        "NoMatchingPeftModuleError: Target modules {'query_key_value'} not found in the base model",
        "LoRA target module the model lacks, in trial 1",
    )
    assert trials[1].params == bad
    assert sweep.faults() == []  # nothing injected: the model itself rejected the value


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_failed_adapter_write_fails_the_trial_and_keeps_the_others(
    tmp_path, cache_dir, clean, monkeypatch
):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    sweep = run_sweep(
        tmp_path,
        cache_dir,
        enqueue(TRIAL_0, TRIAL_1, TRIAL_2),
        fault("FullDiskAdapter", tmp_path, trial=1),
    )
    trials, runs = check_one_failed_trial(
        sweep,
        clean,
        "OSError: [Errno 28] No space left on device",
        "adapter write fails with ENOSPC in trial 1",
    )
    [injected] = sweep.faults()
    assert injected["fault"] == "enospc" and injected["path"].endswith(
        "1/adapter/adapter_config.json"
    )

    # The half-written adapter (weights without config) stays in its job folder, but it
    # is no result: its run is FAILED without an adapter artifact, and the study's best
    # trial and registered champion are complete trials.
    jobs = tmp_path / "multirun"
    half = jobs / "1" / "adapter"
    print(f"  trial 1 adapter folder: {sorted(p.name for p in half.iterdir())}")
    client = mlflow_client(tmp_path)
    assert client is not None
    artifacts = {n: [a.path for a in client.list_artifacts(r.info.run_id)] for n, r in runs.items()}
    print(f"  MLflow artifacts per trial: {artifacts}")
    # Scores are logged only once the adapter is saved: a FAILED run shows no ROUGE that a
    # user sorting runs by rougeL could mistake for a result.
    print(f"  trial 1 FAILED run has rougeL: {'rougeL' in runs[1].data.metrics}")
    assert "rougeL" not in runs[1].data.metrics
    assert "adapter" not in artifacts[1]
    results = yaml.safe_load((jobs / "optimization_results.yaml").read_text())
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert results["best_value"] == max(t.value for t in complete)
    champion = client.get_model_version_by_alias(STUDY, "champion")
    assert champion.run_id in {runs[t.number].info.run_id for t in complete}

    # The other trials' folders are intact: a whole adapter each, the same bytes as the
    # copy logged to MLflow.
    for number in (0, 2):
        adapter = jobs / str(number) / "adapter"
        assert "adapter" in artifacts[number]
        logged = Path(
            client.download_artifacts(
                runs[number].info.run_id, "adapter", str(tmp_path / f"logged{number}")
            )
        )
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            local = adapter / name
            assert local.is_file() and not local.is_symlink()
            assert sha256(local) == sha256(logged / name), f"trial {number}: {name}"
        assert (
            json.loads((adapter / "adapter_config.json").read_text())["r"]
            == trials[number].params["lora.r"]
        )
