"""The schema: one dataclass per config group in ``conf/``, each checking its own ranges
in ``__post_init__`` (so a bad value fails while the config is built, naming the key and
the value). finqa_exp.config composes and validates with it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finqa_exp.config.checks import _module_exists, _require
from finqa_exp.config.data import DataConfig
from finqa_exp.config.objective import ObjectiveConfig


@dataclass
class TinyModelConfig:
    """Shape and pre-training of the offline tiny Llama (``model=tiny``)."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    max_position_embeddings: int = 512
    # Brief causal-LM pre-training on the plain text of the train split, so that LoRA
    # adapts a model that already knows the domain's words (see tiny.build_tiny_base).
    pretrain_epochs: int = 12
    pretrain_learning_rate: float = 3e-3
    pretrain_batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            value = getattr(self, key)
            _require(value >= 1, f"model.tiny.{key} must be >= 1, got {value}")
        _require(
            self.hidden_size % self.num_heads == 0,
            f"model.tiny.hidden_size ({self.hidden_size}) must be divisible by "
            f"model.tiny.num_heads ({self.num_heads})",
        )
        for key in ("hidden_size", "intermediate_size"):
            value = getattr(self, key)
            # bitsandbytes quantizes in blocks of 64 inputs; its CPU kernel needs whole blocks.
            _require(value % 64 == 0, f"model.tiny.{key} must be a multiple of 64, got {value}")
        _require(
            self.vocab_size >= 300, f"model.tiny.vocab_size must be >= 300, got {self.vocab_size}"
        )


@dataclass
class ModelConfig:
    """Which causal LM to tune. ``name_or_path`` null means the offline tiny Llama."""

    name: str = "tiny"
    name_or_path: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    # auto: on only where the estimated activations would not fit in free GPU memory
    # (modeling.use_gradient_checkpointing); true/false force it.
    gradient_checkpointing: str = "auto"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)

    def __post_init__(self) -> None:
        self.gradient_checkpointing = str(self.gradient_checkpointing).lower()
        choices = ("auto", "true", "false")
        _require(
            self.gradient_checkpointing in choices,
            f"model.gradient_checkpointing must be one of {choices}, "
            f"got '{self.gradient_checkpointing}'",
        )


