"""One trial: fine-tune a 4-bit LoRA adapter, score it against its base, record it.

This is the callable core behind ``python -m finqa_exp`` (one trial) and every job of
``python -m finqa_exp -m`` (a sweep)::

    from finqa_exp.trial import run_trial
    objective = run_trial(cfg)   # cfg composed from conf/config.yaml

Order matters: the config and the data are checked and the tracking store is reached
before any model is loaded, so bad input fails in seconds and records nothing. The run's
bookkeeping (MLflow run, phase timings, how the trial ended) is tracking.TrialRun's.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from finqa_exp import corpus, tracking
from finqa_exp import data as data_lib
from finqa_exp.config import ConfigError, FinqaConfig, flatten, validate
from finqa_exp.tracking import names
from finqa_exp.tracking.trial_run import TrialRun, trial_run_name, trial_run_tags

if TYPE_CHECKING:
    from finqa_exp import checkpoints, evaluation, modeling, text_eval
    from finqa_exp.training import LossHistory, TrainResult

log = logging.getLogger(__name__)


# What every trial logs beside its scores (trial_metrics, peak memory): objective choices.
RUN_METRICS = (
    "eval_loss", "final_train_loss", "train_time_s", "train_tokens", "tokens_per_s",
    "train_steps", "trainable_params", "peak_memory_mb", "peak_memory_reserved_mb",
)  # fmt: skip


@dataclass
class TrialResult:
    objective: float | list[float]  # one value per objective.metric
    metrics: dict[str, float]
    run_id: str | None
    adapter_dir: Path
    samples: list[dict[str, str]]
    history: LossHistory
    model: Any  # the tuned peft model (tests inspect it; run_trial drops it)


def run_trial(cfg: DictConfig) -> float | list[float]:
    """Run one trial for the composed config and return its objective (``objective.metric``):
    a float, or a list of them when ``objective.metric`` is a list (a multi-objective study)."""
    return execute(cfg).objective


def execute(cfg: DictConfig, tracker: tracking.Tracker | None = None) -> TrialResult:
    """check -> data -> base -> base score -> LoRA -> train -> tuned score -> save and log."""
    start = time.perf_counter()
    conf = validate(cfg)  # ConfigError: ranges and consistency
    splits = load_data(conf)  # DataError: files, columns, sizes
    check_objective_names(conf, expected_scores(conf))  # ConfigError: not a logged metric
    tracker = tracker or tracking.make_tracker(conf.tracking)  # TrackingError: unreachable
    # torch, transformers and bitsandbytes take seconds to import: only for good input.
    from finqa_exp import checkpoints, devices, evaluation, modeling

    evaluator = make_evaluator(conf, splits)  # MetricError: cannot load a metric
    check_objective_names(conf, evaluator.score_names())  # ConfigError: not a logged metric
    dev = devices.device()  # this process's one GPU, pinned before CUDA starts, or the CPU
    trial = _sweep_trial()
    plan = checkpoints.plan(conf, trial)  # where it checkpoints, and what it resumes
    name, tags = trial_run_name(conf, trial), trial_run_tags(conf, devices.describe_device(dev))
    # A failed or pruned trial's adapter, gradients and optimizer states go at once.
    on_failure = modeling.shared_base.discard_adapter
    with (
        TrialRun(tracker, name, tags, trial, conf.paths.output_dir, start, on_failure) as run,
        checkpoints.owned(plan),  # removed once the trial ends, kept if it is stopped
    ):
        if plan is not None:
            plan.run_id = run.run_id  # its checkpoints name the run that wrote them
        run.log_config(flatten(cfg), OmegaConf.to_yaml(cfg, resolve=True))
        if evaluator.skipped:
            log.info("not scored: %s", evaluator.skipped)
            tracker.set_tags({names.SCORES_SKIPPED_TAG: evaluator.skipped})
        with run.phase("load"):
            base = modeling.load_base(conf, splits, dev)
        before = evaluator.score_base(conf, base, partial(run.phase, "generate_base"))
        log.info("base scores: %s", evaluation.format_scores(before.scores))
        with run.phase("add_lora"):
            adapter = modeling.add_adapter(conf, base)
        trained = train_adapter(conf, adapter, base, run, plan)
        with run.phase("generate_tuned"):
            after = evaluator.score_tuned(adapter.model, base)
        log.info("tuned scores: %s", evaluation.format_scores(after.scores))
        peak = devices.peak_memory(dev)
        metrics = {**evaluator.metrics(before, after), **trial_metrics(trained, adapter)}
        metrics.update(peak.metrics)
        check_objective(conf, metrics)
        with run.phase("save"):  # before the scores: a run without its adapter has none
            adapter_dir = save_adapter(conf, adapter, base.tokenizer, tracker)
        samples = evaluator.samples(before, after)
        with run.phase("log_model"):
            model_id = log_served_model(conf, base, adapter_dir, samples, tracker, name)
        with run.phase("record"):
            tracker.log_metrics(metrics, model_id=model_id)  # the run's, and its model's
            tracker.set_tags({names.PEAK_MEMORY_KIND_TAG: peak.kind})
            tracker.log_table(samples[: conf.eval.num_samples], names.SAMPLES_ARTIFACT)
            for artifact, rows in evaluator.tables(before, after).items():
                tracker.log_table(rows, artifact)
        values = [metrics[m] for m in conf.objective.metrics]
        return TrialResult(
            objective=values[0] if len(values) == 1 else values,
            metrics=run.complete(metrics),
            run_id=run.run_id,
            adapter_dir=adapter_dir,
            samples=samples,
            history=trained.history,
            model=adapter.model,
        )


# ----------------------------------------------------------------------------- steps


def load_data(conf: FinqaConfig) -> data_lib.Splits | corpus.TextSplits:
    """Q&A pairs, or a corpus split by document (``data.format=text``); DataError if unusable."""
    if conf.data.format == "text":
        splits = corpus.load_corpus(conf.data)
        s = splits.stats
        log.info(
            "data: %d train / %d test documents (%d read; dropped %d empty, %d duplicate)",
            len(splits.train), len(splits.test), s.documents, s.empty, s.duplicates,
        )  # fmt: skip
        return splits
    pairs = data_lib.load_splits(conf.data)
    stats = pairs.stats
    log.info(
        "data: %d train / %d test pairs (%d rows; dropped %d unpaired, %d short, %d duplicate)",
        len(pairs.train), len(pairs.test), stats.rows, stats.unpaired,
        stats.short_answers, stats.duplicates,
    )  # fmt: skip
    return pairs


def make_evaluator(
    conf: FinqaConfig, splits: data_lib.Splits | corpus.TextSplits
) -> evaluation.Evaluator | text_eval.TextEvaluator:
    """What scores the base and tuned models: answers to the test questions (ROUGE and
    ``eval.metrics``), or for text, held-out perplexity and completions."""
    from finqa_exp import evaluation, text_eval

    if isinstance(splits, corpus.TextSplits):
        return text_eval.TextEvaluator.from_config(conf, splits)
    return evaluation.Evaluator.from_config(conf, splits.test)


def train_adapter(
    conf: FinqaConfig,
    adapter: modeling.Adapter,
    base: modeling.Base,
    run: TrialRun,
    plan: checkpoints.Plan | None = None,
) -> TrainResult:
    """Fine-tune the adapter; inside a sweep, eval losses go to the Optuna trial's pruner,
    and a retried trial resumes its checkpoint."""
    from finqa_exp import training

    # Logged before training, so that a pruned run too says how long it was to be: the
    # report's pruning savings and epoch axes read them.
    n = len(base.train_ds)
    epoch_steps = training.steps_per_epoch(
        n, conf.train.batch_size, conf.train.gradient_accumulation_steps
    )
    run.tracker.log_metrics({"train_examples": n, "steps_per_epoch": epoch_steps})
    callbacks = training.extra_callbacks(conf.train.callbacks)
    if run.trial is not None and len(conf.objective.metrics) > 1:
        log.info("not reporting to the pruner: Optuna prunes single-objective studies only")
    elif run.trial is not None:
        maximize = conf.objective.directions[0] == "maximize"
        schedule = training.eval_schedule(conf.train, n)
        callbacks.append(training.PruningCallback(run.trial, maximize, n, schedule))
    if plan is not None and plan.resume_from is not None:
        continue_attempt(plan, run, conf.train.batch_size, n)
    out_dir = Path(conf.paths.output_dir) / "trainer"
    with run.phase("train"):
        return training.train(
            adapter.model, base.tokenizer, base.train_ds, base.eval_ds, conf.train, out_dir,
            base.device, run.tracker, callbacks, plan,
        )  # fmt: skip


def continue_attempt(plan: checkpoints.Plan, run: TrialRun, batch_size: int, n: int) -> None:
    """A retry resuming its chain's checkpoint takes over what the attempt that wrote it
    had recorded up to there: the pruner's intermediate values, and the run's loss curves."""
    from finqa_exp import checkpoints, training
    from finqa_exp.sweep.resume import attempt

    assert plan.resume_from is not None
    saved = checkpoints.saved_state(plan.resume_from)
    step, epoch = saved["global_step"], saved["epoch"]
    writer = plan.writer()
    seen = training.examples_seen(epoch, batch_size, n)
    log.info(
        "resuming from %s: step %d of trial %s, epoch %.2f (%d training examples done)",
        plan.resume_from, step, writer["trial"], epoch, seen,
    )  # fmt: skip
    if run.trial is not None:
        wrote = attempt(run.trial.study, writer["trial"])
        for at, value in sorted(wrote.intermediate_values.items()):
            if at <= seen:
                run.trial.report(value, at)
    if writer.get("run_id") and run.run_id:
        try:
            run.tracker.continue_from(writer["run_id"], step, training.STEP_METRICS)
        except Exception as err:  # the curves are a convenience; the checkpoint is not
            log.warning("could not copy run %s's curves: %s", writer["run_id"], err)


def trial_metrics(trained: TrainResult, adapter: modeling.Adapter) -> dict[str, float]:
    """What a trial's run records about its training (the evaluator's scores aside)."""
    trainable, _ = adapter.model.get_nb_trainable_parameters()
    metrics: dict[str, float] = {
        "train_time_s": trained.runtime_s,
        "train_tokens": float(trained.tokens_seen),
        "tokens_per_s": trained.tokens_per_s,
        "train_steps": float(trained.steps),
        "train_batch_size": float(trained.batch_size),
        "trainable_params": float(trainable),
        "gradient_checkpointing": float(adapter.checkpointing),
    }
    if trained.resumed_from_step:
        metrics["resumed_from_step"] = float(trained.resumed_from_step)
    if trained.history.eval:
        metrics["eval_loss"] = trained.history.eval[-1][1]
    if trained.history.train:
        metrics["final_train_loss"] = trained.history.train[-1][1]
    return metrics


def objective_choices(score_names: set[str]) -> set[str]:
    """The metrics a trial logs, given its score names: what ``objective.metric`` can be."""
    choices = set(RUN_METRICS)
    for k in score_names:
        for name in (k, f"delta_{k}"):
            choices |= {name, f"{name}_ci_low", f"{name}_ci_high"}
        choices.add(f"base_{k}")
    return choices


def expected_scores(conf: FinqaConfig) -> set[str] | None:
    """The score names a trial will log, where known before its metrics load: perplexity
    for text, ROUGE and the shipped metrics' for Q&A (None: a metric not shipped)."""
    if conf.data.format == "text":
        return {names.PERPLEXITY}
    from finqa_exp import metrics

    return metrics.expected_scores(conf.eval.metrics)


