"""Sweep reports: which settings won, by how much and why; and the winner registered.

    python -m finqa_exp.report study=finqa_tiny_finqa_sample
    python -m finqa_exp.report 'studies=[finqa_tiny_finqa_sample,finqa_tinyllama_finance_alpaca]'
    python -m finqa_exp.report study=NAME 'storage=journal:///abs/studies/{study}.log' top_k=10

``study=NAME`` is short for ``studies=[NAME]``: the trial config has a ``study`` group
(conf/study), so Hydra itself would read ``study=NAME`` as a choice of that group.

Reads only the stores, the Optuna storage (``storage``; ``{study}`` stands for each study's
name) and MLflow (``tracking.uri``), and writes ``${paths.reports_dir}/<name>/``:
``report.md`` with its PNG plots next to it, and a single-file ``report.html``. The same
stores give the same bytes: nothing in it depends on when it was generated.
Unless ``register=false``, the best finished trial's adapter becomes the ``champion`` alias
of the registered model ``registered_model`` (idempotent). Config: ``conf/report.yaml``.

This module is the Hydra entry point and the order of work (write_report); the jobs live
next to it: report_data (read the stores), report_numbers (compute the figures),
report_sections (what the report says), report_render (Markdown and HTML), report_plots
(the PNGs).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.config_store import ConfigStore

from finqa_exp.config import ConfigError, PathsConfig, TrackingConfig
from finqa_exp.report.data import (
    ReportError,
    StudyData,
    TrialRow,
    load_study_data,
    open_study,
    study_names,
)
from finqa_exp.report.numbers import best_so_far, loss_curves
from finqa_exp.report.render import to_html, to_markdown
from finqa_exp.report.sections import document, report_title
from finqa_exp.tracking import RunStore, champion_name, champion_tags

if TYPE_CHECKING:
    from finqa_exp.sweep.confirm import Confirmed

log = logging.getLogger(__name__)


@dataclass
class ReportConfig:
    """``conf/report.yaml``: which studies, where they are, and what to show."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # Studies to report, side by side if several; empty: the only study there.
    studies: list[str] = field(default_factory=list)
    storage: str = "sqlite:///studies/{study}.db"
    # Folder under paths.reports_dir; null: the study names joined by '+'.
    name: str | None = None
    top_k: int = 5
    curves_top_k: int = 3
    num_examples: int = 5
    register: bool = True
    registered_model: str = "{study}"
    alias: str = "champion"

    def __post_init__(self) -> None:
        for key in ("top_k", "curves_top_k", "num_examples"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")


ConfigStore.instance().store(name="report_schema", node=ReportConfig)


def study_plots(data: StudyData, folder: Path, prefix: str) -> dict[str, str]:
    """The study's PNGs in ``folder``; returns plot kind -> file name."""
    from finqa_exp.report import plots as plot

    files: dict[str, str] = {}

    def target(kind: str) -> Path:
        files[kind] = f"{prefix}{kind}.png"
        return folder / files[kind]

    finished = [(t.number, t.value, t.state) for t in data.trials if t.end is not None]
    plot.history(target("history"), finished, data.maximize, data.metric)
    if data.importances:
        plot.importance(target("importance"), data.importances)
    ranked = [t for t in data.ranked if all(n in t.params for n in data.distributions)]
    if data.distributions and ranked:
        points = [(t.number, t.params, t.value) for t in ranked]
        plot.objective_vs_params(
            target("objective"), data.distributions, points, data.best.number, data.metric
        )
        plot.parallel(
            target("parallel"),
            data.distributions,
            [(t.params, t.value) for t in ranked],
            data.metric,
        )
    if data.curves:
        plot.loss_curves(target("curves"), *loss_curves(data))
    return files


def write_plots(studies: Sequence[StudyData], folder: Path) -> dict[str, dict[str, str]]:
    """Every plot of the report in ``folder``: each study's (its name as prefix when there
    are several) and, with several, the comparison. Returns study name ("" for the
    comparison) -> plot kind -> file name."""
    if len(studies) == 1:
        return {studies[0].name: study_plots(studies[0], folder, "")}
    from finqa_exp.report import plots as report_plots

    plots = {d.name: study_plots(d, folder, f"{d.name}-") for d in studies}
    report_plots.compare_history(
        folder / "compare.png", [(d.name, best_so_far(d)) for d in studies], studies[0].metric
    )
    plots[""] = {"compare": "compare.png"}
    return plots


def winner(d: StudyData) -> tuple[TrialRow, float, Confirmed | None, str] | None:
    """(trial, score, its values over seeds, study) of the study's winner: the best mean
    over seeds among its confirmed trials, else its best trial; None if it has no run."""
    if d.confirmed:
        top = d.confirmed[0]
        return (top.trial, top.mean, top.confirmed, d.name) if top.trial.run else None
    best = d.best
    return (best, best.value, None, d.name) if best.run and best.value is not None else None


def keep_champions(rc: ReportConfig, studies: Sequence[StudyData], store: RunStore) -> None:
    """Register each registered model's winner (studies sharing a name: the best of theirs)
    unless a study is still running; then attach the current champions."""
    groups: dict[str, list[StudyData]] = {}
    for d in studies:
        groups.setdefault(champion_name(rc.registered_model, d.name), []).append(d)
    for model, group in groups.items():
        kinds = {(d.metric, d.maximize) for d in group}
        if len(kinds) > 1:
            raise ReportError(
                f"registered_model={rc.registered_model} is one model for studies with "
                "different objectives; put {study} in it or set register=false"
            )
        # Each study's winner: its best mean over seeds if confirmed, else its best trial.
        winners = sorted(
            (w for d in group if (w := winner(d)) is not None),
            key=lambda w: w[1],
            reverse=group[0].maximize,
        )
        # A champion is a decision: while trials still run it would move under the user.
        if rc.register and winners and not any(d.unfinished for d in group):
            best, _, over_seeds, owner = winners[0]
            assert best.run is not None and best.value is not None
            tags = champion_tags(owner, best.number, best.value, over_seeds, best.params)
            store.register_champion(model, best.run.run_id, alias=rc.alias, tags=tags)
        for d in group:
            d.champion = store.champion(model, rc.alias)


def report_name(rc: ReportConfig, names: Sequence[str]) -> str:
    return rc.name or "+".join(names)


def study_shorthand(args: Sequence[str]) -> list[str]:
    """Command-line ``study=NAME`` (or ``study=[a,b]``) as ``studies=[...]``."""
    out = []
    for arg in args:
        if arg.startswith("study="):
            value = arg.removeprefix("study=")
            arg = f"studies={value}" if value.startswith("[") else f"studies=[{value}]"
        out.append(arg)
    return out


def write_report(rc: ReportConfig) -> Path:
    """Read the studies, register their champions, write the report folder; returns it."""
    if rc.tracking.backend != "mlflow":
        raise ReportError("reports read the trials' runs from MLflow: use tracking=mlflow")
    names = study_names(rc.studies, rc.storage)
    opened = [open_study(rc.storage, name) for name in names]  # a wrong name fails first
    store = RunStore(rc.tracking.uri)
    studies = [
        load_study_data(study, store, rc.storage, rc.curves_top_k, rc.num_examples, rc.top_k)
        for study in opened
    ]
    keep_champions(rc, studies, store)

    reports = Path(rc.paths.reports_dir)
    reports.mkdir(parents=True, exist_ok=True)
    target = reports / report_name(rc, names)
    # Written aside, then swapped in: a reader never sees half a report, and plots that
    # this run did not draw do not linger from the last one.
    tmp = Path(tempfile.mkdtemp(dir=reports, prefix=f".{target.name}."))
    try:
        blocks = document(studies, write_plots(studies, tmp), rc.top_k)
        (tmp / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
        images = {p.name: p.read_bytes() for p in sorted(tmp.glob("*.png"))}
        html = to_html(blocks, report_title(names), images)
        (tmp / "report.html").write_text(html, encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
