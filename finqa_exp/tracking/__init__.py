"""Experiment tracking: the one package that talks to MLflow.

The rest of the code calls a :class:`Tracker` (start a run, log params, metrics, tables
and folders, end the run with a status); ``tracking=none`` swaps in
:class:`NullTracker`, which records nothing. Runs land in the store at
``tracking.uri`` (default: ``mlflow.db`` in the project folder); browse them with::

    mlflow ui --backend-store-uri sqlite:///mlflow.db

By job: ``runs`` writes runs; ``trial_run`` is a trial's run from start to how it ended;
``study_run`` the sweep's parent run; ``models`` logs a trial's MLflow model and reads it
back; ``store`` reads runs back (reports, ``ask``) and registers champions; ``reach``
checks the store can be reached and masks passwords; ``environment`` tags a run with its
commit, versions and device; ``names`` holds the names records go under. Only this package
imports mlflow, besides the model file that MLflow itself loads
(finqa_exp/serving/pyfunc_model.py).
"""

from finqa_exp.tracking import names
from finqa_exp.tracking.environment import environment_tags
from finqa_exp.tracking.reach import TrackingError, check_reachable, redact
from finqa_exp.tracking.runs import (
    FAILED,
    FINISHED,
    KILLED,
    MlflowTracker,
    NullTracker,
    Tracker,
    make_tracker,
)
from finqa_exp.tracking.store import (
    CHAMPION_ALIAS,
    Champion,
    RunRecord,
    RunStore,
    champion_name,
    champion_tags,
    register_study_champion,
)
from finqa_exp.tracking.study_run import StudyRun

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
    "champion_tags",
    "check_reachable",
    "environment_tags",
    "make_tracker",
    "names",
    "redact",
    "register_study_champion",
]
