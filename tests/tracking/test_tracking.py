"""Tracking units: what a trial's run is named and tagged, its phase timings, and that no
password reaches the store."""

from __future__ import annotations

import pytest

from finqa_exp.tracking import names
from finqa_exp.tracking.trial_run import trial_run_name, trial_run_tags
from tests.conftest import compose_cfg


def test_a_trial_run_is_named_for_its_trial_and_tagged_with_its_config(tmp_path):
    from types import SimpleNamespace

    from finqa_exp.config import validate

    conf = validate(compose_cfg([], tmp_path))
    assert trial_run_name(conf, None) == f"{conf.model.name}-{conf.data.name}"
    assert trial_run_name(conf, SimpleNamespace(number=7)) == "trial-7"
    conf.tracking.run_name = "mine"
    assert trial_run_name(conf, SimpleNamespace(number=7)) == "mine"
    tags = trial_run_tags(conf, "cpu:2 cores")
    assert tags[names.MODEL_TAG] == conf.model.name and tags[names.DATA_TAG] == conf.data.name
    assert tags[names.EXPERIMENT_TAG] == "default"
    assert tags["device"] == "cpu:2 cores"


def test_phase_times_add_up_and_overhead_is_their_complement():
    from finqa_exp.tracking.trial_run import phase_metrics

    timings = phase_metrics({"load": 1.0, "train": 6.0, "generate_tuned": 2.0, "save": 0.5}, 10.0)
    assert timings["time_train_s"] == 6.0 and timings["trial_time_s"] == 10.0
    assert timings["overhead_share"] == pytest.approx(0.2)  # (10 - 6 - 2) / 10


def test_no_password_reaches_the_tracking_store(tmp_path):
    """A password inside a storage or tracking URL never lands in params, tags or artifacts."""
    from mlflow import MlflowClient

    from finqa_exp.config import TrackingConfig
    from finqa_exp.tracking import MlflowTracker, redact

    assert (
        redact("postgresql://finqa:s3cret@db:5432/optuna")
        == "postgresql://finqa:***@db:5432/optuna"
    )
    assert redact("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MlflowTracker(TrackingConfig(uri=uri, artifact_location=str(tmp_path / "art")))
    run_id = tracker.start_run("secret-check", {})
    secret_url = "postgresql+psycopg://finqa:s3cret@10.0.0.5/optuna"
    tracker.log_params({"hydra.sweeper.storage": secret_url, "train.learning_rate": 1e-3})
    tracker.set_tags({"error": f"OperationalError: could not connect to {secret_url}"})
    tracker.log_text(f"storage: {secret_url}\n", "config.yaml")
    tracker.end_run("FINISHED")
    run = MlflowClient(uri).get_run(run_id)
    text = (tmp_path / "art").rglob("config.yaml").__next__().read_text()
    everything = [*run.data.params.values(), *run.data.tags.values(), text]
    assert not [v for v in everything if "s3cret" in v]
    assert (
        run.data.params["hydra.sweeper.storage"] == "postgresql+psycopg://finqa:***@10.0.0.5/optuna"
    )
