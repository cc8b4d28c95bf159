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


def test_kill_9_mid_sweep_then_the_same_command_finishes_the_study(tmp_path, cache_dir):
    args = [
        "train.epochs=3",
        "train.batch_size=16",
        "eval.max_new_tokens=16",
        "eval.max_questions=8",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.confirm.top_k=0",
        "hydra/sweeper/pruner=none",
        "hydra.sweeper.heartbeat_interval=1",
        "hydra.sweeper.grace_period=5",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "FINQA_EXP_ROOT": str(tmp_path)}
    cmd = sweep_command(tmp_path, cache_dir, *args)
    storage = f"sqlite:///{tmp_path}/studies/finqa_tiny_finqa_sample.db"
    first = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # Kill once trial 0 is done and trial 1 has been training for a moment.
    deadline = time.time() + 600
    killed_at = None
    while time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
        try:
            trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials()
        except Exception:  # study not created yet
            continue
        running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        if len(trials) == 2 and running and "mlflow_run_id" in running[0].user_attrs:
            time.sleep(3)
            first.send_signal(signal.SIGKILL)
            first.wait()
            killed_at = running[0].number
            break
    assert killed_at == 1, "the sweep finished before it could be killed"
    before = files_digest(tmp_path / "multirun" / "0")

    again = sweep(tmp_path, cache_dir, *args)
    assert again.returncode == 0, again.stderr[-3000:]

    trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials()
    states = [t.state.name for t in trials]
    print(f"trials after kill -9 and re-run: {states}")
    assert states.count("RUNNING") == 0
    assert states.count("COMPLETE") == 3  # exactly n_trials finished
    killed = trials[killed_at]
    assert killed.state.name == "FAIL" and killed.user_attrs["fail_reason"].startswith("stale")
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed_at]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert retries[0].state.name == "COMPLETE"
    assert files_digest(tmp_path / "multirun" / "0") == before  # not overwritten
    assert sorted(p.name for p in (tmp_path / "multirun").glob("[0-9]*")) == [
        str(t.number) for t in trials
    ]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("finqa").experiment_id])
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    assert client.get_run(killed.user_attrs["mlflow_run_id"]).info.status == "FAILED"
