"""Several sweep workers on one study, tracked by one MLflow server: the real command, at once.

    FINQA_TEST_POSTGRES_URL=postgresql://user:pw@127.0.0.1/db pytest tests/sweep/test_workers.py -s

Starts 2 or 4 copies of ``python -m finqa_exp -m`` (tiny-model trials) together against one
Optuna study (a journal file, or PostgreSQL) and one ``mlflow server`` on 127.0.0.1 (backed
by PostgreSQL when FINQA_TEST_POSTGRES_URL is set, else SQLite; see tests/servers.py), then
checks what sharing could break: the study holds exactly n_trials COMPLETE or PRUNED trials
(a lock or database error would show as FAIL, a lost update as RUNNING), every trial ran in
a job folder of its own and is one MLflow run, a child of the study's one parent run, and no
run is left RUNNING. ``-s`` prints the figures: workers, trials, wall time, states.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from finqa_exp.sweep import study_book as book
from tests.conftest import FAST
from tests.servers import NO_POSTGRES, POSTGRES_URL, postgres_schema, tracking_server

REPO = Path(__file__).resolve().parents[2]
STUDY = "finqa_tiny_finqa_sample"
LAUNCH = re.compile(r"\[HYDRA\]\s+#(\d+) : ")

pytestmark = pytest.mark.slow

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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tracking_server(tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv


@pytest.fixture(scope="module")
def warm_cache(cache_dir, tmp_path_factory) -> Path:
    """The session's model cache with the tiny base and its base score in it, built by one
    short run before any worker starts (else every worker would build it)."""
    root = tmp_path_factory.mktemp("warmup")
    warmup = [*FAST, "train.max_steps=1", "tracking=none", f"paths.cache_dir={cache_dir}"]
    proc = subprocess.run(
        [sys.executable, "-m", "finqa_exp", *warmup, f"paths.root_dir={root}"],
        cwd=root,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cache_dir


@contextmanager
def study_storage(kind: str, folder: Path) -> Iterator[str]:
    """The value of hydra.sweeper.storage: a journal file, or a fresh PostgreSQL schema."""
    if kind == "journal":
        yield f"journal://{folder / 'study.log'}"
    else:
        with postgres_schema(POSTGRES_URL, "finqa_optuna") as url:
            yield url


def load_study(storage: str) -> optuna.Study:
    if storage.startswith("journal://"):
        backend = JournalFileBackend(storage.removeprefix("journal://"))
        return optuna.load_study(study_name=STUDY, storage=JournalStorage(backend))
    return optuna.load_study(study_name=STUDY, storage=storage)


def run_workers(root: Path, n: int, args: list[str], timeout: float = 900) -> list[str]:
    """Start n sweep commands at once, wait for all; returns their outputs."""
    procs, logs = [], []
    for i in range(n):
        log_path = root / f"worker-{i}.log"
        with open(log_path, "wb") as log:
            cmd = [sys.executable, "-m", "finqa_exp", "-m", *args]
            # Different sampler seeds, as separate machines would have.
            cmd.append(f"hydra.sweeper.sampler.seed={i}")
            procs.append(
                subprocess.Popen(
                    cmd, cwd=root, env=worker_env(), stdout=log, stderr=subprocess.STDOUT
                )
            )
        logs.append(log_path)
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the workers did not finish in {timeout:.0f} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = [p.read_text(errors="replace") for p in logs]
    for i, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"worker {i} exited {proc.returncode}:\n{out[-4000:]}"
    return outputs


@pytest.mark.parametrize(
    "storage",
    [
        "journal",
        pytest.param("postgresql", marks=pytest.mark.skipif(not POSTGRES_URL, reason=NO_POSTGRES)),
    ],
)
@pytest.mark.parametrize(("workers", "n_trials"), [(2, 4), (4, 4)], ids=["2workers", "4workers"])
def test_workers_share_one_study_and_one_tracking_server(
    tmp_path, server, warm_cache, storage, workers, n_trials
):
    experiment = f"workers-{storage}-{workers}"
    sweep_dir = tmp_path / "multirun"
    with study_storage(storage, tmp_path) as storage_url:
        args = [
            *SWEEP,
            f"hydra.sweeper.n_trials={n_trials}",
            "hydra.sweeper.confirm.top_k=0",
            f"hydra.sweeper.storage='{storage_url}'",
            f"hydra.sweep.dir={sweep_dir}",
            f"paths.root_dir={tmp_path}",
            f"paths.cache_dir={warm_cache}",
            f"tracking.uri={server.url}",
            f"tracking.experiment_name={experiment}",
            "tracking.artifact_location=null",  # artifacts go through the server
        ]
        start = time.perf_counter()
        outputs = run_workers(tmp_path, workers, args)
        wall = time.perf_counter() - start
        study = load_study(storage_url)
        trials = study.get_trials()
        parent_id = study.user_attrs["mlflow_parent_run_id"]

    # Optuna: exactly n_trials slots, all COMPLETE or PRUNED; anything else is surplus.
    counted = book.slot_trials(trials)[:n_trials]
    states = Counter(t.state.name for t in trials)
    numbers = [t.number for t in counted]
    surplus = [t for t in trials if t not in counted]
    backend = server.backend_uri.split(":")[0]
    print(
        f"\n{workers} workers, {storage} study, MLflow server on {backend}:"
        f" {n_trials} trials in {wall:.0f} s; states {dict(states)}"
        f" ({len(surplus)} surplus asks)"
    )
    # Which worker launched which trial (Hydra logs "#<trial> : <overrides>" per job).
    launched = [[int(n) for n in LAUNCH.findall(out)] for out in outputs]
    print(f"trials launched per worker: {launched}")
    assert sorted(n for mine in launched for n in mine) == sorted(numbers)  # each once
    assert sum(1 for mine in launched if mine) >= 2  # the study really was shared
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
    client = MlflowClient(server.url)
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