def check_objective_names(conf: FinqaConfig, score_names: set[str] | None) -> None:
    """ConfigError unless every ``objective.metric`` is a metric the trial logs (None: the
    score names are not known yet, see metrics.expected_scores)."""
    if score_names is None:
        return
    choices = objective_choices(score_names)
    for metric in conf.objective.metrics:
        if metric not in choices:
            raise ConfigError(
                f"objective.metric={metric} is not a metric a trial logs: the scores are "
                f"{sorted(score_names)} (also as base_<score>, delta_<score>, "
                f"<score>_ci_low/_ci_high), or one of {', '.join(RUN_METRICS)}"
            )


def check_objective(conf: FinqaConfig, metrics: dict[str, float]) -> None:
    for metric in conf.objective.metrics:
        if metric not in metrics:
            raise ValueError(
                f"objective.metric={metric} was not measured (eval loss needs a test split "
                f"and train.eval_strategy other than 'no'; peak memory a CUDA device)"
            )


def save_adapter(
    conf: FinqaConfig, adapter: modeling.Adapter, tokenizer: Any, tracker: tracking.Tracker
) -> Path:
    """The adapter (safetensors) and tokenizer in the job folder, and in the run."""
    adapter_dir = Path(conf.paths.output_dir) / names.ADAPTER_ARTIFACT
    adapter.model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    if conf.tracking.log_adapter:
        tracker.log_artifacts(adapter_dir, names.ADAPTER_ARTIFACT)
    return adapter_dir


