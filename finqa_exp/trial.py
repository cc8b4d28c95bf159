"""One trial: fine-tune a 4-bit LoRA adapter, score it against its base, record it.

This is the callable core behind ``python -m finqa_exp`` (one trial) and every job of
``python -m finqa_exp -m`` (a sweep)::

    from finqa_exp.trial import run_trial
    objective = run_trial(cfg)   # cfg composed from conf/config.yaml

Order matters: the config and the data are checked and the tracking store is reached
before any model is loaded, so bad input fails in seconds and records nothing.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from finqa_exp import data as data_lib
from finqa_exp import tracking
from finqa_exp.config import FinqaConfig, flatten, validate

if TYPE_CHECKING:
    import torch

    from finqa_exp.training import LossHistory

log = logging.getLogger(__name__)


@dataclass
class TrialResult:
    objective: float
    metrics: dict[str, float]
    run_id: str | None
    adapter_dir: Path
    samples: list[dict[str, str]]
    history: LossHistory
    model: Any  # the tuned peft model (tests inspect it; run_trial drops it)


def base_model_source(conf: FinqaConfig, splits: data_lib.Splits) -> str:
    """Local folder or hub id of the base model; builds (or reuses) the tiny one if asked."""
    from finqa_exp import modeling

    if conf.model.name_or_path:
        return conf.model.name_or_path
    return str(modeling.build_tiny_base(conf.model.tiny, splits.train, conf.paths.cache_dir))


def peak_memory_mb(dev: torch.device) -> tuple[dict[str, float], str]:
    """Peak memory of this trial's device: on GPU, PyTorch's peak allocated and reserved
    memory since the base was ready (nvidia-smi shows reserved plus the CUDA context); on
    CPU, the process's peak RSS."""
    import torch

    if dev.type == "cuda":
        return {
            "peak_memory_mb": torch.cuda.max_memory_allocated(dev) / 2**20,
            "peak_memory_reserved_mb": torch.cuda.max_memory_reserved(dev) / 2**20,
        }, "cuda_max_allocated"
    # ru_maxrss is in KiB on Linux; it is the process's peak, so it includes loading.
    return {
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    }, "cpu_max_rss"


def _objective(conf: FinqaConfig, metrics: dict[str, float]) -> float:
    return metrics[conf.study.metric]


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

    Raises ConfigError, DataError or TrackingError naming the problem; used as
    ``hydra.sweeper.preflight``.
    """
    conf = validate(cfg)
    # Once per distinct data config: a sweep checks many configs that share their data.
    key = json.dumps(asdict(conf.data), sort_keys=True)
    if key not in _CHECKED_DATA:
        data_lib.load_splits(conf.data)
        _CHECKED_DATA.add(key)
    if conf.tracking.backend == "mlflow":
        # A stopped tracking server fails the sweep here, before the study has a trial.
        tracking.check_reachable(conf.tracking.uri)


_CHECKED_DATA: set[str] = set()


def run_trial(cfg: DictConfig) -> float:
    """Run one trial for the composed config and return its objective (``study.metric``)."""
    return execute(cfg).objective


def execute(cfg: DictConfig, tracker: tracking.Tracker | None = None) -> TrialResult:
    """Run one trial; returns the objective, metrics, MLflow run id and adapter folder."""
    start = time.perf_counter()
    phases = Phases()
    conf = validate(cfg)  # ConfigError: ranges and consistency
    splits = data_lib.load_splits(conf.data)  # DataError: files, columns, sizes
    log.info(
        "data: %d train / %d test pairs (%d rows; dropped %d unpaired, %d short, %d duplicate)",
        len(splits.train),
        len(splits.test),
        splits.stats.rows,
        splits.stats.unpaired,
        splits.stats.short_answers,
        splits.stats.duplicates,
    )
    tracker = tracker or tracking.make_tracker(conf.tracking)  # TrackingError: store unreachable
    # torch, transformers and bitsandbytes take seconds to import: only now that the input
    # is known to be good.
    from finqa_exp import devices

    trial = _sweep_trial()
    dev = devices.device()  # this process's one GPU, pinned before CUDA starts, or the CPU

    tags = {
        **tracking.environment_tags(devices.describe_device(dev)),
        "model": conf.model.name,
        "data": conf.data.name,
        "experiment": conf.experiment or "default",
    }
    parent_run_id = None
    if trial is not None:
        tags.update({"study": trial.study.study_name, "trial_number": str(trial.number)})
        parent_run_id = trial.study.user_attrs.get("mlflow_parent_run_id")
    run_name = conf.tracking.run_name or (
        f"trial-{trial.number}" if trial is not None else f"{conf.model.name}-{conf.data.name}"
    )
    run_id = tracker.start_run(run_name, tags, parent_run_id=parent_run_id)
    if trial is not None and run_id:
        trial.set_user_attr("mlflow_run_id", run_id)
    log.info("MLflow run %s (%s)", run_id, conf.tracking.uri if run_id else "tracking off")

    status = tracking.FAILED
    try:
        tracker.log_params(flatten(cfg))
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        result = _fit_and_score(conf, splits, dev, tracker, trial, phases)
        timings = phase_metrics(phases.seconds, time.perf_counter() - start)
        result.metrics.update(timings)
        tracker.log_metrics(timings)
        # Beside the adapter, for scripts (and the benchmark) that read a run's numbers.
        (Path(conf.paths.output_dir) / "metrics.json").write_text(
            json.dumps(result.metrics, indent=1, sort_keys=True)
        )
        if trial is not None:
            trial.set_user_attr("timings", timings)
        result.run_id = run_id
        status = tracking.FINISHED
        if trial is not None:
            tracker.set_tags({"optuna_state": "COMPLETE"})
        return result
    except BaseException as err:
        import optuna

        from finqa_exp import modeling

        # Its adapter, gradients and optimizer states go now, not at the next trial's start.
        modeling.shared_base.discard_adapter()
        pruned = isinstance(err, optuna.TrialPruned)
        if pruned:
            status = tracking.KILLED
        # A pruned or failed trial's time counts too (the benchmark sums compute by state).
        timings = phase_metrics(phases.seconds, time.perf_counter() - start)
        try:
            if trial is not None:
                trial.set_user_attr("timings", timings)
            tracker.log_metrics(timings)
        except Exception as record_err:  # the trial's own error is the one to report
            log.warning("could not record the timings of the ended trial: %s", record_err)
        tracker.set_tags(
            {
                "optuna_state": "PRUNED" if pruned else "FAIL",
                "error": f"{type(err).__name__}: {err}"[:5000],
            }
        )
        raise
    finally:
        tracker.end_run(status)


class Phases:
    """Wall time per phase of a trial: ``with phases("train"): ...``, summed by name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


