"""The report's figures, as PNG files: matplotlib's Agg backend, fixed sizes and styles.

Called by finqa_exp/report/build.py (``python -m finqa_exp.report study=NAME``). Every function
takes plain numbers and writes one PNG; nothing here reads a store. Figures are built
on ``matplotlib.figure.Figure`` (no pyplot global state) inside a fixed rc context, and
saved without metadata that varies, so the same numbers give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution

from finqa_exp.report.numbers import choice_order
from finqa_exp.tracking import names

STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 8,
    "legend.frameon": False,
}
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
DPI = 100


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    # Software holds matplotlib's version; dropping it keeps the bytes tied to the numbers.
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _styled(draw):
    """Run a figure builder inside the fixed style, whatever the user's matplotlibrc says."""

    def wrapper(*args: Any, **kwargs: Any) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        with matplotlib.rc_context(rc={**matplotlib.rcParamsDefault, **STYLE}):
            return draw(*args, **kwargs)

    wrapper.__doc__ = draw.__doc__
    wrapper.__name__ = draw.__name__
    return wrapper


def axis_values(dist: BaseDistribution, values: Sequence[Any]) -> tuple[list[float], Any]:
    """Numbers to plot a param's values at, and the categorical ticks (None if numeric)."""
    if isinstance(dist, CategoricalDistribution):
        choices = choice_order(dist)
        index = {c: i for i, c in enumerate(choices)}
        return [float(index[v]) for v in values], [str(c) for c in choices]
    return [float(v) for v in values], None


def _is_log(dist: BaseDistribution) -> bool:
    return bool(getattr(dist, "log", False))


@_styled
def history(
    path: Path,
    finished: Sequence[tuple[int, float | None, str]],
    maximize: bool,
    metric: str,
) -> Path:
    """Objective per trial number, best so far as a step line; pruned/failed on the axis."""
    fig = _figure(7.5, 3.6)
    ax = fig.add_subplot()
    done = [(n, v) for n, v, state in finished if state == names.COMPLETE and v is not None]
    if done:
        xs, ys = zip(*done)
        ax.scatter(xs, ys, color=COLORS[0], s=28, label="complete", zorder=3)
        best, steps = None, []
        for x, y in done:
            best = y if best is None or (y > best if maximize else y < best) else best
            steps.append((x, best))
        bx, by = zip(*steps)
        ax.step(bx, by, where="post", color=COLORS[1], label="best so far")
    for state, marker, color in (("PRUNED", "x", COLORS[3]), ("FAIL", "v", "#555555")):
        xs = [n for n, _, s in finished if s == state]
        if xs:
            ax.scatter(
                xs,
                [0.0] * len(xs),
                transform=ax.get_xaxis_transform(),
                marker=marker,
                color=color,
                s=36,
                label=state.lower(),
                clip_on=False,
                zorder=3,
            )
    if finished:  # pruned/failed markers sit on the axis, outside autoscaling
        numbers = [n for n, _, _ in finished]
        ax.set_xlim(min(numbers) - 0.5, max(numbers) + 0.5)
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(f"Optimization history ({'higher' if maximize else 'lower'} is better)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="best")
    return _save(fig, path)


@_styled
def parallel(
    path: Path,
    distributions: Mapping[str, BaseDistribution],
    trials: Sequence[tuple[Mapping[str, Any], float]],
    metric: str,
) -> Path:
    """Parallel coordinates of the complete trials: one axis per param, then the objective."""
    from matplotlib import cm, colormaps
    from matplotlib.colors import Normalize

    names = sorted(distributions)
    fig = _figure(max(6.0, 2.2 * (len(names) + 1)), 4.0)
    ax = fig.add_subplot()
    values = [v for _, v in trials]
    norm = Normalize(min(values), max(values) if max(values) > min(values) else min(values) + 1)
    columns: list[list[float]] = []
    labels: list[list[tuple[float, str]]] = []  # per axis: (height, text)
    for name in names:
        dist = distributions[name]
        raw, ticks = axis_values(dist, [p[name] for p, _ in trials])
        if ticks is not None:  # every choice gets its label
            low, high = 0.0, float(max(len(ticks) - 1, 1))
            labels.append([(i / high, tick) for i, tick in enumerate(ticks)])
        else:
            low, high = float(dist.low), float(dist.high)
            labels.append([(0.0, _short(low)), (1.0, _short(high))])
        if _is_log(dist):
            raw, low, high = [math.log10(r) for r in raw], math.log10(low), math.log10(high)
        span = high - low or 1.0
        columns.append([(r - low) / span for r in raw])
    span = norm.vmax - norm.vmin
    columns.append([(v - norm.vmin) / span for v in values])
    labels.append([(0.0, _short(norm.vmin)), (1.0, _short(norm.vmax))])
    xs = list(range(len(names) + 1))
    # Worst first, so the best trials are drawn on top.
    order = sorted(range(len(trials)), key=lambda i: norm(values[i]))
    cmap = colormaps["viridis"]
    for i in order:
        ax.plot(xs, [col[i] for col in columns], color=cmap(norm(values[i])), lw=1.6, alpha=0.9)
    for x, axis_labels in zip(xs, labels):
        ax.axvline(x, color="#444444", lw=0.8)
        for height, text in axis_labels:
            ax.text(x + 0.03, height, text, ha="left", va="center", fontsize=8, color="#333333")
    ax.set_xticks(xs, [*names, metric])
    ax.set_yticks([])
    ax.set_ylim(-0.06, 1.06)
    ax.grid(False)
    ax.set_title("Parallel coordinates (complete trials; colour = objective)")
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric)
    return _save(fig, path)


