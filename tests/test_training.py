"""Training pieces: Trainer arguments from config, and the NaN guard."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerControl, TrainerState

from finqa_exp.config import TrainConfig
from finqa_exp.tracking import NullTracker
from finqa_exp.training import (
    LossHistory,
    MetricsCallback,
    NonFiniteLossError,
    PruningCallback,
    training_arguments,
)


def test_training_arguments_from_config(tmp_path):
    cfg = TrainConfig(learning_rate=2e-4, batch_size=8, epochs=3, warmup_steps=100)
    args = training_arguments(cfg, tmp_path, torch.device("cpu"), has_eval=True)
    assert (args.learning_rate, args.per_device_train_batch_size) == (2e-4, 8)
    assert (args.num_train_epochs, args.warmup_steps) == (3, 100)
    assert args.lr_scheduler_type.value == "linear"
    assert args.eval_strategy.value == "epoch"
    assert args.train_sampling_strategy == "group_by_length"
    assert args.logging_nan_inf_filter is False  # NaN must reach the guard
    assert not args.bf16 and not args.fp16  # no autocast on CPU
    assert training_arguments(cfg, tmp_path, torch.device("cpu"), False).eval_strategy.value == "no"


def state(step):
    s = TrainerState()
    s.global_step = step
    return s


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_stops_the_trial(bad):
    cb = MetricsCallback(NullTracker(), LossHistory())
    cb.on_log(None, state(5), TrainerControl(), logs={"loss": 1.5})
    with pytest.raises(NonFiniteLossError, match=f"loss is {bad} at step 10"):
        cb.on_log(None, state(10), TrainerControl(), logs={"loss": bad})


def test_metrics_callback_records_history():
    history = LossHistory()
    cb = MetricsCallback(NullTracker(), history)
    cb.on_log(None, state(5), TrainerControl(), logs={"loss": 2.0, "learning_rate": 1e-3})
    cb.on_log(None, state(10), TrainerControl(), logs={"eval_loss": 1.5})
    assert history.train == [(5, 2.0)] and history.eval == [(10, 1.5)]


class FakeTrial:
    def __init__(self, prune):
        self.reported, self.prune = [], prune

    def report(self, value, step):
        self.reported.append((step, value))

    def should_prune(self):
        return self.prune


def test_pruning_callback_reports_in_the_study_direction():
    import optuna

    trial = FakeTrial(prune=False)
    PruningCallback(trial, maximize=True).on_evaluate(
        None, state(3), None, metrics={"eval_loss": 2.0}
    )
    assert trial.reported == [(3, -2.0)]
    with pytest.raises(optuna.TrialPruned):
        PruningCallback(FakeTrial(prune=True), maximize=False).on_evaluate(
            None, state(4), None, metrics={"eval_loss": 2.0}
        )


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
