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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from finqa_exp import data as data_lib
from finqa_exp import tracking
from finqa_exp.config import FinqaConfig, flatten, validate
from finqa_exp.tracking import names
from finqa_exp.tracking.trial_run import TrialRun

if TYPE_CHECKING:
    import torch

    from finqa_exp.training import LossHistory, TrainResult

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


@dataclass
class Base:
    """The base model as this trial uses it, with its tokenizer and tokenized splits."""

    source: str
    tokenizer: Any
    model: Any
    train_ds: Any
    eval_ds: Any
    data_key: str  # identifies tokenizer, data, template and max length


@dataclass
class Answers:
    """Greedy answers to the test questions and their ROUGE scores."""

    scores: dict[str, float]
    answers: list[str]


def run_trial(cfg: DictConfig) -> float:
    """Run one trial for the composed config and return its objective (``objective.metric``)."""
    return execute(cfg).objective


def execute(cfg: DictConfig, tracker: tracking.Tracker | None = None) -> TrialResult:
    """check -> data -> base -> base score -> LoRA -> train -> tuned score -> save and log."""
    start = time.perf_counter()
    conf = validate(cfg)  # ConfigError: ranges and consistency
    splits = load_data(conf)  # DataError: files, columns, sizes
    tracker = tracker or tracking.make_tracker(conf.tracking)  # TrackingError: unreachable
    # torch, transformers and bitsandbytes take seconds to import: only for good input.
    from finqa_exp import devices, modeling

    dev = devices.device()  # this process's one GPU, pinned before CUDA starts, or the CPU
    trial = _sweep_trial()
    # A failed or pruned trial's adapter, gradients and optimizer states go at once.
    on_failure = modeling.shared_base.discard_adapter
    with TrialRun(
        tracker, run_name(conf, trial), run_tags(conf, dev), trial, conf.paths.output_dir,
        start, on_failure,
    ) as run:  # fmt: skip
        run.log_config(flatten(cfg), OmegaConf.to_yaml(cfg, resolve=True))
        with run.phase("load"):
            base = load_base(conf, splits, dev)
        test = splits.test[: conf.eval.max_questions] if conf.eval.max_questions else splits.test
        before = score_base(conf, base, test, dev, run)
        with run.phase("add_lora"):
            model, checkpointing = add_adapter(conf, base, dev)
        trained = train_adapter(conf, model, base, dev, tracker, trial, run)
        with run.phase("generate_tuned"):
            after = score(conf, model, base.tokenizer, test)
        log.info("tuned ROUGE: %s", _fmt(after.scores))
        metrics = trial_metrics(conf, before, after, trained, model, checkpointing, dev)
        with run.phase("save"):  # before the scores: a run without its adapter has none
            adapter_dir = save_adapter(conf, model, base.tokenizer, tracker)
        with run.phase("record"):
            samples = record(conf, tracker, metrics, test, before, after)
        return TrialResult(
            objective=metrics[conf.objective.metric],
            metrics=run.complete(metrics),
            run_id=run.run_id,
            adapter_dir=adapter_dir,
            samples=samples,
            history=trained.history,
            model=model,
        )


# ----------------------------------------------------------------------------- steps


def load_data(conf: FinqaConfig) -> data_lib.Splits:
    splits = data_lib.load_splits(conf.data)
    stats = splits.stats
    log.info(
        "data: %d train / %d test pairs (%d rows; dropped %d unpaired, %d short, %d duplicate)",
        len(splits.train), len(splits.test), stats.rows, stats.unpaired,
        stats.short_answers, stats.duplicates,
    )  # fmt: skip
    return splits


def base_model_source(conf: FinqaConfig, splits: data_lib.Splits) -> str:
    """Local folder or hub id of the base model; builds (or reuses) the tiny one if asked."""
    from finqa_exp import tiny

    if conf.model.name_or_path:
        return conf.model.name_or_path
    return str(tiny.build_tiny_base(conf.model.tiny, splits.train, conf.paths.cache_dir))


