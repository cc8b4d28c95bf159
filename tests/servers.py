"""Real servers for the tests that need them: an MLflow tracking server, a PostgreSQL schema,
optuna-dashboard.

    from tests.servers import tracking_server
    with tracking_server(tmp_path) as server:       # PostgreSQL-backed if one is configured
        MlflowClient(server.url)                     # http://127.0.0.1:<free port>

The server runs ``mlflow server`` in a process group of its own, bound to 127.0.0.1, with
its artifacts served from a folder of the test's (``--artifacts-destination``); leaving the
``with`` block kills the group, so nothing outlives the test. With FINQA_TEST_POSTGRES_URL
set (``postgresql://user:pw@127.0.0.1/db``; .ci/run sets it), every store lives in a fresh
schema of that database, dropped afterwards: tests never see each other's rows, and the
role needs no right beyond creating schemas in its own database.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

POSTGRES_URL = os.environ.get("FINQA_TEST_POSTGRES_URL")
NO_POSTGRES = "FINQA_TEST_POSTGRES_URL not set (e.g. postgresql://user:pw@127.0.0.1/db)"


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 (free when asked; the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class MlflowServer:
    url: str  # http://127.0.0.1:<port>, the tracking.uri to give clients
    backend_uri: str
    artifacts_dir: Path
    log_path: Path  # the server's stdout and stderr


@contextmanager
def mlflow_server(
    backend_uri: str,
    folder: Path,
    start_timeout: float = 180.0,
    app_name: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[MlflowServer]:
    """``mlflow server`` on 127.0.0.1 over ``backend_uri``, artifacts under ``folder``;
    ``app_name="basic-auth"`` turns on MLflow's authentication (``env`` configures it)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = MlflowServer(
        url=f"http://127.0.0.1:{port}",
        backend_uri=backend_uri,
        artifacts_dir=folder / "artifacts",
        log_path=folder / "mlflow-server.log",
    )
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",  # the test machine has 2 cores; one worker serves a few clients
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", str(server.artifacts_dir),
        *(["--app-name", app_name] if app_name else []),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with open(server.log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: uvicorn's workers go with it
        )
    try:
        _wait_healthy(server, proc, start_timeout)
        yield server
    finally:
        _stop(proc)


def _wait_healthy(server: MlflowServer, proc: subprocess.Popen, timeout: float) -> None:
    _wait_answering(f"{server.url}/health", proc, server.log_path, timeout, "mlflow server")


def _wait_answering(
    url: str, proc: subprocess.Popen, log_path: Path, timeout: float, what: str
) -> None:
    """Until ``url`` answers 200 (a server has no ready event to wait on: poll it)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer in {timeout:.0f} s:\n{_tail(log_path)}")
        time.sleep(0.5)


@contextmanager
def background_server(
    cmd: list[str],
    folder: Path,
    url: str,
    ready_path: str,
    what: str,
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
) -> Iterator[Path]:
    """``cmd`` in a process group of its own, logging to ``folder/<what>.log``, until
    ``url + ready_path`` answers 200; yields the log's path and stops the group after."""
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / f"{what.replace(' ', '-')}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        _wait_answering(f"{url}{ready_path}", proc, log_path, timeout, what)
        yield log_path
    finally:
        _stop(proc)


@contextmanager
def optuna_dashboard(storage_url: str, folder: Path, start_timeout: float = 60.0) -> Iterator[str]:
    """``optuna-dashboard`` over ``storage_url`` on 127.0.0.1; yields its base URL."""
    port = free_port()
    cmd = [
        str(Path(sys.executable).with_name("optuna-dashboard")), storage_url,
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with background_server(cmd, folder, url, "/api/meta", "optuna-dashboard", start_timeout):
        yield url


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group; then SIGKILL to whatever of it is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@contextmanager
def postgres_schema(base_url: str, prefix: str = "finqa_test") -> Iterator[str]:
    """A fresh schema in ``base_url``'s database: yields a URL whose connections use it.

    The schema goes first on the connection's search_path (libpq ``options``), so MLflow's
    and Optuna's tables are created in it; it is dropped, tables and all, on exit.
    """
    import sqlalchemy as sa

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    url = sa.engine.make_url(base_url)
    admin = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    scoped = url.update_query_dict({"options": f"-csearch_path={name}"})
    try:
        yield scoped.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql("SET LOCAL lock_timeout = '30s'")
            conn.exec_driver_sql(f'DROP SCHEMA "{name}" CASCADE')
        admin.dispose()


@contextmanager
def tracking_server(folder: Path) -> Iterator[MlflowServer]:
    """An MLflow server backed by PostgreSQL (a fresh schema) if configured, else SQLite."""
    if POSTGRES_URL:
        with postgres_schema(POSTGRES_URL, "finqa_mlflow") as db, mlflow_server(db, folder) as srv:
            yield srv
    else:
        with mlflow_server(f"sqlite:///{folder / 'mlflow.db'}", folder) as srv:
            yield srv


@contextmanager
def model_server(model_uri: str, tracking_uri: str, folder: Path, timeout: float = 180.0):
    """``mlflow models serve -m model_uri --env-manager local`` on 127.0.0.1, reading the
    registry at ``tracking_uri``; yields its base URL (POST {url}/invocations)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    # MLflow starts uvicorn by name: the environment's bin folder must be on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    # MLflow refuses to unpickle a model with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path,
           "OMP_NUM_THREADS": "1", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with background_server(cmd, folder, url, "/ping", "mlflow models serve", timeout, env):
        yield url


@dataclass(frozen=True)
class User:
    name: str
    password: str

    def env(self) -> dict[str, str]:
        """The environment MLflow's client takes this user's credentials from."""
        return {"MLFLOW_TRACKING_USERNAME": self.name, "MLFLOW_TRACKING_PASSWORD": self.password}


@contextmanager
def auth_tracking_server(
    folder: Path, worker: str = "worker"
) -> Iterator[tuple[MlflowServer, User]]:
    """``mlflow server --app-name basic-auth`` on 127.0.0.1 (SQLite stores under ``folder``)
    with a user ``worker`` created by the admin; yields the server and that user."""
    folder.mkdir(parents=True, exist_ok=True)
    admin = User("admin", uuid.uuid4().hex)
    config = folder / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
        f"admin_username = {admin.name}\n"
        f"admin_password = {admin.password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    # The auth app signs its CSRF tokens with this key (required; one per deployment).
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,
    }
    backend = f"sqlite:///{folder / 'mlflow.db'}"
    with mlflow_server(backend, folder, app_name="basic-auth", env=env) as server:
        from mlflow.server import get_app_client

        user = User(worker, uuid.uuid4().hex)
        saved = {k: os.environ.get(k) for k in admin.env()}
        os.environ.update(admin.env())
        try:
            get_app_client("basic-auth", tracking_uri=server.url).create_user(
                user.name, user.password
            )
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        yield server, user
