"""The sweep on real cluster engines, on this machine and on loopback only: Hydra's submitit
launcher (``submitit_local``: Slurm's code path, with local processes for nodes) and its Ray
launcher on a Ray head started on 127.0.0.1, tracked by an MLflow server that authenticates
its users (``mlflow server --app-name basic-auth``), as the README's cluster recipe runs.

    pytest tests/sweep/test_cluster.py -s

Workers take their MLflow credentials from the environment only (the Ray head's, for Ray
workers), and a worker without them is refused before any trial exists. The real sweeps
keep 2 trials in flight with the median pruner; each must end with exactly n_trials
trials, one MLflow parent run with a child per trial, nothing RUNNING, and every trial run
in a process other than the sweep's. The toy app's sweeps check failure accounting through
both engines in seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from finqa_exp.sweep import study_book as book
from tests.servers import auth_tracking_server, free_port
from tests.sweep.shared_study import (
    STUDY,
    SWEEP,
    check_one_study,
    worker_env,
)

REPO = Path(__file__).resolve().parents[2]
TOY_APP = REPO / "tests" / "sweep" / "toy_app" / "app.py"
RAY = Path(sys.executable).with_name("ray")
NO_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


# On Linux, Ray replaces a loopback --node-ip-address by the machine's routable address and
# then listens on every interface; with this it keeps 127.0.0.1 and listens there only.
# The driver (the sweep) must have it too, or it looks for the head at the other address.
LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def bare_env() -> dict[str, str]:
    """The workers' environment without any MLflow credentials."""
    env = {k: v for k, v in worker_env().items() if k not in NO_CREDENTIALS}
    return {**env, **LOOPBACK_RAY}


def ray_listeners() -> set[str]:
    """The addresses Ray's servers listen on (GCS, raylets)."""
    import psutil

    pids = {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in RAY_SERVERS}
    return {
        c.laddr.ip
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    }


RAY_SERVERS = {"gcs_server", "raylet"}


def loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    with auth_tracking_server(tmp_path_factory.mktemp("mlflow-auth")) as (server, user):
        yield server, user


