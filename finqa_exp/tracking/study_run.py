"""The sweep's MLflow parent run: one per Optuna study, each trial's run its child.

A Hydra sweeper callback (``hydra.sweeper.callbacks`` in conf/search/default.yaml); run by
``python -m finqa_exp -m``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from finqa_exp.config import TrackingConfig
from finqa_exp.tracking import names
from finqa_exp.tracking.runs import FAILED, FINISHED, KILLED, MlflowTracker
from finqa_exp.tracking.store import register_study_champion

log = logging.getLogger(__name__)

# What a tracking store says when two writers insert the same tag or metric row at once
# (SQLite, PostgreSQL, MySQL, through MLflow's SQL store or its server).
_CONCURRENT_WRITE = ("UniqueViolation", "UNIQUE constraint failed", "Duplicate entry",
                     "duplicate key value")  # fmt: skip


def concurrent_write(err: BaseException) -> bool:
    """True if ``err`` is the store refusing a row another writer inserted meanwhile."""
    return any(marker in str(err) for marker in _CONCURRENT_WRITE)


def retry_concurrent(write: Callable[[], Any], attempts: int = 4, wait_s: float = 0.2) -> Any:
    """``write()``, again if another writer won a race for the same row: MLflow's SQL store
    inserts a tag it has not seen, so of two workers setting one new tag, one fails; the
    tag exists then, and the retry updates it."""
    for attempt in range(attempts):
        try:
            return write()
        except Exception as err:
            if attempt == attempts - 1 or not concurrent_write(err):
                raise
            log.info("tracking store: a concurrent write of the same row; retrying (%s)", err)
            time.sleep(wait_s * (attempt + 1))


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

    PARENT_ATTR = names.PARENT_RUN_ATTR

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
                tags={names.STUDY_TAG: study.study_name, names.ROLE_TAG: "study"},
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
        from finqa_exp.sweep.confirm import confirmed, top_trials

        top_run = top_trials(study, 1)  # by the first objective of a multi-objective study
        best = top_run[0] if top_run else None
        # Workers sharing a study end it together and write the same summary: each write
        # may lose a race to another worker's (retry_concurrent).
        if best is not None:
            counts["best_value"] = float(best.values[0])
            counts["best_trial"] = float(best.number)

            top = confirmed(study)
            if top:  # the best mean over seeds (finqa_exp/sweep/confirm.py)
                counts["confirmed_best_trial"] = float(top[0].trial.number)
                counts["confirmed_best_mean"] = top[0].mean
                counts["confirmed_best_std"] = top[0].std
            tags = {f"best.{k}": str(v) for k, v in best.params.items()}
            retry_concurrent(lambda: self.tracker.set_tags(tags))
            self._register(study)
        retry_concurrent(lambda: self.tracker.log_metrics(counts))
        retry_concurrent(lambda: self.tracker.end_run(FINISHED))

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
            tag = {"champion": f"{champ.model_name}/{champ.version}"}
            retry_concurrent(lambda: self.tracker.set_tags(tag))

    def _close_leftover(self, trial: Any) -> None:
        """End a trial's run that is still RUNNING although its trial is over."""
        run_id = trial.user_attrs.get(names.RUN_ID_ATTR)
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
        status = {names.COMPLETE: FINISHED, names.PRUNED: KILLED}.get(state, FAILED)
        # Workers starting together close the same leftovers of a killed sweep.
        retry_concurrent(lambda: client.set_tag(run_id, names.STATE_TAG, state))
        client.set_terminated(run_id, status=status)
