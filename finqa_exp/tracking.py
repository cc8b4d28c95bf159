"""Experiment tracking: the one module that talks to MLflow.

The rest of the code calls a :class:`Tracker` (start a run, log params, metrics, tables
and folders, end the run with a status); ``tracking=none`` swaps in
:class:`NullTracker`, which records nothing. Runs land in the store at
``tracking.uri`` (default: ``mlflow.db`` in the project folder); browse them with::

    mlflow ui --backend-store-uri sqlite:///mlflow.db
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
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


class StudyRun:
    """Sweeper callback: one MLflow parent run per Optuna study, trials as its children.

    The parent run id is kept in the study's user attributes, so trial jobs in other
    processes (and later re-runs of the sweep) find it. At the start of every sweep process
    it also closes MLflow runs that a killed sweep left RUNNING, with the status their
    trial ended with; at the end it logs the best value and the trial counts, and registers
    the best trial's adapter as ``registered_model`` (``{study}``: the study's name) with
    alias ``champion_alias`` (null ``registered_model``: no registration). Used from
    ``conf/search/default.yaml``::

        hydra.sweeper.callbacks: [{_target_: finqa_exp.tracking.StudyRun, ...}]
    """

    PARENT_ATTR = "mlflow_parent_run_id"

    def __init__(
        self,
        backend: str = "mlflow",
        uri: str = "sqlite:///mlflow.db",
        experiment_name: str = "finqa",
        artifact_location: str | None = None,
        registered_model: str | None = "{study}",
        champion_alias: str = "champion",
    ):
        self.enabled = backend == "mlflow"
        self.registered_model = registered_model
        self.champion_alias = champion_alias
        self.cfg = TrackingConfig(
            backend=backend,
            uri=uri,
            experiment_name=experiment_name,
            artifact_location=artifact_location,
        )
        self._tracker: MlflowTracker | None = None
        self._created_parent: str | None = None

    @property
    def tracker(self) -> MlflowTracker:
        if self._tracker is None:
            self._tracker = MlflowTracker(self.cfg)
        return self._tracker

    def on_sweep_start(self, study: Any) -> None:
        if not self.enabled:
            return
        client = self.tracker.client
        parent = study.user_attrs.get(self.PARENT_ATTR)
        if parent is None:
            parent = client.create_run(
                self.tracker.experiment_id,
                run_name=study.study_name,
                tags={"study": study.study_name, "optuna_role": "study"},
            ).info.run_id
            study.set_user_attr(self.PARENT_ATTR, parent)
            self._created_parent = parent
        else:
            client.update_run(parent, status="RUNNING")
        for trial in study.get_trials(deepcopy=False):
            self._close_leftover(trial)

    def on_trial_end(self, study: Any, trial: Any) -> None:
        if self.enabled:
            self._close_leftover(trial)

    def on_sweep_end(self, study: Any) -> None:
        if not self.enabled:
            return
        parent = study.user_attrs.get(self.PARENT_ATTR)
        if parent is None:
            return
        self._merge_duplicate_parent(parent)
        counts: dict[str, float] = {}
        for trial in study.get_trials(deepcopy=False):
            key = f"trials_{trial.state.name.lower()}"
            counts[key] = counts.get(key, 0) + 1
        self.tracker.run_id = parent
        try:
            best = study.best_trial
        except ValueError:  # no complete trial (or multi-objective)
            best = None
        if best is not None:
            counts["best_value"] = float(best.value)
            counts["best_trial"] = float(best.number)
            self.tracker.set_tags({f"best.{k}": str(v) for k, v in best.params.items()})
            self._register(study)
        self.tracker.log_metrics(counts)
        self.tracker.end_run(FINISHED)

    def _merge_duplicate_parent(self, parent: str) -> None:
        """Workers that open a new study together may each create a parent run; the study
        keeps the last one written. Move this worker's other one's children to it and
        delete it, so the study has one parent and nothing is left RUNNING."""
        mine = self._created_parent
        if mine is None or mine == parent:
            return
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        client = self.tracker.client
        children = client.search_runs(
            [self.tracker.experiment_id], f"tags.mlflow.parentRunId = '{mine}'"
        )
        for run in children:
            client.set_tag(run.info.run_id, MLFLOW_PARENT_RUN_ID, parent)
        client.set_terminated(mine, status=KILLED)
        client.delete_run(mine)
        self._created_parent = None

    def _register(self, study: Any) -> None:
        """Point the champion alias at the best trial's adapter (a tag on the parent says which)."""
        if not self.registered_model:
            return
        try:
            champ = register_study_champion(
                self.cfg.uri, study, self.registered_model, self.champion_alias
            )
        except Exception:
            # The study and its runs are already recorded; a registry hiccup must not turn a
            # finished sweep into a failed one. `python -m finqa_exp.report` registers again.
            log.warning("could not register the study's champion", exc_info=True)
            return
        if champ is not None:
            log.info(
                "champion: %s version %s (run %s)", champ.model_name, champ.version, champ.run_id
            )
            self.tracker.set_tags({"champion": f"{champ.model_name}/{champ.version}"})

    def _close_leftover(self, trial: Any) -> None:
        """End a trial's run that is still RUNNING although its trial is over."""
        run_id = trial.user_attrs.get("mlflow_run_id")
        state = trial.state.name
        if run_id is None or state in ("RUNNING", "WAITING"):
            return
        client = self.tracker.client
        try:
            run = client.get_run(run_id)
        except Exception:  # run deleted meanwhile: nothing to close
            return
        if run.info.status != "RUNNING":
            return
        status = {"COMPLETE": FINISHED, "PRUNED": KILLED}.get(state, FAILED)
        client.set_tag(run_id, "optuna_state", state)
        client.set_terminated(run_id, status=status)


