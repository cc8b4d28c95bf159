"""Training: the LoRA fine-tune, with transformers' Trainer.

Batches are padded per batch (never all to ``data.max_length``) and, with
``train.group_by_length``, drawn from examples of similar length. Callbacks stream
losses to the tracker, stop the trial on a NaN or infinite loss, and report eval loss
to an Optuna trial so a pruner can stop a bad trial early.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from finqa_exp import checkpoints
from finqa_exp.config import TrainConfig
from finqa_exp.data import IGNORE_INDEX
from finqa_exp.devices import check_batch_size, mixed_precision
from finqa_exp.tracking import Tracker, names

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the trial cannot go on."""


def training_arguments(
    train: TrainConfig, output_dir: str | Path, dev: torch.device, has_eval: bool
) -> TrainingArguments:
    """``train`` as transformers TrainingArguments (checkpoints only where
    finqa_exp.checkpoints.Checkpointing asks: after a sweep trial's evals)."""
    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=train.learning_rate,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        warmup_steps=train.warmup_steps,
        lr_scheduler_type=train.scheduler,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        # Keep NaN/inf visible in the logs: the default replaces them with the running mean.
        logging_nan_inf_filter=False,
        eval_strategy=train.eval_strategy if has_eval else "no",
        eval_steps=train.eval_steps,
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        save_strategy="no",
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        use_cpu=dev.type != "cuda",
        dataloader_pin_memory=dev.type == "cuda",
        remove_unused_columns=False,
        disable_tqdm=False,
        **mixed_precision(train, dev),
    )


def collator(tokenizer: Any, dev: torch.device) -> DataCollatorForSeq2Seq:
    """Pads each batch to its longest example; labels are padded with the ignore index."""
    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(
        tokenizer,
        padding="longest",
        label_pad_token_id=IGNORE_INDEX,
        pad_to_multiple_of=8 if dev.type == "cuda" else None,
    )


@dataclass
class LossHistory:
    train: list[tuple[int, float]] = field(default_factory=list)
    eval: list[tuple[int, float]] = field(default_factory=list)


# What MetricsCallback logs by step: a resumed trial's run copies them from the run before.
STEP_METRICS = ("train_loss", "learning_rate", "grad_norm", "eval_loss")


class MetricsCallback(TrainerCallback):
    """Sends each logged loss to the tracker, keeps a history, and fails fast on NaN/inf."""

    def __init__(self, tracker: Tracker, history: LossHistory):
        self.tracker = tracker
        self.history = history

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        step = state.global_step
        for key in ("loss", "eval_loss"):
            if key in logs and not math.isfinite(logs[key]):
                raise NonFiniteLossError(
                    f"{key} is {logs[key]} at step {step} (train.learning_rate too high?)"
                )
        metrics = {}
        if "loss" in logs:
            self.history.train.append((step, float(logs["loss"])))
            metrics["train_loss"] = logs["loss"]
            for key in ("learning_rate", "grad_norm"):
                if key in logs:
                    metrics[key] = logs[key]
        if "eval_loss" in logs:
            self.history.eval.append((step, float(logs["eval_loss"])))
            metrics["eval_loss"] = logs["eval_loss"]
        if metrics:
            self.tracker.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


# Optuna user attr of a trial: the unit of the steps its intermediate values are reported at.
STEP_UNIT = "train_examples"


def examples_seen(epoch: float, batch_size: int, train_examples: int) -> int:
    """Examples trained on by fractional ``epoch`` (Trainer's state.epoch: k + batches done /
    batches per epoch, exactly k at the end of epoch k)."""
    n = train_examples
    whole = math.floor(epoch + 1e-9)
    batches = round((epoch - whole) * math.ceil(n / batch_size))
    return whole * n + min(batches * batch_size, n)