def load_base(conf: FinqaConfig, splits: data_lib.Splits, dev: torch.device) -> Base:
    """The base model, loaded once per process (a sweep's later trials reuse it: adapters
    are swapped), and the tokenized splits."""
    import torch

    from finqa_exp import evaluation, modeling

    source = base_model_source(conf, splits)
    quant = "4-bit " + conf.quant.quant_type if conf.quant.load_in_4bit else "not quantized"
    log.info("base model %s (%s)", source, quant)
    tokenizer, model, reused = modeling.shared_base.get(source, conf.model, conf.quant, dev)
    log.info("base model %s", "reused from the previous trial" if reused else "loaded")
    if dev.type == "cuda":
        # From here on: what this trial adds to the resident base, loaded or reused.
        torch.cuda.reset_peak_memory_stats(dev)
    d = conf.data
    key = evaluation.cache_key(
        source, conf.model.revision, splits.fingerprint(), d.prompt_template, d.max_length
    )
    template, max_len = d.prompt_template, d.max_length
    train_ds = data_lib.tokenize(tokenizer, template, splits.train, max_len, f"train-{key}")
    eval_ds = data_lib.tokenize(tokenizer, template, splits.test, max_len, f"test-{key}")
    return Base(source, tokenizer, model, train_ds, eval_ds, key)


def score(conf: FinqaConfig, model: Any, tokenizer: Any, test: list[data_lib.QAPair]) -> Answers:
    from finqa_exp import evaluation

    scores, answers = evaluation.score(
        model, tokenizer, conf.data.prompt_template, [p.question for p in test],
        [p.answer for p in test], conf.eval.max_new_tokens, conf.eval.batch_size,
    )  # fmt: skip
    return Answers(scores, answers)


def score_base(
    conf: FinqaConfig, base: Base, test: list[data_lib.QAPair], dev: torch.device, run: TrialRun
) -> Answers:
    """The base model's answers and scores: computed once for a model, quantization, data,
    prompt and eval settings, then read from the cache by every later trial."""
    from finqa_exp import evaluation

    key = evaluation.cache_key(
        base.source, conf.model.revision, asdict(conf.quant), base.data_key,
        conf.eval.max_new_tokens, conf.eval.max_questions, str(dev.type),
    )  # fmt: skip
    cached = evaluation.load_cached(conf.paths.cache_dir, key)
    if cached is not None:
        result = Answers(cached["scores"], cached["answers"])
    else:
        log.info("scoring the base model on %d test questions", len(test))
        with run.phase("generate_base"):
            result = score(conf, base.model, base.tokenizer, test)
        evaluation.save_cached(
            conf.paths.cache_dir, key, {"scores": result.scores, "answers": result.answers}
        )
    log.info("base ROUGE: %s", _fmt(result.scores))
    return result


def add_adapter(conf: FinqaConfig, base: Base, dev: torch.device) -> tuple[Any, bool]:
    """The base with this trial's LoRA adapter; whether activation checkpointing is on."""
    from transformers import set_seed

    from finqa_exp import modeling

    longest = max(len(ex["input_ids"]) for ex in base.train_ds)
    checkpointing = modeling.use_gradient_checkpointing(
        conf.model.gradient_checkpointing, base.model.config, conf.train.batch_size, longest, dev
    )
    # Seed before the adapter is created: LoRA's A matrices are drawn from the global RNG,
    # which building the tiny base or scoring has already advanced by a varying amount.
    set_seed(conf.train.seed)
    model = modeling.shared_base.add_lora(conf.lora, checkpointing)
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "LoRA r=%d: %d trainable of %d parameters; gradient checkpointing %s",
        conf.lora.r, trainable, total, "on" if checkpointing else "off",
    )  # fmt: skip
    return model, checkpointing


def train_adapter(
    conf: FinqaConfig, model: Any, base: Base, dev: torch.device,
    tracker: tracking.Tracker, trial: Any | None, run: TrialRun,
) -> TrainResult:  # fmt: skip
    """Fine-tune the adapter; inside a sweep, eval losses go to the Optuna trial's pruner."""
    from finqa_exp import training

    # Logged before training, so that a pruned run too says how long it was to be: the
    # report's pruning savings and epoch axes read them.
    n = len(base.train_ds)
    epoch_steps = training.steps_per_epoch(
        n, conf.train.batch_size, conf.train.gradient_accumulation_steps
    )
    tracker.log_metrics({"train_examples": n, "steps_per_epoch": epoch_steps})
    callbacks = training.extra_callbacks(conf.train.callbacks)
    if trial is not None:
        maximize = conf.objective.direction == "maximize"
        schedule = training.eval_schedule(conf.train, n)
        callbacks.append(training.PruningCallback(trial, maximize, n, schedule))
    out_dir = Path(conf.paths.output_dir) / "trainer"
    with run.phase("train"):
        return training.train(
            model, base.tokenizer, base.train_ds, base.eval_ds, conf.train, out_dir, dev,
            tracker, callbacks,
        )  # fmt: skip


