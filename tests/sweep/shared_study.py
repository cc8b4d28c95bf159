"""What the real sweeps that share one study (several workers, a cluster's engines) have in
common: their command's settings, the workers' environment, and the check of what sharing
could break. Used by tests/sweep/test_workers.py and tests/sweep/test_cluster.py."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from finqa_exp.sweep import study_book as book
from tests.conftest import FAST

REPO = Path(__file__).resolve().parents[2]
STUDY = "finqa_tiny_finqa_sample"

# Two searched values; batch size stays at FAST's 16 so every trial takes seconds. The
# median pruner may stop a trial from the second one on, so PRUNED shows up too.
SWEEP = [
    *[o for o in FAST if not o.startswith("train.learning_rate=")],  # searched below
    "hydra.sweeper.params={train.learning_rate: 'tag(log, interval(1e-4, 3e-3))',"
    " lora.r: 'choice(4, 16)'}",
    "hydra.sweeper.pruner.n_startup_trials=1",
    "hydra.sweeper.heartbeat_interval=2",
    "hydra.sweeper.grace_period=120",  # a busy 2-core machine must not fail live trials
]


def worker_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    # One thread per worker: four workers on two cores must not fight over them.
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def check_one_study(
    trials: list[optuna.trial.FrozenTrial],
    n_trials: int,
    parent_id: str,
    tracking_uri: str,
    experiment: str,
    sweep_dir: Path,
) -> list[int]:
    """What sharing a study (workers, a cluster's nodes) could break, checked: exactly
    n_trials trials COMPLETE or PRUNED, nothing RUNNING or retried, a job folder each, and
    in MLflow one parent run with one child per trial, all ended. Returns the trial numbers.
    """
    # Optuna: exactly n_trials slots, all COMPLETE or PRUNED; anything else is surplus.
    counted = book.slot_trials(trials)[:n_trials]
    states = Counter(t.state.name for t in trials)
    numbers = [t.number for t in counted]
    surplus = [t for t in trials if t not in counted]
    print(f"states {dict(states)} ({len(surplus)} surplus asks)")
    assert len(counted) == n_trials and len(set(numbers)) == n_trials
    assert {t.state for t in counted} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert states["RUNNING"] == 0 and states["WAITING"] == 0
    for trial in surplus:  # asked by a worker after the last slot was taken: never run
        assert trial.state == TrialState.FAIL and trial.system_attrs.get(book.SURPLUS_ATTR)
    assert not [t for t in trials if "failed_trial" in t.system_attrs]  # nothing retried

    # A job folder per trial, named by its number, and none for the surplus.
    folders = sorted(int(p.name) for p in sweep_dir.iterdir() if p.name.isdigit())
    assert folders == sorted(numbers)

    # MLflow: one parent run for the study; each trial one child run, all ended.
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    status = Counter(r.info.status for r in runs)
    print(f"MLflow runs by status: {dict(status)}")
    parents = [(r.info.run_id, r.info.status) for r in runs if r.data.tags.get("optuna_role")]
    assert [run_id for run_id, _ in parents] == [parent_id], f"study runs: {parents}"
    running = [(r.info.run_name, r.info.run_id) for r in runs if r.info.status == "RUNNING"]
    assert not running, f"runs left RUNNING: {running}"
    children = [r for r in runs if r.info.run_id != parent_id]
    assert all(r.data.tags.get("mlflow.parentRunId") == parent_id for r in children)
    by_number = {int(r.data.tags["trial_number"]): r for r in children}
    assert len(by_number) == len(children) == n_trials  # one run per trial, none shared
    assert sorted(by_number) == sorted(numbers)
    out_dirs = set()
    for trial in counted:
        run = by_number[trial.number]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["optuna_state"] == trial.state.name
        assert run.info.status == ("FINISHED" if trial.state == TrialState.COMPLETE else "KILLED")
        assert run.data.params["paths.output_dir"] == str(sweep_dir / str(trial.number))
        out_dirs.add(run.data.params["paths.output_dir"])
    assert len(out_dirs) == n_trials
    return numbers
