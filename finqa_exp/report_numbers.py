"""The numbers of a sweep report, computed from the trials that report_data read.

Used by ``python -m finqa_exp.report study=NAME`` (finqa_exp/report.py), through
finqa_exp/report_sections.py and the plots: wall time and compute by how trials ended,
the optimizer steps and training time pruning saved, each param value's effect on the
objective, base vs tuned improvement, best-so-far and the loss curves in epochs. Pure
functions of a StudyData or its TrialRows: nothing here reads a store.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from finqa_exp.report_data import FINISHED, StudyData, TrialRow, state_counts
from finqa_exp.report_render import fmt_value
from finqa_exp.tracking import RunRecord

# ----------------------------------------------------------------------------- time and compute


def busy_seconds(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals: wall time with at least one trial on."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def timed(trials: Sequence[TrialRow]) -> list[TrialRow]:
    """The trials Optuna has both a start and an end for."""
    return [t for t in trials if t.duration_s is not None]


def wall_time(trials: Sequence[TrialRow]) -> tuple[float, float | None]:
    """Seconds with at least one trial running, and from the first start to the last end
    (None: no trial has both)."""
    spans = [(t.start, t.end) for t in timed(trials)]
    span = max(e for _, e in spans) - min(s for s, _ in spans) if spans else None
    return busy_seconds(spans), span


def metric_sums(trials: Sequence[TrialRow]) -> list[float | None]:
    """Sums of trial_time_s and train_time_s (only complete trials log them; None: none did)."""
    sums: list[float | None] = []
    for key in ("trial_time_s", "train_time_s"):
        values = [v for t in trials if (v := t.metric(key)) is not None]
        sums.append(sum(values) if values else None)
    return sums


@dataclass(frozen=True)
class Spent:
    """Compute some trials spent: the sum of their Optuna start-to-end times, and of the
    trial_time_s and train_time_s their runs logged (None: none logged it)."""

    trials: int
    wall_s: float | None
    trial_time_s: float | None
    train_time_s: float | None


def compute_spent(trials: Sequence[TrialRow]) -> dict[str, Spent]:
    """Spent by the timed trials, per way they ended (COMPLETE, PRUNED, FAIL; wall_s None
    when none ended so) and in ``"total"``."""
    done = timed(trials)
    spent = {}
    for state in FINISHED:
        members = [t for t in done if t.state == state]
        wall = sum(t.duration_s for t in members) if members else None
        spent[state] = Spent(len(members), wall, *metric_sums(members))
    spent["total"] = Spent(len(done), sum(t.duration_s for t in done), *metric_sums(done))
    return spent


def best_so_far(data: StudyData) -> list[tuple[int, float]]:
    """(trial number, best objective up to it) along the complete trials."""
    points, best = [], None
    for t in sorted(data.ranked, key=lambda t: t.number):
        if best is None or (t.value > best if data.maximize else t.value < best):
            best = t.value
        points.append((t.number, best))
    return points


# ----------------------------------------------------------------------------- steps and pruning


def examples_per_step(run: RunRecord) -> int:
    p = run.params
    return int(p.get("train.batch_size", 1)) * int(p.get("train.gradient_accumulation_steps", 1))


def steps_per_epoch(trial: TrialRow) -> int | None:
    """Optimizer steps of one epoch: where the Trainer first evaluates with eval each epoch."""
    if trial.run is None or not trial.steps_reported:
        return None
    if trial.run.params.get("train.eval_strategy") != "epoch":
        return None
    return trial.steps_reported[0]


def planned_steps(trial: TrialRow, complete: Sequence[TrialRow]) -> int | None:
    """Optimizer steps the trial would have run unpruned, from its own logged config.

    max_steps when set; else, with eval each epoch, its first eval step is one epoch's
    steps (that is where the Trainer evaluates), times train.epochs; else the train_steps
    of a complete trial with the same examples per step and epochs. None if unknown.
    """
    if trial.run is None:
        return None
    p = trial.run.params
    if int(p.get("train.max_steps", -1)) > 0:
        return int(p["train.max_steps"])
    if (epoch := steps_per_epoch(trial)) is not None:
        return math.ceil(epoch * float(p["train.epochs"]) - 1e-9)
    for other in complete:
        if (
            other.run is not None
            and "train_steps" in other.run.metrics
            and examples_per_step(other.run) == examples_per_step(trial.run)
            and other.run.params.get("train.epochs") == p.get("train.epochs")
        ):
            return int(other.run.metrics["train_steps"])
    return None


@dataclass(frozen=True)
class Savings:
    """What pruning saved, in optimizer steps and training examples (see pruning_savings)."""

    pruned: int
    known: int  # pruned trials whose full length is known
    steps_run: int  # by those pruned trials before they stopped
    steps_planned: int  # by those pruned trials at full length
    steps_unpruned: int  # by every finished trial, had none been pruned
    examples_skipped: int
    seconds_per_example: float | None  # mean training time per example of complete trials

    @property
    def steps_skipped(self) -> int:
        return self.steps_planned - self.steps_run

    @property
    def seconds_saved(self) -> float | None:
        if self.seconds_per_example is None:
            return None
        return self.examples_skipped * self.seconds_per_example


def pruning_savings(trials: Sequence[TrialRow]) -> Savings:
    """Steps the pruned trials skipped (planned minus run) and the training time that is.

    A pruned trial ran up to its last reported eval step; its planned length comes from
    planned_steps. Time saved is an estimate: skipped training examples times the complete
    trials' mean train_time_s per example (train_steps x batch size x accumulation).
    """
    complete = [t for t in trials if t.state == "COMPLETE" and t.run is not None]
    done_steps = [
        int(t.run.metrics["train_steps"]) for t in complete if "train_steps" in t.run.metrics
    ]
    rates = [
        t.run.metrics["train_time_s"] / (t.run.metrics["train_steps"] * examples_per_step(t.run))
        for t in complete
        if t.run.metrics.get("train_steps") and "train_time_s" in t.run.metrics
    ]
    pruned = [t for t in trials if t.state == "PRUNED"]
    known = [(t, planned_steps(t, complete)) for t in pruned]
    known = [(t, n) for t, n in known if n is not None and t.steps_reported]
    run = sum(t.steps_reported[-1] for t, _ in known)
    planned = sum(n for _, n in known)
    skipped = sum((n - t.steps_reported[-1]) * examples_per_step(t.run) for t, n in known)
    return Savings(
        pruned=len(pruned),
        known=len(known),
        steps_run=run,
        steps_planned=planned,
        steps_unpruned=sum(done_steps) + planned,
        examples_skipped=skipped,
        seconds_per_example=statistics.fmean(rates) if rates else None,
    )


def loss_curves(
    data: StudyData,
) -> tuple[list[tuple[str, list[tuple[float, float]], list[tuple[float, float]]]], str]:
    """The top trials' (label, train loss, eval loss) curves, best first, and their x unit.

    Trials with other batch sizes take other numbers of steps per epoch: epochs compare
    them, where each trial's epoch length is known; else the x axis is optimizer steps.
    """
    top = [t for t in data.ranked if t.number in data.curves]
    per_epoch = {t.number: steps_per_epoch(t) for t in top}
    in_epochs = all(per_epoch.values())
    curves = []
    for t in top:
        scale = 1.0 / per_epoch[t.number] if in_epochs else 1.0
        label = f"trial {t.number}: " + ", ".join(
            f"{n.rsplit('.', 1)[-1]}={fmt_value(t.params.get(n))}" for n in data.distributions
        )
        train, evals = data.curves[t.number]
        curves.append(
            (label, [(s * scale, v) for s, v in train], [(s * scale, v) for s, v in evals])
        )
    return curves, "epoch" if in_epochs else "step"


# ----------------------------------------------------------------------------- params


def bucket(dist: Any, value: Any) -> tuple[tuple[Any, ...], str]:
    """Sort key and label of the group a param value falls in, for the effects tables.

    Categorical and small integer ranges: each value; log-scaled: its decade; other
    numbers: four equal-width bins of the searched range.
    """
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        from finqa_exp.report_plots import choice_order

        return (choice_order(dist).index(value),), str(value)
    small_int = isinstance(dist, IntDistribution) and (dist.high - dist.low) / dist.step < 8
    if small_int and not dist.log:
        return (value,), str(value)
    if dist.log:
        decade = math.floor(math.log10(value) + 1e-9)
        return (decade,), f"[{10.0**decade:.0e}, {10.0 ** (decade + 1):.0e})"
    width = (dist.high - dist.low) / 4 or 1.0
    i = min(int((value - dist.low) / width), 3)
    low, high = dist.low + i * width, dist.low + (i + 1) * width
    return (i,), f"[{fmt_value(low)}, {fmt_value(high)}{']' if i == 3 else ')'}"


@dataclass(frozen=True)
class Effect:
    label: str
    counts: dict[str, int]  # finished trials by state
    best: float | None
    mean: float | None


def effects(data: StudyData, name: str) -> list[Effect]:
    """Per value (or bucket) of one param: trials by state, best and mean objective."""
    from optuna.distributions import CategoricalDistribution

    dist = data.distributions[name]
    groups: dict[tuple[Any, ...], tuple[str, list[TrialRow]]] = {}
    if isinstance(dist, CategoricalDistribution):  # unsampled choices show as empty rows
        for choice in dist.choices:
            key, label = bucket(dist, choice)
            groups[key] = (label, [])
    for t in data.trials:
        if name in t.params and t.state in FINISHED:
            key, label = bucket(dist, t.params[name])
            groups.setdefault(key, (label, []))[1].append(t)
    out = []
    for key in sorted(groups):
        label, members = groups[key]
        values = [t.value for t in members if t.state == "COMPLETE" and t.value is not None]
        best = (max if data.maximize else min)(values) if values else None
        counts = state_counts(members, FINISHED)
        out.append(Effect(label, counts, best, statistics.fmean(values) if values else None))
    return out


def improvement_pct(base: float | None, tuned: float | None) -> float | None:
    if base is None or tuned is None or base == 0:
        return None
    return (tuned - base) / abs(base) * 100.0
