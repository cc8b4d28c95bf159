"""Training pieces: Trainer arguments from config, and the NaN guard."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl, TrainerState

from finqa_exp.config import TrainConfig
from finqa_exp.tracking import NullTracker
from finqa_exp.training import (
    STEP_UNIT,
    EvalSchedule,
    FractionalEpochEval,
    LossHistory,
    MetricsCallback,
    NonFiniteLossError,
    PruningCallback,
    examples_seen,
    steps_per_epoch,
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
        self.reported, self.prune, self.user_attrs = [], prune, {}

    def report(self, value, step):
        self.reported.append((step, value))

    def should_prune(self):
        return self.prune

    def set_user_attr(self, key, value):
        self.user_attrs[key] = value


def at_epoch(step, epoch):
    s = state(step)
    s.epoch = epoch
    return s


def test_pruning_callback_reports_in_the_study_direction():
    import optuna

    trial = FakeTrial(prune=False)
    args = SimpleNamespace(train_batch_size=16)
    PruningCallback(trial, maximize=True, train_examples=333).on_evaluate(
        args, at_epoch(21, 1.0), None, metrics={"eval_loss": 2.0}
    )
    assert trial.reported == [(333, -2.0)] and trial.user_attrs["step_unit"] == STEP_UNIT
    with pytest.raises(optuna.TrialPruned, match="after 80 training examples"):
        # eval every eval_steps (no evals_per_epoch): reported at the examples seen
        PruningCallback(FakeTrial(prune=True), False, 333, None).on_evaluate(
            args, at_epoch(5, 5 / 21), None, metrics={"eval_loss": 2.0}
        )


@pytest.mark.parametrize("batch_size", [1, 2, 4, 8, 16, 64])
def test_pruning_steps_are_examples_seen_whatever_the_batch(batch_size):
    """Trials with different batch sizes report each epoch's end at the same step, so the
    pruner compares equal amounts of training; mid-epoch, the batches done x batch size."""
    n = 333
    batches = math.ceil(n / batch_size)  # Trainer's state.epoch: epoch + (step + 1) / batches
    for epoch in range(3):
        assert examples_seen(epoch + batches / batches, batch_size, n) == (epoch + 1) * n
        for done in range(1, batches):
            expected = epoch * n + done * batch_size
            assert examples_seen(epoch + done / batches, batch_size, n) == expected
    assert steps_per_epoch(n, batch_size, 1) == batches
    assert steps_per_epoch(n, batch_size, 3) == math.ceil(batches / 3)


def eval_points(
    batch_size: int, n: int, per_epoch: int, epochs: int, first_epoch: int | None = None
) -> list[tuple]:
    """(optimizer step, examples seen, step reported) of each eval of a training run, as the
    Trainer's loop drives FractionalEpochEval (mid-epoch) and its epoch strategy (ends)."""
    batches = math.ceil(n / batch_size)
    schedule = EvalSchedule(n, per_epoch, first_epoch)
    fractional = FractionalEpochEval(schedule)
    pruning = PruningCallback(FakeTrial(prune=False), True, n, schedule)
    args, points = SimpleNamespace(train_batch_size=batch_size), []
    for epoch in range(epochs):
        for i in range(batches):
            state = at_epoch(epoch * batches + i + 1, epoch + (i + 1) / batches)
            control = TrainerControl()
            fractional.on_step_end(args, state, control)
            if control.should_evaluate or i == batches - 1:
                seen = examples_seen(state.epoch, batch_size, n)
                points.append((state.global_step, seen, pruning.step(state.epoch, batch_size)))
    return points


@pytest.mark.parametrize("batch_size", [2, 4, 8, 16])
def test_evals_at_fractions_of_an_epoch_report_the_same_steps(batch_size):
    points = eval_points(batch_size, 333, 2, 3)
    # Two evals an epoch, each at the first step past its half, reported at the half.
    assert [reported for _, _, reported in points] == [166, 333, 500, 666, 832, 999]
    for (_, seen, _), half in zip(points, [166.5, 333, 499.5, 666, 832.5, 999]):
        assert half <= seen < half + batch_size
    ends = [step for step, _, _ in points][1::2]  # the Trainer's own epoch-end evals
    assert ends == [math.ceil(333 / batch_size) * k for k in (1, 2, 3)]
    # One eval an epoch: the epoch ends only; no extra evals
    assert [r for _, _, r in eval_points(batch_size, 333, 1, 2)] == [333, 666]


@pytest.mark.parametrize("batch_size", [1, 2, 4, 8, 16, 64, 128])
def test_quarters_of_the_first_epoch_then_epoch_ends(batch_size):
    """The default schedule: four checks in the first epoch, one at each later epoch's end;
    every batch size evaluates as soon as it passes a check and reports the check."""
    points = eval_points(batch_size, 333, 1, 3, first_epoch=4)
    quarters = [83.25, 166.5, 249.75, 333]
    reported = [r for _, _, r in points]
    if batch_size < 83:
        assert reported == [83, 166, 250, 333, 666, 999]
        for (_, seen, _), point in zip(points, quarters):
            assert point <= seen < point + batch_size
    else:
        # Batch 128 passes the first quarter at 128 examples, then the second and third
        # together at 256: one eval there, reported at the later check.
        assert reported == [83, 250, 333, 666, 999]
    ends = [step for step, seen, _ in points if seen % 333 == 0]
    assert ends == [math.ceil(333 / batch_size) * k for k in (1, 2, 3)]


def test_eval_schedule_points_and_counts():
    schedule = EvalSchedule(100, per_epoch=2, first_epoch=4)
    assert [schedule.point(k) for k in range(1, 9)] == [25, 50, 75, 100, 150, 200, 250, 300]
    assert [schedule.passed(s) for s in (0, 24, 25, 99, 100, 149, 150, 300)] == [
        0, 0, 1, 3, 4, 4, 5, 8,
    ]  # fmt: skip
    assert [schedule.is_epoch_end(k) for k in (3, 4, 5, 6)] == [False, True, False, True]
    assert EvalSchedule(100, per_epoch=3).point(4) == 133  # first_epoch None: per_epoch