@pytest.fixture(scope="module")
def ray_head(auth_server):
    """``ray start --head`` on 127.0.0.1; its workers get the recipe's environment: the
    worker's MLflow credentials, set where ``ray start`` runs. Yields its address."""
    _, user = auth_server
    # Ray's socket paths must stay under the OS limit of about 107 characters.
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    port = free_port()
    env = {**bare_env(), **user.env()}
    start = [
        str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
        "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]  # fmt: skip
    proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        listeners = ray_listeners()  # nothing reachable from another machine
        assert listeners and all(loopback(ip) for ip in listeners), listeners
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def journal(tmp_path: Path) -> str:
    return f"journal://{tmp_path / 'study.log'}"


def load(tmp_path: Path, name: str) -> optuna.Study:
    backend = JournalFileBackend(str(tmp_path / "study.log"))
    return optuna.load_study(study_name=name, storage=JournalStorage(backend))


@dataclass
class Ran:
    pid: int
    returncode: int
    stdout: str
    stderr: str


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> Ran:
    """Run ``cmd`` to its end (killed after ``timeout`` s); its pid and outputs."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[1:4])} did not end in {timeout:.0f} s:\n{err[-4000:]}")
    return Ran(proc.pid, proc.returncode, out, err)


def real_sweep(tmp_path: Path, server_url: str, experiment: str, *launcher: str) -> list[str]:
    return [
        sys.executable, "-m", "finqa_exp", "-m", *SWEEP,
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.confirm.top_k=0",
        f"hydra.sweeper.storage={journal(tmp_path)}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        f"paths.root_dir={tmp_path}",
        f"tracking.uri={server_url}",
        f"tracking.experiment_name={experiment}",
        "tracking.artifact_location=null",  # artifacts go through the server
        *launcher,
    ]  # fmt: skip


def check_real_sweep(tmp_path, monkeypatch, proc, server_url, experiment, user) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    study = load(tmp_path, STUDY)
    trials = study.get_trials()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user.name)  # for the checks' client
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user.password)
    parent = study.user_attrs["mlflow_parent_run_id"]
    numbers = check_one_study(trials, 4, parent, server_url, experiment, tmp_path / "multirun")
    counted = [t for t in trials if t.number in numbers]
    # Each job ran outside the sweep's process and reported to the pruner through the
    # shared study.
    workers = {t.system_attrs[book.WORKER_ATTR] for t in counted}
    assert all(not w.endswith(f":{proc.pid}") for w in workers)
    assert all(t.intermediate_values for t in counted)
    print(f"\n{experiment}: states {[t.state.name for t in counted]}, jobs ran in {workers}")


# ---------------------------------------------------------------- credentials


@pytest.mark.slow
def test_a_worker_without_credentials_is_refused_before_any_trial(tmp_path, auth_server):
    server, user = auth_server
    cmd = real_sweep(tmp_path, server.url, "refused", "hydra/launcher=submitit_local")
    for env, expected in [
        (bare_env(), "the tracking server asks for credentials (HTTP 401): set "),
        ({**bare_env(), **user.env(), "MLFLOW_TRACKING_PASSWORD": "wrong"}, "refused these"),
    ]:
        proc = run(cmd, tmp_path, env, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: tracking.uri={server.url}: ")
        assert expected in lines[0]
        assert not (tmp_path / "study.log").exists()  # no study: zero trials
        assert not (tmp_path / "multirun").exists()  # no job launched
        assert "wrong" not in proc.stderr + proc.stdout  # no password is shown


# ---------------------------------------------------------------- submitit (Slurm's path)


@pytest.mark.slow
def test_a_submitit_sweep_keeps_two_trials_in_flight(
    tmp_path, monkeypatch, auth_server, warm_cache
):
    server, user = auth_server
    cmd = real_sweep(
        tmp_path, server.url, "submitit", "hydra/launcher=submitit_local",
        f"paths.cache_dir={warm_cache}",
    )  # fmt: skip
    # Submitit's jobs inherit the sweep's environment, credentials included (sbatch too).
    proc = run(cmd, tmp_path, {**bare_env(), **user.env()})
    check_real_sweep(tmp_path, monkeypatch, proc, server.url, "submitit", user)
    # Submitit's own record of each job (a folder per job id): its call, result and logs.
    jobs = [p for p in (tmp_path / "multirun" / ".submitit").iterdir() if p.name.isdigit()]
    assert len(jobs) == 4


def test_submitit_jobs_fail_one_at_a_time(tmp_path):
    cmd = [
        sys.executable, str(TOY_APP), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"hydra.sweeper.storage={journal(tmp_path)}", "hydra/launcher=submitit_local",
        "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=3", "fail_on=[1]",
        "hydra.sweeper.max_failure_rate=0.5",
    ]  # fmt: skip
    proc = run(cmd, tmp_path, bare_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_toy_failure(load(tmp_path, "toy"), proc.pid)


def check_toy_failure(study: optuna.Study, sweep_pid: int) -> None:
    assert [t.state for t in study.trials] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
    ]
    failed = study.trials[1]
    assert failed.user_attrs[book.FAIL_REASON] == "RuntimeError: planned failure of trial 1"
    assert not [t for t in study.trials if t.user_attrs["job_pid"] == sweep_pid]


# ---------------------------------------------------------------- Ray


@pytest.mark.slow
def test_a_ray_sweep_on_a_local_head(tmp_path, monkeypatch, auth_server, ray_head, warm_cache):
    server, user = auth_server
    cmd = real_sweep(
        tmp_path, server.url, "ray", "hydra/launcher=ray",
        f"hydra.launcher.ray.init.address={ray_head}", f"paths.cache_dir={warm_cache}",
    )  # fmt: skip
    # The sweep connects as a Ray client; its trials run in the head's workers, which have
    # the credentials ray start had. The sweep itself needs them for its parent run.
    proc = run(cmd, tmp_path, {**bare_env(), **user.env()})
    check_real_sweep(tmp_path, monkeypatch, proc, server.url, "ray", user)


@pytest.mark.slow
def test_ray_jobs_fail_one_at_a_time(tmp_path, ray_head):
    cmd = [
        sys.executable, str(TOY_APP), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"hydra.sweeper.storage={journal(tmp_path)}", "hydra/launcher=ray",
        f"hydra.launcher.ray.init.address={ray_head}", "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=3", "fail_on=[1]", "hydra.sweeper.max_failure_rate=0.5",
    ]  # fmt: skip
    proc = run(cmd, tmp_path, bare_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_toy_failure(load(tmp_path, "toy"), proc.pid)