# ----------------------------------------------------------------------------- reading runs
# Reports (finqa_exp/report.py) and `ask` (finqa_exp/ask.py) read the store and keep its
# champions through these; like the rest of this module, they are the only MLflow calls.

CHAMPION_ALIAS = "champion"


@dataclass(frozen=True)
class RunRecord:
    """What a report needs of one run: its status, params, latest metrics and tags."""

    run_id: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]


@dataclass(frozen=True)
class Champion:
    """A registered model version that an alias (``champion``) points at."""

    model_name: str
    version: str
    run_id: str
    alias: str
    created: bool = False  # True when this call registered a new version


class RunStore:
    """One MLflow store read by run id: runs, metric histories, artifacts, champions.

    ``uri`` is ``tracking.uri``; the Model Registry is kept in the same store (an SQLite
    file or a tracking server both hold one).
    """

    def __init__(self, uri: str):
        from mlflow import MlflowClient

        self.uri = uri
        # Reading must not create a store: MLflow would make an empty database and say
        # nothing is in it, hiding a wrong path.
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
            raise TrackingError(f"tracking.uri={uri}: no MLflow store there")
        # Reports and `ask` print their own results; MLflow's download bars would bury them.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        try:
            self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        except Exception as err:
            raise TrackingError(f"tracking.uri={redact(uri)}: cannot open: {err}") from err

    def run(self, run_id: str) -> RunRecord | None:
        """The run, or None if the store has no such run (deleted, or another store)."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        return RunRecord(
            run_id=run.info.run_id,
            status=run.info.status,
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
            tags=dict(run.data.tags),
        )

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every logged value of a metric, by step (last write wins)."""
        points = sorted(
            self.client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)
        )
        return sorted({m.step: m.value for m in points}.items())

    def has_artifact(self, run_id: str, path: str) -> bool:
        parent, _, _ = path.rpartition("/")
        try:
            listed = self.client.list_artifacts(run_id, parent or None)
        except Exception:  # artifact store gone (moved or deleted folder)
            return False
        return any(item.path == path for item in listed)

    def download(self, run_id: str, path: str, dst: str | Path) -> Path:
        """Copy an artifact file or folder of the run into ``dst``; returns its local path."""
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, path, str(dst)))

    def text(self, run_id: str, path: str) -> str | None:
        """A text artifact (``config.yaml``), or None if the run has none."""
        import tempfile

        if not self.has_artifact(run_id, path):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return self.download(run_id, path, tmp).read_text(encoding="utf-8")

    def table(self, run_id: str, path: str) -> list[dict[str, Any]]:
        """Rows of a table logged with ``log_table`` (``samples.json``); [] if absent."""
        import json

        text = self.text(run_id, path)
        if text is None:
            return []
        table = json.loads(text)
        return [dict(zip(table["columns"], row)) for row in table["data"]]

    # ------------------------------------------------------------------------- registry

    def champion(self, model_name: str, alias: str = CHAMPION_ALIAS) -> Champion | None:
        """The version ``alias`` points at, or None (no such model, or no alias yet)."""
        from mlflow.exceptions import MlflowException

        try:
            version = self.client.get_model_version_by_alias(model_name, alias)
        except MlflowException:
            return None
        return Champion(model_name, str(version.version), version.run_id, alias)

    def champions(self, alias: str = CHAMPION_ALIAS) -> list[Champion]:
        """Every registered model that has ``alias``, by name."""
        found = []
        for model in self.client.search_registered_models():
            if alias in (model.aliases or {}):
                champ = self.champion(model.name, alias)
                if champ is not None:
                    found.append(champ)
        return sorted(found, key=lambda c: c.model_name)

    def register_champion(
        self,
        model_name: str,
        run_id: str,
        artifact_path: str = "adapter",
        alias: str = CHAMPION_ALIAS,
        tags: dict[str, str] | None = None,
    ) -> Champion:
        """Point ``alias`` of ``model_name`` at the run's ``artifact_path``; idempotent.

        Nothing is written when the alias already points at this run; a run registered
        before (the champion moved away and back) gets its old version again, so versions
        stay one per run.
        """
        current = self.champion(model_name, alias)
        if current is not None and current.run_id == run_id:
            return current
        if not self.has_artifact(run_id, artifact_path):
            raise TrackingError(f"run {run_id} has no '{artifact_path}' artifact to register")
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                model_name, description="Best LoRA adapter of a finqa-exp study"
            )
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
        quoted = model_name.replace("'", "\\'")
        earlier = self.client.search_model_versions(
            f"name = '{quoted}' and run_id = '{run_id}'", order_by=["version_number ASC"]
        )
        if earlier:
            version, created = str(earlier[0].version), False
        else:
            source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
            mv = self.client.create_model_version(model_name, source, run_id=run_id, tags=tags)
            version, created = str(mv.version), True
        self.client.set_registered_model_alias(model_name, alias, version)
        return Champion(model_name, version, run_id, alias, created)


def champion_name(template: str, study_name: str) -> str:
    """Registered model name for a study: ``{study}`` in ``template`` is its name."""
    return template.replace("{study}", study_name)


def register_study_champion(
    uri: str, study: Any, template: str = "{study}", alias: str = CHAMPION_ALIAS
) -> Champion | None:
    """Register the adapter of the study's best complete trial; None if it has none."""
    try:
        best = study.best_trial
    except (ValueError, RuntimeError):  # no complete trial, or a multi-objective study
        return None
    run_id = best.user_attrs.get("mlflow_run_id")
    if run_id is None:
        return None
    tags = {
        "study": study.study_name,
        "trial_number": str(best.number),
        "objective": repr(float(best.value)),
    }
    return RunStore(uri).register_champion(
        champion_name(template, study.study_name), run_id, alias=alias, tags=tags
    )