# Training and generation are the work; everything else in a trial is overhead.
WORK_PHASES = ("train", "generate_base", "generate_tuned")


def phase_metrics(seconds: dict[str, float], total: float) -> dict[str, float]:
    """``time_<phase>_s`` per phase, ``trial_time_s``, and ``overhead_share``: the share of
    the trial's wall time spent outside training and generation."""
    work = sum(seconds.get(name, 0.0) for name in WORK_PHASES)
    return {
        **{f"time_{name}_s": value for name, value in sorted(seconds.items())},
        "trial_time_s": total,
        "overhead_share": (total - work) / total if total > 0 else 0.0,
    }


def _fit_and_score(
    conf: FinqaConfig,
    splits: data_lib.Splits,
    dev: torch.device,
    tracker: tracking.Tracker,
    trial: Any | None,
    phases: Phases,
) -> TrialResult:
    import torch
    from transformers import set_seed as transformers_set_seed

    from finqa_exp import evaluation, modeling

    with phases("load"):
        source = base_model_source(conf, splits)
        log.info(
            "base model %s (%s)",
            source,
            "4-bit " + conf.quant.quant_type if conf.quant.load_in_4bit else "not quantized",
        )
        # Loaded once per process: a sweep's later trials reuse it (adapters are swapped).
        tokenizer, base, reused = modeling.shared_base.get(source, conf.model, conf.quant, dev)
        log.info("base model %s", "reused from the previous trial" if reused else "loaded")
        if dev.type == "cuda":
            # From here on: what this trial adds to the resident base, the same whether the
            # base was just loaded or reused.
            torch.cuda.reset_peak_memory_stats(dev)
        tok_key = evaluation.cache_key(
            source,
            conf.model.revision,
            splits.fingerprint(),
            conf.data.prompt_template,
            conf.data.max_length,
        )
        template, max_len = conf.data.prompt_template, conf.data.max_length
        train_ds = data_lib.tokenize(tokenizer, template, splits.train, max_len, f"train-{tok_key}")
        eval_ds = data_lib.tokenize(tokenizer, template, splits.test, max_len, f"test-{tok_key}")
    test = splits.test[: conf.eval.max_questions] if conf.eval.max_questions else splits.test
    questions = [p.question for p in test]
    references = [p.answer for p in test]

    # The base score depends only on model, quantization, data, prompt and eval settings:
    # computed once, then read from the cache by every later trial.
    base_key = evaluation.cache_key(
        source,
        conf.model.revision,
        asdict(conf.quant),
        tok_key,
        conf.eval.max_new_tokens,
        conf.eval.max_questions,
        str(dev.type),
    )
    cached = evaluation.load_cached(conf.paths.cache_dir, base_key)
    if cached is None:
        log.info("scoring the base model on %d test questions", len(questions))
        with phases("generate_base"):
            base_scores, base_answers = evaluation.score(
                base,
                tokenizer,
                template,
                questions,
                references,
                conf.eval.max_new_tokens,
                conf.eval.batch_size,
            )
        evaluation.save_cached(
            conf.paths.cache_dir, base_key, {"scores": base_scores, "answers": base_answers}
        )
    else:
        base_scores, base_answers = cached["scores"], cached["answers"]
    log.info("base ROUGE: %s", _fmt(base_scores))

    checkpointing = modeling.use_gradient_checkpointing(
        conf.model.gradient_checkpointing,
        base.config,
        conf.train.batch_size,
        max(len(ex["input_ids"]) for ex in train_ds),
        dev,
    )
    # Seed before the adapter is created: LoRA's A matrices are drawn from the global RNG,
    # which building the tiny base or scoring has already advanced by a varying amount.
    transformers_set_seed(conf.train.seed)
    with phases("add_lora"):
        model = modeling.shared_base.add_lora(conf.lora, checkpointing)
    return _train_score_save(
        conf, model, tokenizer, train_ds, eval_ds, questions, references,
        base_scores, base_answers, checkpointing, dev, tracker, trial, phases,
    )  # fmt: skip


