"""The numbers of a sweep report, computed from the trials that report_data read.

Used by ``python -m finqa_exp.report study=NAME`` (finqa_exp/report/build.py), through
finqa_exp/report/sections.py and the plots: wall time and compute by how trials ended,
the training examples and time pruning saved, each param value's effect on the
objective, base vs tuned improvement, best-so-far and the loss curves in epochs. Pure
functions of a StudyData or its TrialRows: nothing here reads a store.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from finqa_exp import stats
from finqa_exp.report.data import FINISHED, ConfirmedRow, StudyData, TrialRow, state_counts
from finqa_exp.report.render import fmt_value
from finqa_exp.tracking import RunRecord, names

# ----------------------------------------------------------------------------- time and compute


def choice_order(dist: Any) -> list[Any]:
    """A categorical param's choices in reading order: numbers ascending, then the rest."""

    def key(choice: Any) -> tuple[int, Any]:
        numeric = isinstance(choice, (int, float)) and not isinstance(choice, bool)
        return (0, choice) if numeric else (1, str(choice))

    return sorted(dist.choices, key=key)


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
    """Sums of trial_time_s and train_time_s (None: no trial logged it). Complete trials log
    both; pruned and failed trials log trial_time_s."""
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


def examples_reported(trial: TrialRow) -> tuple[int, ...]:
    """Training examples seen at each of the trial's reported evals (what
    training.PruningCallback reports as the step)."""
    return trial.steps_reported


def steps_per_epoch(trial: TrialRow) -> int | None:
    """Optimizer steps of one epoch, as the trial logged it before training; None if the
    trial has no run."""
    if trial.run is None or "steps_per_epoch" not in trial.run.metrics:
        return None
    return int(trial.run.metrics["steps_per_epoch"])


def planned_examples(trial: TrialRow) -> int | None:
    """Training examples the trial would have seen unpruned, from its own logged run:
    train.max_steps x examples per step when set, else train.epochs x the training
    examples it logged (train_examples). None if unknown."""
    if trial.run is None:
        return None
    p, metrics = trial.run.params, trial.run.metrics
    if int(p.get("train.max_steps", -1)) > 0:
        return int(p["train.max_steps"]) * examples_per_step(trial.run)
    if "train_examples" in metrics:
        return round(float(p["train.epochs"]) * metrics["train_examples"])
    return None


@dataclass(frozen=True)
class Savings:
    """What pruning saved, in training examples (see pruning_savings): the unit that costs
    the same whatever a trial's batch size, where optimizer steps do not."""

    pruned: int
    known: int  # pruned trials whose full length is known
    examples_run: int  # seen by those pruned trials before they stopped
    examples_planned: int  # by those pruned trials at full length
    examples_unpruned: int  # by every finished trial, had none been pruned
    seconds_per_example: float | None  # mean training time per example of complete trials

    @property
    def examples_skipped(self) -> int:
        return self.examples_planned - self.examples_run

    @property
    def seconds_saved(self) -> float | None:
        if self.seconds_per_example is None:
            return None
        return self.examples_skipped * self.seconds_per_example