def _short(value: float) -> str:
    return f"{value:.3g}"


@_styled
def importance(path: Path, importances: Mapping[str, float]) -> Path:
    """Horizontal bars of Optuna's parameter importances, most important on top."""
    names = sorted(importances, key=lambda n: (importances[n], n))
    fig = _figure(6.5, 0.5 + 0.45 * len(names))
    ax = fig.add_subplot()
    ax.barh(names, [importances[n] for n in names], color=COLORS[0])
    for y, name in enumerate(names):
        ax.text(importances[name], y, f" {importances[name]:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("importance (fANOVA, sums to 1)")
    ax.set_title("Hyperparameter importance")
    return _save(fig, path)


@_styled
def objective_vs_params(
    path: Path,
    distributions: Mapping[str, BaseDistribution],
    trials: Sequence[tuple[int, Mapping[str, Any], float]],
    best_number: int,
    metric: str,
) -> Path:
    """One panel per searched param: objective of each complete trial against its value."""
    names = sorted(distributions)
    fig = _figure(3.4 * len(names), 3.2)
    axes = fig.subplots(1, len(names), sharey=True, squeeze=False)[0]
    for ax, name in zip(axes, names):
        dist = distributions[name]
        xs, ticks = axis_values(dist, [p[name] for _, p, _ in trials])
        ys = [v for _, _, v in trials]
        ax.scatter(xs, ys, color=COLORS[0], s=28, zorder=3)
        best = [(x, y) for (n, _, _), x, y in zip(trials, xs, ys) if n == best_number]
        if best:
            ax.scatter(*zip(*best), marker="*", s=160, color=COLORS[1], zorder=4)
        if ticks is not None:
            ax.set_xticks(range(len(ticks)), ticks)
            ax.set_xlim(-0.5, len(ticks) - 0.5)
        elif _is_log(dist):
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.set_xlim(dist.low, dist.high)
            ax.xaxis.set_minor_formatter(NullFormatter())  # 2x10^-4 labels collide
        ax.set_xlabel(name)
    axes[0].set_ylabel(metric)
    fig.suptitle(f"{metric} against each searched hyperparameter (star: best trial {best_number})")
    return _save(fig, path)


@_styled
def loss_curves(
    path: Path,
    curves: Sequence[tuple[str, Sequence[tuple[float, float]], Sequence[tuple[float, float]]]],
    x_label: str = "step",
) -> Path:
    """Train loss (per logging step) and eval loss (per eval) of the top trials."""
    fig = _figure(9.0, 3.4)
    train_ax, eval_ax = fig.subplots(1, 2, sharey=False)
    for i, (label, train, evals) in enumerate(curves):
        color = COLORS[i % len(COLORS)]
        if train:
            train_ax.plot(*zip(*train), color=color, label=label, lw=1.4)
        if evals:
            eval_ax.plot(*zip(*evals), color=color, label=label, marker="o", lw=1.4)
    train_ax.set_title("train loss")
    eval_ax.set_title("eval loss")
    for ax in (train_ax, eval_ax):
        ax.set_xlabel(x_label)
    train_ax.legend(loc="best")
    return _save(fig, path)


@_styled
def compare_history(
    path: Path, studies: Sequence[tuple[str, Sequence[tuple[int, float]]]], metric: str
) -> Path:
    """Best objective so far per trial number, one line per study."""
    fig = _figure(7.5, 3.6)
    ax = fig.add_subplot()
    for i, (name, points) in enumerate(studies):
        if points:
            ax.step(*zip(*points), where="post", color=COLORS[i % len(COLORS)], label=name)
            ax.scatter(*zip(*points), color=COLORS[i % len(COLORS)], s=14)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"best {metric} so far")
    ax.set_title("Studies side by side")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="best")
    return _save(fig, path)
