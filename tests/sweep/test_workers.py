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

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from tests.servers import POSTGRES_URL, postgres_schema, tracking_server
from tests.sweep.shared_study import STUDY, SWEEP, check_one_study, worker_env

LAUNCH = re.compile(r"\[HYDRA\]\s+#(\d+) : ")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tracking_server(tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv


@contextmanager
def study_storage(kind: str, folder: Path) -> Iterator[str]:
    """The value of hydra.sweeper.storage: a journal file, or a fresh PostgreSQL schema."""
    if kind == "journal":
        yield f"journal://{folder / 'study.log'}"
    else:
        with postgres_schema(POSTGRES_URL, "finqa_optuna") as url:
            yield url


def password_file(url: str, folder: Path) -> tuple[str, str]:
    """``url`` without its password, and a libpq password file (for PGPASSFILE) with it."""
    import sqlalchemy as sa

    parts = sa.engine.make_url(url)
    passfile = folder / "pgpass"
    passfile.write_text(
        f"{parts.host}:{parts.port or 5432}:{parts.database}:{parts.username}:{parts.password}\n"
    )
    passfile.chmod(0o600)  # libpq ignores a password file others can read
    bare = parts.set(password=None).render_as_string(hide_password=False)
    return bare, str(passfile)


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
                    cmd,
                    cwd=root,
                    env=worker_env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
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


# Four workers on PostgreSQL, as across machines. Without PostgreSQL, on the journal file
# that several sweeps share on one machine (the toy sweeps of test_sweeper.py and the
# cluster sweeps of test_cluster.py share one too).
@pytest.mark.parametrize(
    ("storage", "workers"), [("postgresql", 4) if POSTGRES_URL else ("journal", 4)]
)
def test_workers_share_one_study_and_one_tracking_server(
    tmp_path, monkeypatch, server, warm_cache, storage, workers
):
    n_trials = 4
    experiment = f"workers-{storage}-{workers}"
    sweep_dir = tmp_path / "multirun"
    with study_storage(storage, tmp_path) as storage_url:
        if storage == "postgresql":
            # As the README's recipe: the password in a libpq password file named by the
            # environment (the workers inherit it), never on the command line.
            storage_url, passfile = password_file(storage_url, tmp_path)
            monkeypatch.setenv("PGPASSFILE", passfile)
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

    launched = [[int(n) for n in LAUNCH.findall(out)] for out in outputs]
    print(f"\n{workers} workers, {storage} study, {n_trials} trials in {wall:.0f} s")
    print(f"trials launched per worker: {launched}")
    numbers = check_one_study(trials, n_trials, parent_id, server.url, experiment, sweep_dir)
    assert sorted(n for mine in launched for n in mine) == sorted(numbers)  # each once
    assert sum(1 for mine in launched if mine) >= 2  # the study really was shared