@dataclass(frozen=True)
class EvalSchedule:
    """Where the eval-loss checks of a run fall, in training examples: ``first_epoch``
    equal fractions of the first epoch, then ``per_epoch`` of each later one.

    Checks are cheap next to training (the eval split is small and forward-only) and what
    a pruner stops a trial on: many in the first epoch stop a bad trial early, few later
    keep a good one's cost down. Each epoch's end is a check.
    """

    train_examples: int
    per_epoch: int = 1
    first_epoch: int | None = None

    @property
    def first(self) -> int:
        return self.first_epoch or self.per_epoch

    def passed(self, seen: int) -> int:
        """How many checks ``seen`` examples have reached."""
        n, first = self.train_examples, self.first
        if seen <= n:
            return seen * first // n
        return first + (seen - n) * self.per_epoch // n

    def point(self, k: int) -> int:
        """The training examples at check ``k`` (1-based; 0 is the start)."""
        n, first = self.train_examples, self.first
        if k <= first:
            return round(k * n / first)
        return round(n + (k - first) * n / self.per_epoch)

    def is_epoch_end(self, k: int) -> bool:
        first = self.first
        return k % first == 0 if k <= first else (k - first) % self.per_epoch == 0


class FractionalEpochEval(TrainerCallback):
    """Evaluates at the checks of an EvalSchedule that fall inside an epoch, at the first
    optimizer step that reaches each (the Trainer's own epoch strategy takes the ends)."""

    def __init__(self, schedule: EvalSchedule):
        self.schedule = schedule
        self.passed = 0

    def on_train_begin(self, args, state, control, **kwargs):
        # Resumed from a checkpoint, the checks before it have passed.
        n = self.schedule.train_examples
        seen = examples_seen(state.epoch or 0.0, args.train_batch_size, n)
        self.passed = self.schedule.passed(seen)

    def on_step_end(self, args, state, control, **kwargs):
        seen = examples_seen(
            state.epoch or 0.0, args.train_batch_size, self.schedule.train_examples
        )
        passed = self.schedule.passed(seen)
        if passed > self.passed and not self.schedule.is_epoch_end(passed):
            control.should_evaluate = True
        self.passed = passed


