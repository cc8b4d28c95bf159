"""A small real sweep: ``python -m finqa_exp -m`` over tiny-model trials.

Checks what a user relies on after a sweep: the study holds exactly the trials asked
for, each trial is a child MLflow run of the study's parent run (linked both ways), no
run is left RUNNING, and optimization_results.yaml names the best trial's params.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from tests.servers import optuna_dashboard

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow
STUDY = "finqa_tiny_finqa_sample"

SMALL = [
    "train.epochs=2",
    "train.batch_size=16",
    "eval.max_new_tokens=16",
    "eval.max_questions=8",
    "hydra.sweeper.n_trials=4",
    "hydra.sweeper.confirm.top_k=0",  # confirmation: tests/report (the real sweep there)
    "hydra.sweeper.params={train.learning_rate: 'tag(log, interval(1e-4, 3e-3))',"
    " lora.r: 'choice(4, 16)'}",
    # Trial 0 learns fast; trial 1 barely moves, so its first eval loss is worse than the
    # median of the one finished trial and the median pruner stops it there.
    "hydra.sweeper.enqueue_trials=[{train.learning_rate: 3e-3, lora.r: 16},"
    " {train.learning_rate: 1e-5, lora.r: 4}]",
    "hydra.sweeper.pruner.n_startup_trials=1",
]


def sweep_command(root: Path, cache_dir: Path, *args: str) -> list[str]:
    # The session's cache: the tiny base is built once, not once per test (~40 s each).
    multirun, cache = f"hydra.sweep.dir={root}/multirun", f"paths.cache_dir={cache_dir}"
    return [sys.executable, "-m", "finqa_exp", "-m", multirun, cache, *args]


def sweep(root: Path, cache_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FINQA_EXP_ROOT": str(root)}
    return subprocess.run(
        sweep_command(root, cache_dir, *args),
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_small_sweep_over_real_trials(tmp_path, cache_dir):
    proc = sweep(tmp_path, cache_dir, *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]

    study = optuna.load_study(
        study_name="finqa_tiny_finqa_sample",
        storage=f"sqlite:///{tmp_path}/studies/finqa_tiny_finqa_sample.db",
    )
    trials = study.get_trials()
    assert len(trials) == 4
    assert trials[0].params == {"train.learning_rate": 3e-3, "lora.r": 16}  # enqueued
    assert trials[1].state == optuna.trial.TrialState.PRUNED
    assert trials[0].state == optuna.trial.TrialState.COMPLETE and 0 < trials[0].value < 1
    assert len({t.params["train.learning_rate"] for t in trials}) == 4
    assert len(list((tmp_path / "multirun").glob("[0-9]*"))) == 4  # a job folder per trial

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert parent.data.metrics["trials_complete"] == len(done)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in trials}
    for run in children:
        assert run.data.tags["study"] == study.study_name
        trial = trials[int(run.data.tags["trial_number"])]
        assert run.data.tags["optuna_state"] == trial.state.name
        assert float(run.data.params["train.learning_rate"]) == pytest.approx(
            trial.params["train.learning_rate"]
        )
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert run.info.status == "FINISHED"
            assert run.data.metrics["rougeL"] == pytest.approx(trial.value)
        else:  # pruned: stopped at its first eval, no ROUGE
            assert run.info.status == "KILLED" and "rougeL" not in run.data.metrics
    all_runs = client.search_runs([parent.info.experiment_id])
    assert not [r for r in all_runs if r.info.status == "RUNNING"]

    results = yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(study.best_value)
    assert results["best_params"]["lora.r"] == study.best_params["lora.r"]

    # What Optuna's own tools show: values named rougeL, none for the pruned trial (its
    # intermediate values are negated eval losses, labelled as such).
    assert study.metric_names == ["rougeL"]
    assert trials[1].value is None and trials[1].user_attrs["intermediate_value"] == "-eval_loss"
    assert all(v < 0 for v in trials[1].intermediate_values.values())
    with optuna_dashboard(f"sqlite:///{tmp_path}/studies/{STUDY}.db", tmp_path / "dash") as url:
        studies = get_json(f"{url}/api/studies")["study_summaries"]
        (summary,) = [s for s in studies if s["study_name"] == STUDY]
        detail = get_json(f"{url}/api/studies/{summary['study_id']}")
        assert detail["objective_names"] == ["rougeL"]
        shown = {t["number"]: t for t in detail["trials"]}
        assert "values" not in shown[1] and shown[1]["state"] == "Pruned"
        for t in trials:
            if t.state == optuna.trial.TrialState.COMPLETE:
                assert shown[t.number]["values"] == [pytest.approx(t.value)]
        with urllib.request.urlopen(f"{url}/csv/{summary['study_id']}", timeout=30) as resp:
            rows = list(csv.reader(io.StringIO(resp.read().decode())))
        assert rows[0][:3] == ["Number", "State", "rougeL"]
        assert rows[2][:3] == ["1", "PRUNED", ""]  # no objective for the pruned trial


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def files_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_kill_9_and_sigterm_mid_trial_then_the_same_command_resumes_them(tmp_path, cache_dir):
    """Three trials with the same params, so trial 0 is what the others must end as.

    Run 1: trial 0 runs through; trial 1 is killed (-9) at step 38 of 63 (60 %), after
    its check at step 37. Run 2: the stale trial 1 is failed and retried as trial 2, which
    resumes its checkpoint (not the later one cut off while being written); trial 3 gets
    SIGTERM at step 28, saves a checkpoint at its next logged step (30) and the sweep
    stops. Run 3 resumes it as trial 4. Each retry ends with trial 0's losses and ROUGE.
    """
    args = [
        "train.epochs=3",
        "train.batch_size=16",
        "train.learning_rate=2e-3",
        "train.evals_per_epoch=4",
        "lora.dropout=0.1",
        "eval.max_new_tokens=16",
        "eval.max_questions=8",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.confirm.top_k=0",
        "hydra/sweeper/pruner=none",
        "hydra.sweeper.params={lora.r: 'choice(8)'}",  # every trial the same
        "hydra.sweeper.heartbeat_interval=1",
        "hydra.sweeper.grace_period=5",
    ]
    faults = tmp_path / "faults.jsonl"

    def fault(step: int, sig: str, trial: int) -> str:
        return (
            f"+train.callbacks.f={{_target_: tests.faults.SignalAt, step: {step}, "
            f"signal: {sig}, trial: {trial}, record: '{faults}'}}"
        )

    storage = f"sqlite:///{tmp_path}/studies/{STUDY}.db"
    ckpts = tmp_path / "checkpoints" / STUDY

    first = sweep(tmp_path, cache_dir, *args, fault(38, "SIGKILL", 1))
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert [p.name for p in (ckpts / "trial-1").iterdir()] == ["checkpoint-37"]
    before = files_digest(tmp_path / "multirun" / "0")
    cut = ckpts / "trial-1" / "checkpoint-42"  # as if killed while saving at the next check
    cut.mkdir()
    (cut / "adapter_model.safetensors").write_bytes(b"half")

    # Trial 1 must look dead when run 2 starts (its heartbeat older than grace_period), or
    # run 2 would take it for another worker's and start a new trial first.
    killed_at = json.loads(faults.read_text().splitlines()[-1])["at"]
    time.sleep(max(0.0, killed_at + 5.5 - time.time()))
    second = sweep(tmp_path, cache_dir, *args, fault(28, "SIGTERM", 3))
    assert second.returncode == 128 + signal.SIGTERM, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "checkpoint-37: step 37 of trial 1" in log  # "resuming from ...", in the job's log
    assert "checkpoint-42 (incomplete)" in log
    assert second.stderr.strip().splitlines()[-1].startswith("stopped: ")
    assert [p.name for p in (ckpts / "trial-3").iterdir()] == ["checkpoint-30"]

    third = sweep(tmp_path, cache_dir, *args)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "checkpoint-30: step 30 of trial 3" in third.stdout + third.stderr

    trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "FAIL", "COMPLETE"]
    assert trials[1].user_attrs["fail_reason"].startswith("stale")
    assert "TrialPreempted: SIGTERM at step 30" in trials[3].user_attrs["fail_reason"]
    assert [t.system_attrs.get("failed_trial") for t in trials] == [None, None, 1, None, 3]
    assert files_digest(tmp_path / "multirun" / "0") == before  # not overwritten
    assert not ckpts.exists() or list(ckpts.iterdir()) == []  # each chain removed its own

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = {t.number: client.get_run(t.user_attrs["mlflow_run_id"]) for t in trials}
    assert [runs[n].info.status for n in range(5)] == [
        "FINISHED", "FAILED", "FINISHED", "KILLED", "FINISHED",
    ]  # fmt: skip
    assert "TrialPreempted" in runs[3].data.tags["error"]
    # From the signal to the trial's end (checkpoint saved, run closed KILLED).
    signalled = [json.loads(line) for line in faults.read_text().splitlines()][-1]
    stopped = runs[3].info.end_time / 1000 - signalled["at"]
    print(f"SIGTERM at step 28 to the trial's end: {stopped:.1f} s")
    assert 0 < stopped < 10
    reference = runs[0].data.metrics
    for retry, resumed_at, of in ((2, 37, 1), (4, 30, 3)):
        metrics, tags = runs[retry].data.metrics, runs[retry].data.tags
        assert metrics["resumed_from_step"] == resumed_at
        assert tags["resumed_from"] == runs[of].info.run_id
        assert runs[of].data.tags["resumed_by"] == runs[retry].info.run_id
        for key in ("rougeL", "eval_loss", "final_train_loss", "train_tokens", "train_steps"):
            assert metrics[key] == pytest.approx(reference[key], abs=1e-6), (retry, key)
        assert trials[retry].value == pytest.approx(trials[0].value, abs=1e-6)
        # The pruner's record and the loss curve continue the original's, step for step.
        assert trials[retry].intermediate_values.keys() == trials[0].intermediate_values.keys()
        for at, value in trials[0].intermediate_values.items():
            assert trials[retry].intermediate_values[at] == pytest.approx(value, abs=1e-6)
        curve = client.get_metric_history(runs[retry].info.run_id, "train_loss")
        full = client.get_metric_history(runs[0].info.run_id, "train_loss")
        assert [m.step for m in curve] == [m.step for m in full]
        for a, b in zip(curve, full, strict=True):
            assert a.value == pytest.approx(b.value, abs=1e-6)
        share = metrics["train_time_s"] / reference["train_time_s"]
        print(f"trial {retry} resumed at step {resumed_at} of 63: training time {share:.0%}")
    assert [r.info.run_name for r in client.search_runs([runs[0].info.experiment_id])
            if r.info.status == "RUNNING"] == []  # fmt: skip