@dataclass
class LoraConfig:
    """peft LoRA adapter."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )
    bias: str = "none"

    def __post_init__(self) -> None:
        _require(self.r >= 1, f"lora.r must be >= 1, got {self.r}")
        _require(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        _require(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")
        _require(len(self.target_modules) > 0, "lora.target_modules must not be empty")
        biases = ("none", "all", "lora_only")
        _require(self.bias in biases, f"lora.bias must be one of {biases}, got '{self.bias}'")


DTYPES = ("float32", "float16", "bfloat16", "auto")


@dataclass
class QuantConfig:
    """bitsandbytes quantization of the frozen base (``quant=nf4``) or none (``quant=none``)."""

    name: str = "nf4"
    load_in_4bit: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True
    # auto: bfloat16 on GPUs that support it, float16 on older GPUs, float32 on CPU.
    compute_dtype: str = "auto"

    def __post_init__(self) -> None:
        _require(
            self.quant_type in ("nf4", "fp4"),
            f"quant.quant_type must be 'nf4' or 'fp4', got '{self.quant_type}'",
        )
        _require(
            self.compute_dtype in DTYPES,
            f"quant.compute_dtype must be one of {DTYPES}, got '{self.compute_dtype}'",
        )


SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)


@dataclass
class TrainConfig:
    """The optimisation run (transformers Trainer arguments)."""

    learning_rate: float = 1e-3
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    epochs: float = 3.0
    max_steps: int = -1
    warmup_steps: int = 0
    scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    logging_steps: int = 5
    # Eval loss on the test split: at each epoch, every `eval_steps` steps, or never.
    eval_strategy: str = "epoch"
    eval_steps: int = 50
    # With eval_strategy=epoch: evals per epoch, at equal fractions of it (2: each half
    # epoch), and in the first epoch `evals_first_epoch` of them (null: the same), so that
    # a sweep's pruner can stop a bad trial early in its first epoch.
    evals_per_epoch: int = 1
    evals_first_epoch: int | None = None
    # Batches of similar length waste less compute on padding.
    group_by_length: bool = True
    # In a sweep with persistent storage: a checkpoint after each eval check (the newest
    # only, removed when the trial ends), so a killed or preempted trial's retry resumes
    # there instead of at step 0 (finqa_exp/checkpoints.py).
    checkpoints: bool = True
    # bf16/fp16 autocast on GPU; "auto" picks bf16 where supported.
    mixed_precision: str = "auto"
    # Extra transformers TrainerCallbacks by name, each a `_target_` object for
    # hydra.utils.instantiate, e.g.
    #   '+train.callbacks.stop={_target_: transformers.EarlyStoppingCallback,
    #                           early_stopping_patience: 2}'
    callbacks: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(
            self.learning_rate > 0, f"train.learning_rate must be > 0, got {self.learning_rate}"
        )
        _require(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _require(
            self.gradient_accumulation_steps >= 1,
            f"train.gradient_accumulation_steps must be >= 1, got "
            f"{self.gradient_accumulation_steps}",
        )
        _require(
            self.epochs > 0 or self.max_steps > 0,
            f"train.epochs must be > 0 (or set train.max_steps), got {self.epochs}",
        )
        _require(
            self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}"
        )
        _require(
            self.scheduler in SCHEDULERS,
            f"train.scheduler must be one of {SCHEDULERS}, got '{self.scheduler}'",
        )
        _require(
            self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}"
        )
        _require(
            self.logging_steps >= 1, f"train.logging_steps must be >= 1, got {self.logging_steps}"
        )
        strategies = ("epoch", "steps", "no")
        _require(
            self.eval_strategy in strategies,
            f"train.eval_strategy must be one of {strategies}, got '{self.eval_strategy}'",
        )
        _require(self.eval_steps >= 1, f"train.eval_steps must be >= 1, got {self.eval_steps}")
        _require(
            self.evals_per_epoch >= 1,
            f"train.evals_per_epoch must be >= 1, got {self.evals_per_epoch}",
        )
        _require(
            self.evals_first_epoch is None or self.evals_first_epoch >= 1,
            f"train.evals_first_epoch must be >= 1 or null, got {self.evals_first_epoch}",
        )
        precisions = ("auto", "no", "bf16", "fp16")
        _require(
            self.mixed_precision in precisions,
            f"train.mixed_precision must be one of {precisions}, got '{self.mixed_precision}'",
        )
        for name, spec in self.callbacks.items():
            _require(
                isinstance(spec, dict) and isinstance(spec.get("_target_"), str),
                f"train.callbacks.{name} must be a mapping with a '_target_' import path, "
                f"got {spec!r}",
            )
            module = spec["_target_"].rpartition(".")[0]
            _require(
                bool(module) and _module_exists(module),
                f"train.callbacks.{name}._target_: no module '{module}' to import "
                f"'{spec['_target_']}' from",
            )


@dataclass
class EvalConfig:
    """Scores of greedy answers on the test split, for the base and the tuned model: ROUGE,
    the ``evaluate`` metrics listed, and bootstrap intervals over the questions."""

    max_new_tokens: int = 64
    batch_size: int = 16
    # Cap on test questions scored (null: all of them).
    max_questions: int | None = None
    # Questions shown with reference, base and tuned answers in the logged table.
    num_samples: int = 10
    # Text data: prompts whose greedy completions, base and tuned, are logged side by side
    # (null: the first `probe_words` words of `num_samples` held-out documents, and the
    # Llama-2 project's own example prompt).
    probes: list[str] | None = None
    probe_words: int = 6
    # evaluate modules beside ROUGE: shipped (finqa_exp/metrics), a local path, or a hub name.
    metrics: list[str] = field(default_factory=lambda: ["numeric_accuracy"])
    # Paired bootstrap over the test questions: resamples and confidence level.
    bootstrap_resamples: int = 1000
    ci_level: float = 0.95

    def __post_init__(self) -> None:
        _require(
            self.max_new_tokens >= 1, f"eval.max_new_tokens must be >= 1, got {self.max_new_tokens}"
        )
        _require(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.max_questions is not None:
            _require(
                self.max_questions >= 1,
                f"eval.max_questions must be >= 1, got {self.max_questions}",
            )
        _require(self.num_samples >= 0, f"eval.num_samples must be >= 0, got {self.num_samples}")
        _require(self.probe_words >= 1, f"eval.probe_words must be >= 1, got {self.probe_words}")
        _require(
            self.probes is None or all(p.strip() for p in self.probes),
            f"eval.probes must not hold an empty prompt, got {self.probes!r}",
        )
        _require(
            self.bootstrap_resamples >= 1000,
            f"eval.bootstrap_resamples must be >= 1000, got {self.bootstrap_resamples}",
        )
        _require(0 < self.ci_level < 1, f"eval.ci_level must be in (0, 1), got {self.ci_level}")
        twice = len(set(self.metrics)) < len(self.metrics)
        _require(not twice, f"eval.metrics lists a metric twice: {list(self.metrics)}")


@dataclass
class TrackingConfig:
    """Where runs are recorded: MLflow (``tracking=mlflow``) or nowhere (``tracking=none``)."""

    backend: str = "mlflow"
    uri: str = "sqlite:///mlflow.db"
    experiment_name: str = "finqa"
    # Where a new experiment stores artifacts (adapters, tables); null: MLflow's default.
    artifact_location: str | None = None
    run_name: str | None = None
    log_adapter: bool = True

    def __post_init__(self) -> None:
        backends = ("mlflow", "none")
        _require(
            self.backend in backends,
            f"tracking.backend must be one of {backends}, got '{self.backend}'",
        )


@dataclass
class PathsConfig:
    """Where generated things go. All absolute, so sweeps in other folders agree."""

    root_dir: str = "."
    cache_dir: str = ".cache/finqa_exp"
    output_dir: str = "outputs"
    studies_dir: str = "studies"
    reports_dir: str = "reports"
    checkpoints_dir: str = "checkpoints"


@dataclass
class FinqaConfig:
    """The whole trial configuration (``conf/config.yaml`` composes it)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    # The experiment preset in use (null: plain defaults); recorded with every run.
    experiment: str | None = None

    def __post_init__(self) -> None:
        _require(
            not ("eval_loss" in self.objective.metrics and self.train.eval_strategy == "no"),
            "objective.metric=eval_loss needs train.eval_strategy=epoch or steps, got 'no'",
        )
