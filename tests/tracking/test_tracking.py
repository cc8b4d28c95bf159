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
    assert trial_run_name(conf, SimpleNamespace(number=7, user_attrs={})) == "trial-7"
    confirmation = SimpleNamespace(number=2, user_attrs={"confirms": 7, "seed": 1})
    assert trial_run_name(conf, confirmation) == "trial-7-seed-1"
    conf.tracking.run_name = "mine"
    assert trial_run_name(conf, SimpleNamespace(number=7, user_attrs={})) == "mine"
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


def test_the_champion_is_the_best_mean_over_seeds_not_the_luckiest_run(tmp_path):
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from finqa_exp.config import TrackingConfig
    from finqa_exp.tracking import MlflowTracker, RunStore, register_study_champion

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    tracker = MlflowTracker(TrackingConfig(uri=uri, artifact_location=str(tmp_path / "art")))
    storage = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    confirm = optuna.create_study(study_name="s.confirm", storage=storage, direction="maximize")
    dist = {"lr": FloatDistribution(1e-5, 1e-3)}
    # Trial 0 is the luckiest single run; over three seeds trial 1 is better.
    for number, (value, seeds) in enumerate([(0.50, (0.30, 0.31)), (0.45, (0.44, 0.46))]):
        run_id = tracker.start_run(f"trial-{number}", {})
        tracker.log_artifacts(adapter, "adapter")
        tracker.end_run("FINISHED")
        attrs = {names.RUN_ID_ATTR: run_id}
        study.add_trial(
            create_trial(
                value=value,
                params={"lr": 1e-4 * (number + 1)},
                distributions=dist,
                user_attrs=attrs,
            )
        )
        for seed, seed_value in zip((1, 2), seeds):
            confirm.add_trial(
                create_trial(
                    state=TrialState.COMPLETE, value=seed_value,
                    params={"lr": 1e-4 * (number + 1)}, distributions=dist,
                    user_attrs={"confirms": number, "seed": seed},
                )
            )  # fmt: skip
    champ = register_study_champion(uri, study)
    assert champ.run_id == study.trials[1].user_attrs[names.RUN_ID_ATTR]
    tags = RunStore(uri).client.get_model_version("s", champ.version).tags
    assert float(tags["objective_mean"]) == pytest.approx(0.45)
    assert tags["n_seeds"] == "3" and tags[names.TRIAL_NUMBER_TAG] == "1"
    assert float(tags["objective_std"]) == pytest.approx(0.01)
    assert tags[names.SEARCHED_TAG] == f"lr={study.trials[1].params['lr']}"


def test_a_server_that_authenticates_refuses_a_worker_without_credentials(monkeypatch):
    """The reachability check sends the credentials MLflow's client takes from the
    environment, and a 401 is one clear error (a server started with --app-name basic-auth;
    tests/sweep/test_cluster.py runs the real one)."""
    import base64
    import http.server
    import threading

    from finqa_exp.tracking import TrackingError, check_reachable

    good = "Basic " + base64.b64encode(b"worker:s3cret").decode()

    class BasicAuth(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.headers.get("Authorization") == good:
                self.send_error(404)  # an answer: no such experiment
            else:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
                self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), BasicAuth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for var in (
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_TRACKING_TOKEN",
        ):
            monkeypatch.delenv(var, raising=False)
        with pytest.raises(TrackingError, match=r"asks for credentials \(HTTP 401\): set "):
            check_reachable(uri)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "worker")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        with pytest.raises(TrackingError, match=r"refused these credentials \(HTTP 401\)"):
            check_reachable(uri)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
        check_reachable(uri)
    finally:
        server.shutdown()
        server.server_close()