def log_served_model(
    conf: FinqaConfig,
    base: modeling.Base,
    adapter_dir: Path,
    samples: list[dict[str, str]],
    tracker: tracking.Tracker,
    name: str,
) -> str | None:
    """The tuned model as an MLflow pyfunc model of the run (finqa_exp/serving): what
    ``mlflow models serve``, ``ask`` and the app load; its example is a test question and
    the tuned answer."""
    if not conf.tracking.log_adapter:
        return None
    from finqa_exp import modeling, serving
    from finqa_exp.serving import spec

    # The hub commit the base was loaded at (None for a folder): the served model loads it.
    revision = modeling.hub_commit(conf.model.name_or_path, conf.model.revision)
    settings = spec.settings_for(conf, revision, tracker.run_id)
    # A test question and its tuned answer, or for text a probe and its tuned completion.
    first = samples[0] if samples else {}
    example = corpus.SEED_PROMPT if conf.data.format == "text" else spec.EXAMPLE_QUESTION
    question = first.get("question", first.get("prompt", example))
    answer = first.get("tuned_answer", first.get("tuned_completion", ""))
    return tracker.log_model(
        name, serving.MODEL_CODE, spec.artifacts_for(adapter_dir, base.source, settings),
        settings.to_dict(), ([question], [answer]),
        {"max_new_tokens": settings.max_new_tokens},
        {names.MODEL_TAG: conf.model.name, names.DATA_TAG: conf.data.name},
    )  # fmt: skip


