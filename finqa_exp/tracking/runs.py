"""Writing runs: the :class:`Tracker` protocol the trial talks to, MLflow's (through
``MlflowClient``: no global fluent state, so it works the same in sweep workers,
subprocesses and tests) and a do-nothing one (``tracking=none``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

from finqa_exp.config import TrackingConfig
from finqa_exp.tracking import names
from finqa_exp.tracking.reach import TrackingError, check_reachable, redact

# MLflow run statuses by how a trial ended.
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"


class Tracker(Protocol):
    run_id: str | None

    def start_run(
        self, run_name: str | None, tags: dict[str, str], parent_run_id: str | None = None
    ) -> str | None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(
        self, metrics: dict[str, float], step: int | None = None, model_id: str | None = None
    ) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None: ...
    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None: ...
    def log_model(self, name: str, code_path: str | Path, artifacts: dict[str, str],
                  model_config: dict[str, Any], example: tuple[list[str], list[str]],
                  params: dict[str, Any], tags: dict[str, str]) -> str | None: ...  # fmt: skip
    def continue_from(self, run_id: str, up_to_step: int, keys: tuple[str, ...]) -> None: ...
    def end_run(self, status: str) -> None: ...


class NullTracker:
    """Records nothing (``tracking=none``, and fast tests)."""

    run_id: str | None = None

    def start_run(self, run_name, tags, parent_run_id=None):
        return None

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step=None, model_id=None):
        pass

    def set_tags(self, tags):
        pass

    def log_text(self, text, artifact_file):
        pass

    def log_table(self, rows, artifact_file):
        pass

    def log_artifacts(self, local_dir, artifact_path):
        pass

    def log_model(self, name, code_path, artifacts, model_config, example, params, tags):
        return None

    def continue_from(self, run_id, up_to_step, keys):
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

    def log_metrics(self, metrics, step=None, model_id=None):
        """``model_id``: the metrics are also the logged model's (its UI page lists them)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0, model_id=model_id) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags):
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, redact(str(value)))

    def log_text(self, text, artifact_file):
        self.client.log_text(self.run_id, redact(text), artifact_file)

    def log_table(self, rows, artifact_file):
        import pandas as pd

        self.client.log_table(self.run_id, data=pd.DataFrame(rows), artifact_file=artifact_file)

    def log_artifacts(self, local_dir, artifact_path):
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_model(self, name, code_path, artifacts, model_config, example, params, tags):
        """A pyfunc model linked to this run (tracking/models.py); returns its id."""
        from finqa_exp.tracking.models import log_pyfunc_model

        return log_pyfunc_model(
            self.client, self.experiment_id, self.run_id, name, code_path, artifacts,
            model_config, example, params, tags,
        )  # fmt: skip

    def continue_from(self, run_id, up_to_step, keys):
        """This run continues run ``run_id`` (a trial resumed from its checkpoint): the
        histories of ``keys`` up to ``up_to_step`` are copied here, so that its curves start
        at step 0, and each run names the other in a tag."""
        from mlflow.entities import Metric

        items = [
            Metric(key, m.value, m.timestamp, m.step)
            for key in keys
            for m in self.client.get_metric_history(run_id, key)
            if m.step <= up_to_step
        ]
        for start in range(0, len(items), 1000):  # MLflow caps a batch at 1000 metrics
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])
        self.set_tags({names.RESUMED_FROM_TAG: run_id, names.RESUMED_AT_TAG: str(up_to_step)})
        self.client.set_tag(run_id, names.RESUMED_BY_TAG, self.run_id)

    def end_run(self, status):
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
            self.run_id = None


# How long the first contact with a tracking store may take. MLflow's own client retries an
# unreachable server for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT)
# and a database for over a minute; a wrong or stopped store should fail in seconds instead.


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
