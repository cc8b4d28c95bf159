"""Reading runs back: the MLflow store by run id, and the study champions it registers.

Reports (``python -m finqa_exp.report``, finqa_exp/report/data.py) and ``python -m
finqa_exp.ask`` read the store through :class:`RunStore`; the sweep registers each study's
best adapter with :func:`register_study_champion`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finqa_exp.tracking import names
from finqa_exp.tracking.reach import TrackingError, redact

if TYPE_CHECKING:
    from finqa_exp.sweep.confirm import Confirmed

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
    # The MLflow model it is (tracking/models.py); None for a bare adapter folder (a run
    # logged before trials logged models, or with tracking.log_adapter=false).
    model_id: str | None = None
    source: str | None = None  # where the version's files are


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
        return Champion(
            model_name, str(version.version), version.run_id, alias,
            model_id=model_id_of(version.source), source=version.source,
        )  # fmt: skip

    def model_location(self, model_id: str) -> str:
        """Where a logged model's files are (its artifact location)."""
        return self.client.get_logged_model(model_id).artifact_location

    def version_tags(self, champ: Champion) -> dict[str, str]:
        """The registered version's tags (study, trial, objective, confirmed mean)."""
        return dict(self.client.get_model_version(champ.model_name, champ.version).tags)

    def logged_model(self, run_id: str) -> Any | None:
        """The run's logged MLflow model (tracking/models.py), or None."""
        from finqa_exp.tracking.models import run_model

        return run_model(self.client, run_id)

    def download_model(self, source: str, dst: str | Path) -> Path:
        """A logged model's folder (``source``: a version's or a model's location)."""
        from finqa_exp.tracking.models import download_model

        return download_model(self.uri, source, dst)

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
        artifact_path: str = names.ADAPTER_ARTIFACT,
        alias: str = CHAMPION_ALIAS,
        tags: dict[str, str] | None = None,
    ) -> Champion:
        """Point ``alias`` of ``model_name`` at the run's logged model; idempotent.

        A run with no logged model (logged before trials logged models) registers its
        ``artifact_path`` folder instead, which ``ask`` can use but MLflow cannot serve.
        Nothing is written when the alias already points at this run's model with these
        tags; a run registered before (the champion moved away and back) gets its old
        version again, so versions stay one per model, with its tags brought up to date (a
        confirmation since may have changed its mean).
        """
        model = self.logged_model(run_id)
        model_id = model.model_id if model is not None else None
        current = self.champion(model_name, alias)
        if current is not None and current.run_id == run_id and current.model_id == model_id:
            self._update_tags(model_name, current.version, tags or {})
            return current
        if model is None and not self.has_artifact(run_id, artifact_path):
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
        earlier = [
            v
            for v in self.client.search_model_versions(
                f"name = '{quoted}' and run_id = '{run_id}'", order_by=["version_number ASC"]
            )
            if model_id_of(v.source) == model_id
        ]
        if earlier:
            version, created, source = str(earlier[0].version), False, earlier[0].source
            self._update_tags(model_name, version, tags or {})
        else:
            if model is not None:
                source = model.model_uri  # models:/<id>: the UI links version and model
            else:
                source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
            with _global_tracking_uri(self.uri):
                mv = self.client.create_model_version(
                    model_name, source, run_id=run_id, tags=tags, model_id=model_id
                )
            version, created = str(mv.version), True
        self.client.set_registered_model_alias(model_name, alias, version)
        return Champion(model_name, version, run_id, alias, created, model_id, source)

    def _update_tags(self, model_name: str, version: str, tags: dict[str, str]) -> None:
        have = self.client.get_model_version(model_name, version).tags
        for key, value in tags.items():
            if have.get(key) != value:
                self.client.set_model_version_tag(model_name, version, key, value)


@contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's SQL registry looks a ``models:/`` source up through the process's global
    tracking URI (a TODO of theirs), not the client's: point it at this store meanwhile.
    MLflow's own switch unsets MLFLOW_TRACKING_URI on the way back; it is restored here."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def model_id_of(source: str | None) -> str | None:
    """The logged model a registry version's source names (``models:/m-...``), or None."""
    if source and source.startswith("models:/m-"):
        return source.removeprefix("models:/").split("/")[0]
    return None


def champion_name(template: str, study_name: str) -> str:
    """Registered model name for a study: ``{study}`` in ``template`` is its name."""
    return template.replace("{study}", study_name)


def champion_tags(
    study: str,
    trial_number: int,
    value: float,
    confirmed: Confirmed | None = None,
    params: dict[str, Any] | None = None,
) -> dict[str, str]:
    """What a champion's model version records: its study, trial and objective, the values
    the study searched (``searched``: ``key=value, ...``), and for a configuration confirmed
    over seeds its mean, spread and values (the trial's own first)."""
    tags = {
        names.STUDY_TAG: study,
        names.TRIAL_NUMBER_TAG: str(trial_number),
        "objective": repr(float(value)),
    }
    if params:
        tags[names.SEARCHED_TAG] = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
    if confirmed is not None and len(confirmed.values) > 1:
        tags.update(
            objective_mean=repr(confirmed.mean),
            objective_std=repr(confirmed.std),
            n_seeds=str(len(confirmed.values)),
            objective_values=" ".join(repr(float(v)) for v in confirmed.values),
        )
    return tags


def register_study_champion(
    uri: str, study: Any, template: str = "{study}", alias: str = CHAMPION_ALIAS
) -> Champion | None:
    """Register the adapter of the study's best configuration: the best mean over seeds
    among the confirmed trials (finqa_exp/sweep/confirm.py), else the best complete trial
    (by the first objective of a multi-objective study); None if it has none. The
    version's tags say which, and its mean, spread and seeds."""
    from finqa_exp.sweep.confirm import confirmed, top_trials

    top = top_trials(study, 1)  # by the first objective, in a multi-objective study
    if not top:
        return None
    best, top_mean = top[0], None
    confirmations = confirmed(study)
    if confirmations:
        top_mean = confirmations[0]
        best = top_mean.trial
    run_id = best.user_attrs.get(names.RUN_ID_ATTR)
    if run_id is None:
        return None
    tags = champion_tags(
        study.study_name, best.number, float(best.values[0]), top_mean, best.params
    )
    return RunStore(uri).register_champion(
        champion_name(template, study.study_name), run_id, alias=alias, tags=tags
    )