# ----------------------------------------------------------------------------- sweeps


def _sweep_trial() -> Any | None:
    """The Optuna trial this job belongs to, when it runs inside a sweep."""
    try:
        from finqa_exp.sweep import current_trial
    except ImportError:
        return None
    return current_trial()


def preflight(cfg: DictConfig) -> None:
    """Check a config, its data and its tracking store without loading a model (a sweep's
    check before trial 0).

    Raises ConfigError, DataError, MetricError or TrackingError naming the problem; used as
    ``hydra.sweeper.preflight``.
    """
    conf = validate(cfg)
    # Once per distinct data config: a sweep checks many configs that share their data.
    key = json.dumps(asdict(conf.data), sort_keys=True)
    if key not in _CHECKED_DATA:
        load_data(conf)
        _CHECKED_DATA.add(key)
    if conf.data.format == "qa":  # text is scored by perplexity: eval.metrics unused
        from finqa_exp import metrics

        metrics.check(conf.eval.metrics)  # MetricError: a local metric that is not there
    check_objective_names(conf, expected_scores(conf))
    if conf.tracking.backend == "mlflow":
        # A stopped tracking server fails the sweep here, before the study has a trial.
        tracking.check_reachable(conf.tracking.uri)


_CHECKED_DATA: set[str] = set()