def trial_metrics(
    conf: FinqaConfig, before: Answers, after: Answers, trained: TrainResult, model: Any,
    checkpointing: bool, dev: torch.device,
) -> dict[str, float]:  # fmt: skip
    """What a trial's run records as metrics; checks that the objective was measured."""
    peaks = peak_memory_mb(dev)
    trainable, _ = model.get_nb_trainable_parameters()
    metrics: dict[str, float] = {
        **after.scores,
        **{f"base_{k}": v for k, v in before.scores.items()},
        **{f"delta_{k}": after.scores[k] - before.scores[k] for k in after.scores},
        "train_time_s": trained.runtime_s,
        "train_tokens": float(trained.tokens_seen),
        "tokens_per_s": trained.tokens_per_s,
        "train_steps": float(trained.steps),
        "train_batch_size": float(trained.batch_size),
        **peaks,
        "trainable_params": float(trainable),
        "gradient_checkpointing": float(checkpointing),
    }
    if trained.history.eval:
        metrics["eval_loss"] = trained.history.eval[-1][1]
    if trained.history.train:
        metrics["final_train_loss"] = trained.history.train[-1][1]
    if conf.objective.metric not in metrics:
        raise ValueError(
            f"objective.metric={conf.objective.metric} was not measured (eval loss needs a "
            f"test split and train.eval_strategy other than 'no')"
        )
    return metrics


def peak_memory_mb(dev: torch.device) -> dict[str, float]:
    """Peak memory of this trial's device: on GPU, PyTorch's peak allocated and reserved
    memory since the base was ready (nvidia-smi shows reserved plus the CUDA context); on
    CPU, the process's peak RSS."""
    import resource

    import torch

    if dev.type == "cuda":
        return {
            "peak_memory_mb": torch.cuda.max_memory_allocated(dev) / 2**20,
            "peak_memory_reserved_mb": torch.cuda.max_memory_reserved(dev) / 2**20,
        }
    # ru_maxrss is in KiB on Linux; it is the process's peak, so it includes loading.
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def save_adapter(conf: FinqaConfig, model: Any, tokenizer: Any, tracker: tracking.Tracker) -> Path:
    """The adapter (safetensors) and tokenizer in the job folder, and in the run."""
    adapter_dir = Path(conf.paths.output_dir) / names.ADAPTER_ARTIFACT
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    if conf.tracking.log_adapter:
        tracker.log_artifacts(adapter_dir, names.ADAPTER_ARTIFACT)
    return adapter_dir


def record(
    conf: FinqaConfig, tracker: tracking.Tracker, metrics: dict[str, float],
    test: list[data_lib.QAPair], before: Answers, after: Answers,
) -> list[dict[str, str]]:  # fmt: skip
    """Scores, what the peak memory measured, and sample answers, in the run."""
    tracker.log_metrics(metrics)
    # peak_memory_mb is CUDA's peak allocation on a GPU (reserved beside it), else RSS.
    kind = "cuda_max_allocated" if "peak_memory_reserved_mb" in metrics else "cpu_max_rss"
    tracker.set_tags({names.PEAK_MEMORY_KIND_TAG: kind})
    samples = [
        {"question": p.question, "reference": p.answer, "base_answer": b, "tuned_answer": t}
        for p, b, t in zip(test, before.answers, after.answers)
    ]
    tracker.log_table(samples[: conf.eval.num_samples], names.SAMPLES_ARTIFACT)
    return samples


# ----------------------------------------------------------------------------- sweeps


def run_name(conf: FinqaConfig, trial: Any | None) -> str:
    if conf.tracking.run_name:
        return conf.tracking.run_name
    return f"trial-{trial.number}" if trial is not None else f"{conf.model.name}-{conf.data.name}"


def run_tags(conf: FinqaConfig, dev: torch.device) -> dict[str, str]:
    from finqa_exp import devices

    return {
        **tracking.environment_tags(devices.describe_device(dev)),
        "model": conf.model.name,
        "data": conf.data.name,
        "experiment": conf.experiment or "default",
    }


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


def _fmt(scores: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in scores.items())
