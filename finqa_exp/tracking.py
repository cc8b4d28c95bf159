"""Experiment tracking: the one module that talks to MLflow.

The rest of the code calls a :class:`Tracker` (start a run, log params, metrics, tables
and folders, end the run with a status); ``tracking=none`` swaps in
:class:`NullTracker`, which records nothing. Runs land in the store at
``tracking.uri`` (default: ``mlflow.db`` in the project folder); browse them with::

    mlflow ui --backend-store-uri sqlite:///mlflow.db
"""

from __future__ import annotations

import logging
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

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics, step=None):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags):
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_dict(self, data, artifact_file):
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text, artifact_file):
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, rows, artifact_file):
        import pandas as pd

        self.client.log_table(self.run_id, data=pd.DataFrame(rows), artifact_file=artifact_file)

    def log_artifacts(self, local_dir, artifact_path):
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def end_run(self, status):
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
            self.run_id = None


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


def redact(uri: str) -> str:
    """``uri`` without a password (``postgresql://user:***@host/db``)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


def environment_tags(root_dir: str | Path, device: str) -> dict[str, str]:
    """Git commit, package versions and device, as run tags."""
    tags = {"device": device}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root_dir,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
    except (OSError, subprocess.SubprocessError):
        tags["git_commit"] = "unknown"
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
    trial ended with; at the end it logs the best value and the trial counts. Used from
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
    ):
        self.enabled = backend == "mlflow"
        self.cfg = TrackingConfig(
            backend=backend,
            uri=uri,
            experiment_name=experiment_name,
            artifact_location=artifact_location,
        )
        self._tracker: MlflowTracker | None = None

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
        self.tracker.log_metrics(counts)
        self.tracker.end_run(FINISHED)

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
