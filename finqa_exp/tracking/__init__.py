"""Experiment tracking: the one module that talks to MLflow.

The rest of the code calls a :class:`Tracker` (start a run, log params, metrics, tables
and folders, end the run with a status); ``tracking=none`` swaps in
:class:`NullTracker`, which records nothing. Runs land in the store at
``tracking.uri`` (default: ``mlflow.db`` in the project folder); browse them with::

    mlflow ui --backend-store-uri sqlite:///mlflow.db

Writing runs is here; the sweep's parent run is in :mod:`finqa_exp.tracking.study_run`,
reading runs back (reports, ``ask``, champions) in :mod:`finqa_exp.tracking.store`. Only
this package imports mlflow.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from finqa_exp.config import TrackingConfig

log = logging.getLogger(__name__)

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "optuna", "mlflow", "finqa-exp")
# MLflow run statuses by how a trial ended.
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"


class TrackingError(RuntimeError):
    """The tracking store cannot be used; raised before any training starts."""


class Tracker(Protocol):
    run_id: str | None

    def start_run(
        self, run_name: str | None, tags: dict[str, str], parent_run_id: str | None = None
    ) -> str | None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None: ...
    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None: ...
    def end_run(self, status: str) -> None: ...


class NullTracker:
    """Records nothing (``tracking=none``, and fast tests)."""

    run_id: str | None = None

    def start_run(self, run_name, tags, parent_run_id=None):
        return None

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def set_tags(self, tags):
        pass

    def log_dict(self, data, artifact_file):
        pass

    def log_text(self, text, artifact_file):
        pass

    def log_table(self, rows, artifact_file):
        pass

    def log_artifacts(self, local_dir, artifact_path):
        pass

    def end_run(self, status):
        pass


class MlflowTracker:
    """One MLflow run at a time, through MlflowClient (no global fluent state, so it works
    the same in sweep workers, subprocesses and tests)."""

    def __init__(self, cfg: TrackingConfig):
        from mlflow import MlflowClient

        check_reachable(cfg.uri)
        self.cfg = cfg
        self.client = MlflowClient(tracking_uri=cfg.uri)
        self.run_id: str | None = None
        self.experiment_id = self._experiment_id()

    def _experiment_id(self) -> str:
        try:
            exp = self.client.get_experiment_by_name(self.cfg.experiment_name)
            if exp is not None:
                return exp.experiment_id
            return self.client.create_experiment(
                self.cfg.experiment_name,
                artifact_location=_artifact_uri(self.cfg),
                # Marks these as training runs for MLflow UIs that pick their view (GenAI
                # or model training) by experiment kind.
                tags={"mlflow.experimentKind": "custom_model_development"},
            )
        except Exception as err:
            if "already exists" in str(err):  # created by a parallel worker meanwhile
                return self.client.get_experiment_by_name(self.cfg.experiment_name).experiment_id
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TrackingError(
                f"tracking.uri={redact(self.cfg.uri)}: cannot use the tracking store: {first}"
            ) from err

    def start_run(self, run_name, tags, parent_run_id=None):
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        tags = dict(tags)
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params):
        from mlflow.entities import Param

        items = [Param(k, _param_value(redact(str(v)))) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics, step=None):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags):
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, redact(str(value)))

    def log_dict(self, data, artifact_file):
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text, artifact_file):
        self.client.log_text(self.run_id, redact(text), artifact_file)

    def log_table(self, rows, artifact_file):
        import pandas as pd

        self.client.log_table(self.run_id, data=pd.DataFrame(rows), artifact_file=artifact_file)

    def log_artifacts(self, local_dir, artifact_path):
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def end_run(self, status):
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
            self.run_id = None


# How long the first contact with a tracking store may take. MLflow's own client retries an
# unreachable server for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT)
# and a database for over a minute; a wrong or stopped store should fail in seconds instead.
REACH_TIMEOUT_S = 5.0
_DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def check_reachable(uri: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """TrackingError within ``timeout`` seconds if the store at ``uri`` cannot be reached.

    A tracking server (``http(s)://``) must answer one request to its REST API, without
    retries and below HTTP 500 (a 404 or 401 is an answer); a database server
    (``postgresql://``, ``mysql://``, ``mssql://``) must accept a TCP connection. Local
    stores (``sqlite:///``, folders) are made on first use, so there is nothing to reach.
    Creates nothing anywhere.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0].lower()
    if scheme in ("http", "https"):
        reason = _http_unreachable(uri, timeout)
    elif scheme in _DB_PORTS:
        reason = _tcp_unreachable(parts, _DB_PORTS[scheme], timeout)
    else:
        reason = None
    if reason:
        # No exception chain: the reason is the whole story, and callers print one line.
        raise TrackingError(f"tracking.uri={redact(uri)}: {reason}")


def _http_unreachable(uri: str, timeout: float) -> str | None:
    import requests
    from mlflow.utils.credentials import get_default_host_creds

    # The endpoint the tracker calls first; the TLS settings MLflow's client would use.
    creds = get_default_host_creds(uri)
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name"
    try:
        resp = requests.get(
            url,
            params={"experiment_name": "Default"},
            timeout=timeout,
            verify=creds.verify,
            cert=creds.client_cert_path,
        )
    except requests.Timeout:
        return f"cannot reach the tracking server: no answer in {timeout:g} s"
    except requests.RequestException as err:
        return f"cannot reach the tracking server: {_os_reason(err)}"
    if resp.status_code >= 500:
        return f"the tracking server answered HTTP {resp.status_code} {resp.reason}"
    return None


def _tcp_unreachable(parts: Any, default_port: int, timeout: float) -> str | None:
    import socket

    try:
        host, port = parts.hostname, parts.port or default_port
    except ValueError:  # several hosts, or an odd port: leave it to the driver
        return None
    if not host:  # a local socket
        return None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except TimeoutError:
        return f"cannot reach the database server {host}:{port}: no answer in {timeout:g} s"
    except OSError as err:
        return f"cannot reach the database server {host}:{port}: {_os_reason(err)}"


def _os_reason(err: BaseException) -> str:
    """Short words for a failed connection ("Connection refused"), not urllib3's wrapping."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\] ([^'\"\])]+)", text)
    if found:
        return found.group(1).strip()
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    if "SSLError" in text or "SSL:" in text:
        return "the TLS handshake failed (not an https server, or an untrusted certificate)"
    if "RemoteDisconnected" in text or "Connection aborted" in text:
        return "it closed the connection without an answer (not an MLflow server?)"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return first[:200]


def make_tracker(cfg: TrackingConfig) -> Tracker:
    """The configured tracker; checks the store is reachable (TrackingError if not)."""
    return MlflowTracker(cfg) if cfg.backend == "mlflow" else NullTracker()


def _artifact_uri(cfg: TrackingConfig) -> str | None:
    if not cfg.artifact_location:
        return None
    loc = cfg.artifact_location
    return loc if "://" in loc else Path(loc).resolve().as_uri()


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


# user:password@ in any URL (postgresql://, http://, mysql+pymysql://, ...).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][\w+.-]*://[^\s:/@]+:)[^\s@/]+@")


def redact(text: str) -> str:
    """``text`` with every URL password masked: ``postgresql://user:***@host/db``."""
    return _URL_PASSWORD.sub(r"\g<head>***@", text)


def _git(*args: str) -> str:
    # The commit of the code that ran: the checkout holding this package, wherever the
    # command was started.
    return subprocess.run(
        ["git", *args],
        cwd=Path(__file__).resolve().parent,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.strip()


def environment_tags(device: str) -> dict[str, str]:
    """Git commit (and whether the checkout had local changes), package versions and device."""
    tags = {"device": device}
    try:
        commit = _git("rev-parse", "HEAD")
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
        tags["git_dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
    except (OSError, subprocess.SubprocessError):
        tags["git_commit"] = "unknown"  # installed from a wheel, or git missing
    for pkg in PACKAGES:
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            tags[f"version.{pkg}"] = "not installed"
    return tags


# The sweep callback and the reading side, under the names the rest of the code (and
# conf/search/default.yaml's `finqa_exp.tracking.StudyRun`) uses.
from finqa_exp.tracking.store import (  # noqa: E402
    CHAMPION_ALIAS,
    Champion,
    RunRecord,
    RunStore,
    champion_name,
    register_study_champion,
)
from finqa_exp.tracking.study_run import StudyRun  # noqa: E402

__all__ = [
    "CHAMPION_ALIAS",
    "FAILED",
    "FINISHED",
    "KILLED",
    "Champion",
    "MlflowTracker",
    "NullTracker",
    "RunRecord",
    "RunStore",
    "StudyRun",
    "Tracker",
    "TrackingError",
    "champion_name",
    "check_reachable",
    "environment_tags",
    "make_tracker",
    "redact",
    "register_study_champion",
]