def pruning_savings(trials: Sequence[TrialRow]) -> Savings:
    """Training examples the pruned trials skipped (planned minus seen), and the time that is.

    A pruned trial trained up to its last reported eval; its planned length comes from
    planned_examples. Time saved is an estimate: skipped examples times the complete
    trials' mean train_time_s per example trained on.
    """
    complete = [t for t in trials if t.state == names.COMPLETE and t.run is not None]
    done = [(t, planned_examples(t)) for t in complete]
    done = [(t, n) for t, n in done if n]
    rates = [t.run.metrics["train_time_s"] / n for t, n in done if "train_time_s" in t.run.metrics]
    pruned = [t for t in trials if t.state == "PRUNED"]
    known = [(examples_reported(t), planned_examples(t)) for t in pruned]
    known = [(seen[-1], n) for seen, n in known if n is not None and seen]
    planned = sum(n for _, n in known)
    return Savings(
        pruned=len(pruned),
        known=len(known),
        examples_run=sum(seen for seen, _ in known),
        examples_planned=planned,
        examples_unpruned=sum(n for _, n in done) + planned,
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
        values = [t.value for t in members if t.state == names.COMPLETE and t.value is not None]
        best = (max if data.maximize else min)(values) if values else None
        counts = state_counts(members, FINISHED)
        out.append(Effect(label, counts, best, statistics.fmean(values) if values else None))
    return out


def improvement_pct(base: float | None, tuned: float | None) -> float | None:
    if base is None or tuned is None or base == 0:
        return None
    return (tuned - base) / abs(base) * 100.0


@dataclass(frozen=True)
class Gap:
    """How much better the best trial scored than another, paired by test question."""

    mean: float
    low: float
    high: float

    @property
    def clear(self) -> bool:
        """The interval excludes 0: the best is better beyond the test questions' noise."""
        return self.low > 0


def gaps_to_best(data: StudyData) -> dict[int, Gap]:
    """For each top trial with per-question scores (the best's too): the best's lead over
    it on the objective, with its paired bootstrap interval (positive: the best is better,
    whatever the direction)."""
    best = data.question_scores.get(data.best.number)
    if best is None:
        return {}
    gaps = {}
    for number, scores in data.question_scores.items():
        if number == data.best.number or len(scores) != len(best):
            continue
        gap = _lead(best, scores, data.maximize, data.doc_tokens)
        if gap is not None:
            gaps[number] = gap
    return gaps


def _lead(
    best: Sequence[float | None],
    other: Sequence[float | None],
    maximize: bool,
    tokens: Sequence[int] | None = None,
) -> Gap | None:
    """The best's lead: the mean of its per-question differences, or with ``tokens`` (the
    scores are held-out documents' summed NLL) the difference of the two perplexities;
    each with its paired bootstrap interval."""
    lead, behind = (best, other) if maximize else (other, best)
    if tokens is not None:
        if len(tokens) != len(best) or any(v is None for v in (*best, *other)):
            return None
        a, b = [float(v) for v in lead], [float(v) for v in behind]  # type: ignore[arg-type]
        mean = math.exp(sum(a) / sum(tokens)) - math.exp(sum(b) / sum(tokens))
        low, high = stats.perplexity_interval(a, tokens, b)
        return Gap(mean, low, high)
    diffs = stats.paired(lead, behind)
    if not diffs.size:
        return None
    low, high = stats.bootstrap_interval(diffs)
    return Gap(float(diffs.mean()), low, high)


def confirmed_gaps(data: StudyData) -> dict[int, Gap]:
    """The best confirmed configuration's lead over each other one: its per-question
    objective averaged over seeds against theirs, paired by question."""
    rows = data.confirmed
    if not rows or rows[0].question_means is None:
        return {}
    best = rows[0].question_means
    gaps = {}
    for row in rows[1:]:
        if row.question_means is not None and len(row.question_means) == len(best):
            gap = _lead(best, row.question_means, data.maximize, data.doc_tokens)
            if gap is not None:
                gaps[row.trial.number] = gap
    return gaps


def seed_noise(rows: Sequence[ConfirmedRow]) -> float | None:
    """The objective's seed-to-seed standard deviation, pooled over the configurations
    confirmed (the root of their mean variance); None without two seeds anywhere."""
    variances = [statistics.variance(r.values) for r in rows if len(r.values) > 1]
    return math.sqrt(statistics.fmean(variances)) if variances else None


def expected_best(values: Sequence[float], n: int, maximize: bool) -> tuple[float, float]:
    """Expected best objective of ``n`` trials drawn from the study's results, and its
    standard deviation (Dodge et al. 2019, "Show Your Work"): the empirical distribution
    of the complete trials' values, sampled with replacement."""
    signed = sorted(v if maximize else -v for v in values)
    total = len(signed)
    probs = [((i + 1) / total) ** n - (i / total) ** n for i in range(total)]
    mean = sum(v * p for v, p in zip(signed, probs))
    var = max(0.0, sum(v * v * p for v, p in zip(signed, probs)) - mean * mean)
    return (mean if maximize else -mean), math.sqrt(var)