def _train_score_save(
    conf: FinqaConfig,
    model: Any,
    tokenizer: Any,
    train_ds: Any,
    eval_ds: Any,
    questions: list[str],
    references: list[str],
    base_scores: dict[str, float],
    base_answers: list[str],
    checkpointing: bool,
    dev: torch.device,
    tracker: tracking.Tracker,
    trial: Any | None,
    phases: Phases,
) -> TrialResult:
    from finqa_exp import evaluation, training

    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "LoRA r=%d: %d trainable of %d parameters; gradient checkpointing %s",
        conf.lora.r,
        trainable,
        total,
        "on" if checkpointing else "off",
    )
    out_dir = Path(conf.paths.output_dir)
    # Logged before training, so that a pruned run too says how long it was to be: the
    # report's pruning savings and epoch axes read them.
    train_examples = len(train_ds)
    epoch_steps = training.steps_per_epoch(
        train_examples, conf.train.batch_size, conf.train.gradient_accumulation_steps
    )
    tracker.log_metrics({"train_examples": train_examples, "steps_per_epoch": epoch_steps})
    callbacks = training.extra_callbacks(conf.train.callbacks)
    if trial is not None:
        maximize = conf.study.direction == "maximize"
        schedule = training.eval_schedule(conf.train, train_examples)
        callbacks.append(training.PruningCallback(trial, maximize, train_examples, schedule))
    with phases("train"):
        result = training.train(
            model,
            tokenizer,
            train_ds,
            eval_ds,
            conf.train,
            out_dir / "trainer",
            dev,
            tracker,
            callbacks,
        )

    log.info("scoring the tuned model")
    with phases("generate_tuned"):
        tuned_scores, tuned_answers = evaluation.score(
            model,
            tokenizer,
            conf.data.prompt_template,
            questions,
            references,
            conf.eval.max_new_tokens,
            conf.eval.batch_size,
        )
    log.info("tuned ROUGE: %s", _fmt(tuned_scores))

    peaks, peak_kind = peak_memory_mb(dev)
    metrics: dict[str, float] = {
        **tuned_scores,
        **{f"base_{k}": v for k, v in base_scores.items()},
        **{f"delta_{k}": tuned_scores[k] - base_scores[k] for k in tuned_scores},
        "train_time_s": result.runtime_s,
        "train_tokens": float(result.tokens_seen),
        "tokens_per_s": result.tokens_per_s,
        "train_steps": float(result.steps),
        "train_batch_size": float(result.batch_size),
        **peaks,
        "trainable_params": float(trainable),
        "gradient_checkpointing": float(checkpointing),
    }
    if result.history.eval:
        metrics["eval_loss"] = result.history.eval[-1][1]
    if result.history.train:
        metrics["final_train_loss"] = result.history.train[-1][1]
    if conf.study.metric not in metrics:
        raise ValueError(
            f"study.metric={conf.study.metric} was not measured (eval loss needs a test split "
            f"and train.eval_strategy other than 'no')"
        )

    # The adapter first: a run whose adapter could not be saved is FAILED with no scores.
    with phases("save"):
        adapter_dir = out_dir / "adapter"
        model.save_pretrained(adapter_dir)  # safetensors
        tokenizer.save_pretrained(adapter_dir)
        if conf.tracking.log_adapter:
            tracker.log_artifacts(adapter_dir, "adapter")

    with phases("record"):
        tracker.log_metrics(metrics)
        tracker.set_tags({"peak_memory_kind": peak_kind})
        samples = [
            {"question": q, "reference": r, "base_answer": b, "tuned_answer": t}
            for q, r, b, t in zip(questions, references, base_answers, tuned_answers)
        ]
        tracker.log_table(samples[: conf.eval.num_samples], "samples.json")

    return TrialResult(
        objective=_objective(conf, metrics),
        metrics=metrics,
        run_id=None,
        adapter_dir=adapter_dir,
        samples=samples,
        history=result.history,
        model=model,
    )


def _fmt(scores: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in scores.items())
