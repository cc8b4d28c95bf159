"""``objective``: what a trial returns to the sweep (conf/objective/default.yaml).

    python -m finqa_exp -m objective.metric=numeric_accuracy
    python -m finqa_exp -m 'objective.metric=[rougeL,numeric_accuracy]' \\
        'objective.direction=[maximize,maximize]' hydra.sweeper.study_name=finqa_two
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finqa_exp.config.checks import _require

# Scores where lower is better: an objective on them is minimized.
LOWER_IS_BETTER = (
    "eval_loss", "final_train_loss", "train_time_s", "peak_memory_mb", "perplexity",
)  # fmt: skip
# Scores where higher is better (and their base_/delta_ forms): maximized.
HIGHER_IS_BETTER = ("rouge1", "rouge2", "rougeL", "numeric_accuracy", "tokens_per_s")


@dataclass
class ObjectiveConfig:
    """What a trial returns to the sweep: one logged metric (or a list of them, for a
    multi-objective study) and which way each is better.

        objective.metric=numeric_accuracy
        objective.metric=[rougeL,numeric_accuracy] objective.direction=[maximize,maximize]

    A name must be a metric the trial logs (finqa_exp/trial.py checks it against
    ``eval.metrics`` before any model loads); the first one ranks trials for confirmation,
    the champion and the report.
    """

    metric: Any = "rougeL"  # str, or a list of str
    # str, or a list as long as `metric` (the sweep's study takes it as its directions)
    direction: Any = "maximize"

    def __post_init__(self) -> None:
        metrics, directions = self.metrics, self.directions
        _require(
            bool(metrics) and all(isinstance(m, str) and m for m in metrics),
            f"objective.metric must be a metric name or a list of them, got {self.metric!r}",
        )
        _require(
            len(set(metrics)) == len(metrics),
            f"objective.metric lists a metric twice: {list(metrics)}",
        )
        allowed = ("maximize", "minimize")
        bad = [d for d in directions if d not in allowed]
        _require(not bad, f"objective.direction must be one of {allowed}, got {self.direction!r}")
        _require(
            len(directions) == len(metrics),
            f"objective.direction has {len(directions)} entries for {len(metrics)} "
            f"objective.metric entries ({list(metrics)})",
        )
        for metric, direction in zip(metrics, directions):
            better = better_direction(metric)
            _require(
                better is None or better == direction,
                f"objective.direction={direction} does not fit objective.metric={metric} "
                f"(it is {better}d)",
            )

    @property
    def metrics(self) -> tuple[str, ...]:
        return _as_tuple(self.metric)

    @property
    def directions(self) -> tuple[str, ...]:
        return _as_tuple(self.direction)


def better_direction(metric: str) -> str | None:
    """maximize/minimize for a metric whose better side is known, else None (the user's
    own ``evaluate`` metric: their direction is taken as given)."""
    name = metric.removeprefix("base_").removeprefix("delta_")
    name = name.removesuffix("_ci_low").removesuffix("_ci_high")
    if name in LOWER_IS_BETTER:
        return "minimize"
    if name in HIGHER_IS_BETTER:
        return "maximize"
    return None


def _as_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    if hasattr(value, "__iter__") and not isinstance(value, str):  # an OmegaConf ListConfig
        return tuple(value)
    return (value,)