class PruningCallback(TrainerCallback):
    """Reports eval loss to an Optuna trial at each eval; stops the trial if the pruner says so.

    The step reported is training examples, not the optimizer step: a pruner compares
    trials at equal steps, and with a searched batch size equal optimizer steps are
    different amounts of training (step 84 is one epoch at batch 2 and two at batch 4).
    With evals on an EvalSchedule, each is reported at its check's point, which every
    batch size reports alike; otherwise (eval every ``eval_steps``) at the examples seen.
    So pruner settings such as n_warmup_steps count examples.

    Optuna compares intermediate values in the study's direction, so for a study that
    maximizes (ROUGE) the reported value is the negated loss.
    """

    def __init__(
        self,
        trial: Any,
        maximize: bool,
        train_examples: int,
        schedule: EvalSchedule | None = None,
    ):
        self.trial = trial
        self.sign = -1.0 if maximize else 1.0
        self.train_examples = train_examples
        self.schedule = schedule
        trial.set_user_attr(names.STEP_UNIT_ATTR, STEP_UNIT)
        trial.set_user_attr(
            names.INTERMEDIATE_VALUE_ATTR, "-eval_loss" if maximize else "eval_loss"
        )

    def step(self, epoch: float, batch_size: int) -> int:
        seen = examples_seen(epoch, batch_size, self.train_examples)
        if self.schedule is None:
            return seen
        return self.schedule.point(self.schedule.passed(seen))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        import optuna

        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        step = self.step(state.epoch or 0.0, args.train_batch_size)
        self.trial.report(self.sign * float(loss), step=step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(
                f"pruned after {step} training examples (epoch {state.epoch:.2f}, "
                f"step {state.global_step}) with eval_loss {loss:.4f}"
            )


def eval_schedule(cfg: TrainConfig, train_examples: int) -> EvalSchedule | None:
    """The checks of ``train.eval_strategy=epoch``; None for the other strategies."""
    if cfg.eval_strategy != "epoch":
        return None
    return EvalSchedule(train_examples, cfg.evals_per_epoch, cfg.evals_first_epoch)


def steps_per_epoch(train_examples: int, batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one epoch, as the Trainer counts them on one device."""
    batches = math.ceil(train_examples / batch_size)
    return max(math.ceil(batches / accumulation), 1)


class _Trainer(Trainer):
    """Trainer whose evaluations leave the random state as they found it.

    Each DataLoader iterator, the eval one too, draws its base seed from the global RNG;
    without this, adding an eval (a mid-epoch pruning check, say) would change the next
    batches' order and dropout, so what a trial learns would depend on how often it is
    looked at.
    """

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        devices = [torch.cuda.current_device()] if self.args.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return super().evaluate(*args, **kwargs)

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        # Each epoch's length-grouped order from its own seed: a resume replays it.
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is checkpoints.LengthGroupedSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return checkpoints.SeededLengthGroupedSampler(
                sampler.batch_size, lengths=sampler.lengths, seed=seed
            )
        return sampler


def extra_callbacks(specs: dict[str, Any]) -> list[TrainerCallback]:
    """``train.callbacks`` instantiated (``_target_`` objects), in name order."""
    from hydra.utils import instantiate

    return [instantiate(specs[name]) for name in sorted(specs)]


@dataclass
class TrainResult:
    runtime_s: float  # of this run (a resumed one: from its checkpoint on)
    tokens_seen: int  # by the adapter in all, a resumed trial's earlier steps included
    tokens_per_s: float  # of this run
    steps: int
    history: LossHistory
    batch_size: int  # per optimizer step and device, as the Trainer ran it
    resumed_from_step: int = 0  # the checkpoint's step, if this run resumed one


def loss_history(log_history: list[dict[str, Any]]) -> LossHistory:
    """Train and eval losses by step from the Trainer's log (a checkpoint's too)."""
    history = LossHistory()
    for entry in log_history:
        if "loss" in entry:
            history.train.append((entry["step"], float(entry["loss"])))
        if "eval_loss" in entry:
            history.eval.append((entry["step"], float(entry["eval_loss"])))
    return history


def train(
    model: Any,
    tokenizer: Any,
    train_ds: Any,
    eval_ds: Any | None,
    cfg: TrainConfig,
    output_dir: str | Path,
    dev: torch.device,
    tracker: Tracker,
    extra_callbacks: list[TrainerCallback] | None = None,
    plan: checkpoints.Plan | None = None,
) -> TrainResult:
    """Fine-tune ``model`` (a peft model) in place and return timing and loss history.

    With a checkpoint ``plan``, a checkpoint follows each eval, and training resumes from
    ``plan.resume_from`` if there is one; SIGTERM then saves one and stops the run
    (finqa_exp/checkpoints.py)."""
    history = LossHistory()
    callbacks: list[TrainerCallback] = [MetricsCallback(tracker, history)]
    schedule = eval_schedule(cfg, len(train_ds))
    if (
        eval_ds is not None
        and schedule is not None
        and (schedule.first > 1 or schedule.per_epoch > 1)
    ):
        callbacks.append(FractionalEpochEval(schedule))
    resume_from, tokens_before, resumed_step = None, 0, 0
    if plan is not None:
        output_dir = plan.folder
        callbacks.append(checkpoints.Checkpointing(plan))
        if plan.resume_from is not None:
            resume_from = str(plan.resume_from)
            saved = checkpoints.saved_state(plan.resume_from)
            tokens_before, resumed_step = saved["num_input_tokens_seen"], saved["global_step"]
    trainer = _Trainer(
        model=model,
        args=training_arguments(cfg, output_dir, dev, has_eval=eval_ds is not None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator(tokenizer, dev),
        processing_class=tokenizer,
        callbacks=[*callbacks, *(extra_callbacks or [])],
    )
    batch_size = check_batch_size(trainer.args, cfg.batch_size)
    start = time.perf_counter()
    with _stops_on_sigterm(plan is not None):
        trainer.train(resume_from_checkpoint=resume_from)
    runtime = time.perf_counter() - start
    tokens = int(trainer.state.num_input_tokens_seen)
    new_tokens = tokens - tokens_before
    return TrainResult(
        runtime_s=runtime,
        tokens_seen=tokens,
        tokens_per_s=new_tokens / runtime if runtime > 0 else 0.0,
        steps=trainer.state.global_step,
        # The whole run's, from the Trainer's log: a resumed run's starts at its checkpoint.
        history=loss_history(trainer.state.log_history) if resume_from else history,
        batch_size=batch_size,
        resumed_from_step=resumed_step,
    )


def _stops_on_sigterm(checkpointing: bool) -> Any:
    """In a sweep job, SIGTERM during training waits for Checkpointing to save and stop."""
    if not checkpointing:
        return contextlib.nullcontext()
    from finqa_exp.sweep.resume import deferred

    return deferred()
