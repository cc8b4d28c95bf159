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
"""

from __future__ import annotations

import base64
import html
import logging
import math
import re
import shutil
import statistics
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from finqa_exp.config import ConfigError, PathsConfig, TrackingConfig
from finqa_exp.tracking import Champion, RunRecord, RunStore, TrackingError, champion_name, redact

log = logging.getLogger(__name__)

NONE = "-"  # a value the stores do not have
MAX_FAILURES = 10  # failed trials listed with their reasons
STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
LABELS = {s: s.lower() for s in STATES} | {"FAIL": "failed"}
ROUGE = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"))


class ReportError(RuntimeError):
    """Nothing to report (missing, empty or all-failed study); the message is one line."""


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


# ----------------------------------------------------------------------------- the stores


@dataclass(frozen=True)
class TrialRow:
    """One Optuna trial joined with its MLflow run."""

    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    run: RunRecord | None
    start: float | None  # unix seconds, from Optuna
    end: float | None
    steps_reported: tuple[int, ...]  # steps of its intermediate values (eval losses)
    fail_reason: str | None = None

    @property
    def duration_s(self) -> float | None:
        return None if self.start is None or self.end is None else self.end - self.start

    def metric(self, key: str) -> float | None:
        return self.run.metrics.get(key) if self.run else None


@dataclass
class StudyData:
    """Everything a report shows of one study, read from the stores."""

    name: str
    storage: str
    maximize: bool
    metric: str
    distributions: dict[str, Any]
    trials: list[TrialRow]
    importances: dict[str, float]
    importance_note: str
    # trial number -> (train loss, eval loss) as (step, value), for the top trials
    curves: dict[int, tuple[list[tuple[int, float]], list[tuple[int, float]]]]
    samples: list[dict[str, Any]]
    champion: Champion | None = None

    @property
    def ranked(self) -> list[TrialRow]:
        """Complete trials, best first (ties: lower trial number first)."""
        done = [t for t in self.trials if t.state == "COMPLETE" and t.value is not None]
        sign = -1.0 if self.maximize else 1.0
        return sorted(done, key=lambda t: (sign * t.value, t.number))

    @property
    def best(self) -> TrialRow:
        return self.ranked[0]

    @property
    def unfinished(self) -> int:
        return sum(t.state in ("RUNNING", "WAITING") for t in self.trials)


def storage_url(template: str, study: str) -> str:
    return template.replace("{study}", study)


_FILE_SCHEMES = ("sqlite:///", "journal://")


def storage_file(url: str) -> Path | None:
    """The file behind an SQLite or journal URL (opening a missing one would create it)."""
    for scheme in _FILE_SCHEMES:
        if url.startswith(scheme) and url != "sqlite:///:memory:":
            return Path(url.removeprefix(scheme)).absolute()
    return None


def available_studies(template: str) -> list[str]:
    """Study names found where ``template`` points (every file it matches for ``{study}``)."""
    import optuna

    from finqa_exp.sweeper import open_storage

    url = storage_url(template, "*")
    path = storage_file(url)
    if path is not None:
        scheme = next(s for s in _FILE_SCHEMES if url.startswith(s))
        urls = [f"{scheme}{p}" for p in sorted(path.parent.glob(path.name))]
    elif "*" in url:
        return []  # one database per study on a server: nothing to glob
    else:
        urls = [url]
    names: set[str] = set()
    for each in urls:
        try:
            names.update(optuna.get_all_study_names(open_storage(each)))
        except Exception:  # not a study file: skip it
            continue
    return sorted(names)


def _missing(name: str, template: str, where: str) -> ReportError:
    found = available_studies(template)
    listed = ", ".join(found) if found else "none"
    return ReportError(f"no study '{name}' in {where}; studies there: {listed}")


def open_study(template: str, name: str) -> Any:
    """The Optuna study, or ReportError naming the studies that do exist."""
    import optuna

    from finqa_exp.sweeper import open_storage

    url = storage_url(template, name)
    path = storage_file(url)
    if path is not None and not path.is_file():
        raise _missing(name, template, str(path.parent))
    try:
        return optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        raise _missing(name, template, redact(url)) from None


def trial_rows(study: Any, store: RunStore) -> list[TrialRow]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        run_id = t.user_attrs.get("mlflow_run_id")
        rows.append(
            TrialRow(
                number=t.number,
                state=t.state.name,
                value=t.value if t.state.name == "COMPLETE" else None,
                params=dict(t.params),
                run=store.run(run_id) if run_id else None,
                start=t.datetime_start.timestamp() if t.datetime_start else None,
                end=t.datetime_complete.timestamp() if t.datetime_complete else None,
                steps_reported=tuple(sorted(t.intermediate_values)),
                fail_reason=t.user_attrs.get("fail_reason"),
            )
        )
    return rows


def searched_distributions(study: Any) -> dict[str, Any]:
    """Each searched param's distribution, as the latest trial that sampled it had it."""
    found: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False):
        found.update(t.distributions)
    return dict(sorted(found.items()))


def param_importances(study: Any, complete: int) -> tuple[dict[str, float], str]:
    """Optuna's fANOVA importances (fixed seed, so stable), or why there are none."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator

    if complete < 2:
        return {}, f"needs at least 2 complete trials (this study has {complete})"
    try:
        found = optuna.importance.get_param_importances(
            study, evaluator=FanovaImportanceEvaluator(seed=0)
        )
    except (ValueError, RuntimeError) as err:
        return {}, f"could not be computed: {str(err).splitlines()[0]}"
    if not found:
        return {}, "no param varied across the complete trials"
    rough = "; rough with this few" if complete < 10 else ""
    return dict(sorted(found.items())), f"fANOVA on {complete} complete trials{rough}"


def logged_steps(history: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The per-step points of a history: a trial also logs its final eval loss at step 0
    with the summary metrics, which is not a point of the curve."""
    return [(step, value) for step, value in history if step > 0]


def load_study_data(rc: ReportConfig, study: Any, store: RunStore) -> StudyData:
    """Read one study's trials and their runs; ReportError if no trial is complete."""
    name = study.study_name
    if len(study.directions) > 1:
        raise ReportError(f"study '{name}' is multi-objective; reports cover one objective")
    trials = trial_rows(study, store)
    counts = state_counts(trials)
    if not trials:
        raise ReportError(f"study '{name}' has no trials yet")
    if counts["COMPLETE"] == 0:
        detail = ", ".join(f"{n} {LABELS[s]}" for s, n in counts.items() if n)
        reasons = [t.fail_reason for t in trials if t.fail_reason]
        why = f"; first failure: {reasons[0].splitlines()[0][:200]}" if reasons else ""
        raise ReportError(f"study '{name}' has no complete trial ({detail}){why}")
    data = StudyData(
        name=name,
        storage=redact(storage_url(rc.storage, name)),
        maximize=study.direction.name == "MAXIMIZE",
        metric="objective",
        distributions=searched_distributions(study),
        trials=trials,
        importances={},
        importance_note="",
        curves={},
        samples=[],
    )
    best = data.best
    if best.run is not None:
        data.metric = best.run.params.get("study.metric", "objective")
    data.importances, data.importance_note = param_importances(study, counts["COMPLETE"])
    for t in data.ranked[: rc.curves_top_k]:
        if t.run is not None:
            data.curves[t.number] = (
                logged_steps(store.history(t.run.run_id, "train_loss")),
                logged_steps(store.history(t.run.run_id, "eval_loss")),
            )
    if best.run is not None:
        data.samples = store.table(best.run.run_id, "samples.json")[: rc.num_examples]
    return data


# ----------------------------------------------------------------------------- numbers


def state_counts(trials: Sequence[TrialRow]) -> dict[str, int]:
    return {s: sum(t.state == s for t in trials) for s in STATES}


def busy_seconds(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals: wall time with at least one trial on."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


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
    counts: dict[str, int]
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
        if name in t.params and t.state in ("COMPLETE", "PRUNED", "FAIL"):
            key, label = bucket(dist, t.params[name])
            groups.setdefault(key, (label, []))[1].append(t)
    out = []
    for key in sorted(groups):
        label, members = groups[key]
        values = [t.value for t in members if t.state == "COMPLETE" and t.value is not None]
        best = (max if data.maximize else min)(values) if values else None
        counts = {s: sum(t.state == s for t in members) for s in ("COMPLETE", "PRUNED", "FAIL")}
        out.append(Effect(label, counts, best, statistics.fmean(values) if values else None))
    return out


def improvement_pct(base: float | None, tuned: float | None) -> float | None:
    if base is None or tuned is None or base == 0:
        return None
    return (tuned - base) / abs(base) * 100.0


# ----------------------------------------------------------------------------- formatting


def fmt_value(value: Any) -> str:
    """A param value as a person reads it: 3 significant digits, exponents for small floats."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}"
    return f"{value:.2e}"


def fmt_num(value: float | None, digits: int = 4) -> str:
    return NONE if value is None else f"{value:.{digits}f}"


def fmt_pct(value: float | None) -> str:
    return NONE if value is None else f"{value:+.1f}%"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


# ----------------------------------------------------------------------------- document
# The report is a list of blocks rendered twice, to Markdown and to HTML, so both always
# say the same thing. Text from the stores (answers, reasons) is escaped for each format.


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Strong:
    text: str


Inline = str | Code | Strong
Text = Inline | tuple[Inline, ...]


@dataclass(frozen=True)
class Heading:
    level: int
    text: Text


@dataclass(frozen=True)
class Para:
    text: Text


@dataclass(frozen=True)
class Bullets:
    items: tuple[Text, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[Text, ...], ...]
    numeric: tuple[bool, ...] = ()  # right-aligned columns


@dataclass(frozen=True)
class Image:
    file: str
    alt: str


Block = Heading | Para | Bullets | Table | Image
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")


def _parts(text: Text) -> tuple[Inline, ...]:
    return text if isinstance(text, tuple) else (text,)


def md_escape(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", text)


def md_inline(text: Text) -> str:
    out = []
    for part in _parts(text):
        if isinstance(part, Code):
            out.append(f"`{part.text}`")
        elif isinstance(part, Strong):
            out.append(f"**{md_escape(part.text)}**")
        else:
            out.append(md_escape(part))
    return "".join(out).replace("\r", "").replace("\n", "<br>")


def html_inline(text: Text) -> str:
    out = []
    for part in _parts(text):
        if isinstance(part, Code):
            out.append(f"<code>{html.escape(part.text)}</code>")
        elif isinstance(part, Strong):
            out.append(f"<strong>{html.escape(part.text)}</strong>")
        else:
            out.append(html.escape(part))
    return "".join(out).replace("\r", "").replace("\n", "<br>")


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {md_inline(b.text)}")
        elif isinstance(b, Para):
            out.append(md_inline(b.text))
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {md_inline(item)}" for item in b.items))
        elif isinstance(b, Table):
            align = [
                ("---:" if b.numeric and b.numeric[i] else "---") for i in range(len(b.header))
            ]
            lines = [
                "| " + " | ".join(md_inline(h) for h in b.header) + " |",
                "| " + " | ".join(align) + " |",
                *("| " + " | ".join(md_inline(c) for c in row) + " |" for row in b.rows),
            ]
            out.append("\n".join(lines))
        else:
            out.append(f"![{b.alt}]({b.file})")
    return "\n\n".join(out) + "\n"


CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #1f2328; line-height: 1.5; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 4px; font-size: 0.9em;
       overflow-wrap: anywhere; }
img { max-width: 100%; border: 1px solid #eaeef2; margin: 0.4em 0 1em; }
h1, h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; }
"""


def to_html(blocks: Sequence[Block], title: str, images: Mapping[str, bytes]) -> str:
    """One self-contained page: styles inline, PNGs embedded as base64."""
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{html_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{html_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            items = "".join(f"<li>{html_inline(item)}</li>" for item in b.items)
            body.append(f"<ul>{items}</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{html_inline(h)}</th>" for h in b.header)
            rows = []
            for row in b.rows:
                cells = "".join(
                    f"<td{' class=num' if b.numeric and b.numeric[i] else ''}>{html_inline(c)}</td>"
                    for i, c in enumerate(row)
                )
                rows.append(f"<tr>{cells}</tr>")
            body.append(
                f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            )
        else:
            data = base64.b64encode(images[b.file]).decode("ascii")
            body.append(f'<img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}">')
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------- sections


def partial_note(data: StudyData) -> Para | None:
    if not data.unfinished:
        return None
    finished = sum(t.state in ("COMPLETE", "PRUNED", "FAIL") for t in data.trials)
    return Para(
        (
            Strong(f"partial: {plural(data.unfinished, 'trial')} running/waiting"),
            f" in study {data.name}; the numbers below cover its {finished} finished trials.",
        )
    )


def summary_blocks(data: StudyData, plots: Mapping[str, str], level: int) -> list[Block]:
    counts = state_counts(data.trials)
    finished = [t for t in data.trials if t.start is not None and t.end is not None]
    spans = [(t.start, t.end) for t in finished]
    span = max(e for _, e in spans) - min(s for s, _ in spans) if spans else None
    direction = "maximized" if data.maximize else "minimized"
    blocks: list[Block] = [
        Heading(level, "Summary"),
        Bullets(
            (
                ("Objective: ", Code(data.metric), f" ({direction})"),
                "Trials: " + ", ".join(f"{n} {LABELS[s]}" for s, n in counts.items() if n),
                (
                    f"Wall time: {fmt_duration(busy_seconds(spans))} with at least one trial "
                    f"running (first start to last end: {fmt_duration(span)})"
                ),
                ("Stores: ", Code(data.storage), " (Optuna) and MLflow runs by trial"),
            )
        ),
        Para("Compute spent, by how the trials ended (sums over the trials):"),
    ]
    rows = []
    for state in STATES[:3]:
        members = [t for t in finished if t.state == state]
        sums = [sum(t.duration_s for t in members) if members else None, *metric_sums(members)]
        rows.append((LABELS[state], str(len(members)), *(fmt_duration(v) for v in sums)))
    total = [sum(t.duration_s for t in finished), *metric_sums(finished)]
    rows.append((Strong("total"), str(len(finished)), *(fmt_duration(v) for v in total)))
    blocks.append(
        Table(
            ("ended", "trials", "trial wall time (Optuna)", "trial_time_s", "train_time_s"),
            tuple(rows),
            (False, True, True, True, True),
        )
    )
    blocks.append(Para(savings_text(pruning_savings(data.trials))))
    failed = [t for t in data.trials if t.state == "FAIL"]
    if failed:
        blocks.append(Para("Failed trials:"))
        shown = [reason_text(t) for t in failed[:MAX_FAILURES]]
        if len(failed) > MAX_FAILURES:
            shown.append(f"and {len(failed) - MAX_FAILURES} more")
        blocks.append(Bullets(tuple(shown)))
    if "history" in plots:
        blocks.append(Image(plots["history"], f"optimization history of {data.name}"))
    return blocks


def metric_sums(trials: Sequence[TrialRow]) -> list[float | None]:
    """Sums of trial_time_s and train_time_s (only complete trials log them; None: none did)."""
    sums: list[float | None] = []
    for key in ("trial_time_s", "train_time_s"):
        values = [v for t in trials if (v := t.metric(key)) is not None]
        sums.append(sum(values) if values else None)
    return sums


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def reason_text(trial: TrialRow) -> str:
    reason = (trial.fail_reason or "no reason recorded").splitlines()[0]
    return f"trial {trial.number}: {reason[:300]}"


def savings_text(s: Savings) -> Text:
    if s.pruned == 0:
        return "Pruning saved nothing: no trial was pruned."
    if s.known == 0:
        return (
            f"Pruning stopped {plural(s.pruned, 'trial')}; their full length is not in the stores."
        )
    share = s.steps_skipped / s.steps_unpruned * 100 if s.steps_unpruned else 0.0
    text = (
        f"Pruning saved {plural(s.steps_skipped, 'optimizer step')}: it stopped "
        f"{plural(s.known, 'trial')} after {s.steps_run} of the {s.steps_planned} steps they "
        "would have run in full, which is "
        f"{share:.0f}% of the {s.steps_unpruned} steps all finished trials would have run "
        "unpruned (a pruned trial's full length: train.max_steps, or its first eval step "
        "(one epoch) times train.epochs)."
    )
    if s.seconds_saved is not None:
        text += (
            f" At the complete trials' mean {s.seconds_per_example * 1000:.2f} ms of training "
            f"per example, the {s.examples_skipped} examples skipped are about "
            f"{fmt_duration(s.seconds_saved)} of training time."
        )
    if s.known < s.pruned:
        text += f" ({plural(s.pruned - s.known, 'pruned trial')} of unknown length left out.)"
    return text


def override_line(params: Mapping[str, Any]) -> str:
    from finqa_exp.search_space import format_value

    return " ".join(f"{k}={format_value(v)}" for k, v in sorted(params.items()))


def winners_blocks(data: StudyData, top_k: int, level: int) -> list[Block]:
    names = list(data.distributions)
    # The objective is one of the shown metrics unless the study optimized something else.
    shown = {**dict(ROUGE), "eval_loss": "eval loss"}
    extra = () if data.metric in shown else (f"{data.metric} (objective)",)
    labels = [f"{v} (objective)" if k == data.metric else v for k, v in shown.items()]
    header = ("rank", "trial", *names, *extra, *labels, "train time", "MLflow run")
    rows = []
    for rank, t in enumerate(data.ranked[:top_k], start=1):
        rows.append(
            (
                str(rank),
                str(t.number),
                *(fmt_value(t.params.get(n, NONE)) for n in names),
                *((fmt_num(t.value),) if extra else ()),
                *(fmt_num(t.metric(key)) for key in shown),
                fmt_duration(t.metric("train_time_s")),
                Code(t.run.run_id) if t.run else NONE,
            )
        )
    best = data.best
    blocks: list[Block] = [
        Heading(level, f"Winners (top {min(top_k, len(data.ranked))} of {len(data.ranked)})"),
        Table(tuple(header), tuple(rows), (True, True, *[True] * (len(header) - 3), False)),
        Para(("Best trial ", Strong(str(best.number)), "; to train it again:")),
        Para(Code(f"python -m finqa_exp {override_line(best.params)}")),
    ]
    if data.champion is not None:
        c = data.champion
        whose = (
            "this study's best trial" if best.run and c.run_id == best.run.run_id else "another run"
        )
        blocks.append(
            Para(
                (
                    "Registered: model ",
                    Code(c.model_name),
                    f" version {c.version}, alias ",
                    Code(c.alias),
                    f" ({whose}, run ",
                    Code(c.run_id),
                    "); ask it with ",
                    Code(f'python -m finqa_exp.ask --model {c.model_name} "..."'),
                )
            )
        )
    return blocks


def base_vs_best_blocks(data: StudyData, level: int) -> list[Block]:
    best = data.best
    rows = []
    for key, label in ROUGE:
        base, tuned = best.metric(f"base_{key}"), best.metric(key)
        rows.append((label, fmt_num(base), fmt_num(tuned), fmt_pct(improvement_pct(base, tuned))))
    return [
        Heading(level, f"Base vs best (trial {best.number})"),
        Table(("metric", "base", "tuned", "improvement"), tuple(rows), (False, True, True, True)),
    ]


def params_blocks(data: StudyData, plots: Mapping[str, str], level: int) -> list[Block]:
    blocks: list[Block] = [Heading(level, "What each hyperparameter did")]
    if data.importances:
        ranked = sorted(data.importances.items(), key=lambda kv: (-kv[1], kv[0]))
        text = ", ".join(f"{k} {v:.2f}" for k, v in ranked)
        blocks.append(Para(f"Importance ({data.importance_note}; sums to 1): {text}."))
    else:
        blocks.append(Para(f"Importance: {data.importance_note}."))
    if "importance" in plots:
        blocks.append(Image(plots["importance"], "hyperparameter importance"))
    for name in data.distributions:
        rows = tuple(
            (
                e.label,
                str(e.counts["COMPLETE"]),
                str(e.counts["PRUNED"]),
                str(e.counts["FAIL"]),
                fmt_num(e.best),
                fmt_num(e.mean),
            )
            for e in effects(data, name)
        )
        blocks.append(Heading(level + 1, (Code(name),)))
        header = ("value", "complete", "pruned", "failed", f"best {data.metric}", "mean")
        blocks.append(Table(header, rows, (False, True, True, True, True, True)))
    for key, alt in (
        ("objective", "objective against each param"),
        ("parallel", "parallel coordinates"),
    ):
        if key in plots:
            blocks.append(Image(plots[key], alt))
    return blocks


def curves_blocks(data: StudyData, plots: Mapping[str, str], level: int) -> list[Block]:
    if "curves" not in plots:
        return []
    return [
        Heading(level, f"Loss curves of the top {len(data.curves)} trials"),
        Image(plots["curves"], "train and eval loss of the top trials"),
    ]


def examples_blocks(data: StudyData, level: int) -> list[Block]:
    if not data.samples:
        return []
    blocks: list[Block] = [
        Heading(level, f"Example answers (best trial {data.best.number}, test questions)")
    ]
    for i, row in enumerate(data.samples, start=1):
        blocks.append(Para((Strong(f"Q{i}."), " " + str(row.get("question", "")))))
        blocks.append(
            Table(
                ("", "answer"),
                (
                    ("reference", str(row.get("reference", ""))),
                    ("base", str(row.get("base_answer", ""))),
                    ("tuned", str(row.get("tuned_answer", ""))),
                ),
            )
        )
    return blocks


def study_blocks(
    data: StudyData, plots: Mapping[str, str], rc: ReportConfig, level: int
) -> list[Block]:
    blocks: list[Block] = []
    note = partial_note(data)
    if note is not None:
        blocks.append(note)
    blocks += summary_blocks(data, plots, level)
    blocks += winners_blocks(data, rc.top_k, level)
    blocks += base_vs_best_blocks(data, level)
    blocks += params_blocks(data, plots, level)
    blocks += curves_blocks(data, plots, level)
    blocks += examples_blocks(data, level)
    return blocks


def comparison_blocks(studies: Sequence[StudyData], plots: Mapping[str, str]) -> list[Block]:
    rows = []
    for d in studies:
        b = d.best
        counts = state_counts(d.trials)
        rows.append(
            (
                Code(d.name),
                "/".join(str(counts[s]) for s in STATES),
                f"{d.metric} {'max' if d.maximize else 'min'}",
                fmt_num(b.value),
                Code(override_line(b.params)),
                fmt_num(b.metric("base_rougeL")),
                fmt_num(b.metric("rougeL")),
                fmt_duration(sum(t.duration_s or 0.0 for t in d.trials)),
            )
        )
    header = ("study", "trials c/p/f/r/w", "objective", "best", "best params")
    header += ("base ROUGE-L", "best ROUGE-L", "compute")
    blocks: list[Block] = [
        Heading(2, "Side by side"),
        Table(header, tuple(rows), (False, False, False, True, False, True, True, True)),
    ]
    if "compare" in plots:
        blocks.append(Image(plots["compare"], "best objective so far per study"))
    return blocks


def document(
    studies: Sequence[StudyData], plots: Mapping[str, Mapping[str, str]], rc: ReportConfig
) -> list[Block]:
    names = [d.name for d in studies]
    blocks: list[Block] = [Heading(1, "Sweep report: " + " vs ".join(names))]
    blocks += [n for d in studies if (n := partial_note(d)) is not None] if len(studies) > 1 else []
    if len(studies) == 1:
        return blocks + study_blocks(studies[0], plots[studies[0].name], rc, 2)
    blocks += comparison_blocks(studies, plots.get("", {}))
    for d in studies:
        blocks.append(Heading(2, ("Study ", Code(d.name))))
        blocks += study_blocks(d, plots[d.name], rc, 3)
    return blocks


# ----------------------------------------------------------------------------- writing


def write_plots(data: StudyData, folder: Path, prefix: str) -> dict[str, str]:
    """The study's PNGs in ``folder``; returns plot kind -> file name."""
    from finqa_exp import report_plots as plot

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
        top = [t for t in data.ranked if t.number in data.curves]
        # Trials with other batch sizes take other numbers of steps per epoch: epochs
        # compare them, where each trial's epoch length is known.
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
        plot.loss_curves(target("curves"), curves, "epoch" if in_epochs else "step")
    return files


def best_so_far(data: StudyData) -> list[tuple[int, float]]:
    points, best = [], None
    for t in sorted(data.ranked, key=lambda t: t.number):
        if best is None or (t.value > best if data.maximize else t.value < best):
            best = t.value
        points.append((t.number, best))
    return points


def keep_champions(rc: ReportConfig, studies: Sequence[StudyData], store: RunStore) -> None:
    """Register each registered model's best trial (studies sharing a name: the best of
    them) unless a study is still running; then attach the current champions."""
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
        bests = sorted((d.best for d in group), key=lambda t: t.value, reverse=group[0].maximize)
        best = bests[0]
        # A champion is a decision: while trials still run it would move under the user.
        if rc.register and best.run is not None and not any(d.unfinished for d in group):
            owner = next(d for d in group if d.best is best)
            tags = {
                "study": owner.name,
                "trial_number": str(best.number),
                "objective": repr(best.value),
            }
            store.register_champion(model, best.run.run_id, alias=rc.alias, tags=tags)
        for d in group:
            d.champion = store.champion(model, rc.alias)


def report_name(rc: ReportConfig, names: Sequence[str]) -> str:
    return rc.name or "+".join(names)


def study_names(rc: ReportConfig) -> list[str]:
    """The studies asked for; with none given, the only study where ``storage`` points."""
    if not rc.studies:
        found = available_studies(rc.storage)
        if len(found) != 1:
            listed = ", ".join(found) if found else "none"
            raise ReportError(f"say which study: study=NAME (studies there: {listed})")
        return found
    return list(dict.fromkeys(rc.studies))


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
    names = study_names(rc)
    opened = [open_study(rc.storage, name) for name in names]  # a wrong name fails first
    store = RunStore(rc.tracking.uri)
    studies = [load_study_data(rc, study, store) for study in opened]
    keep_champions(rc, studies, store)

    reports = Path(rc.paths.reports_dir)
    reports.mkdir(parents=True, exist_ok=True)
    target = reports / report_name(rc, names)
    # Written aside, then swapped in: a reader never sees half a report, and plots that
    # this run did not draw do not linger from the last one.
    tmp = Path(tempfile.mkdtemp(dir=reports, prefix=f".{target.name}."))
    try:
        plots: dict[str, dict[str, str]] = {}
        for d in studies:
            prefix = "" if len(studies) == 1 else f"{d.name}-"
            plots[d.name] = write_plots(d, tmp, prefix)
        if len(studies) > 1:
            from finqa_exp import report_plots

            report_plots.compare_history(
                tmp / "compare.png", [(d.name, best_so_far(d)) for d in studies], studies[0].metric
            )
            plots[""] = {"compare": "compare.png"}
        blocks = document(studies, plots, rc)
        (tmp / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
        images = {p.name: p.read_bytes() for p in sorted(tmp.glob("*.png"))}
        title = "Sweep report: " + " vs ".join(names)
        (tmp / "report.html").write_text(to_html(blocks, title, images), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def to_config(cfg: DictConfig) -> ReportConfig:
    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(str(err).splitlines()[0]) from err
    assert isinstance(obj, ReportConfig)
    return obj


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        folder = write_report(to_config(cfg))
    except (ReportError, ConfigError, TrackingError) as err:
        log.debug("no report", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"report: {folder / 'report.md'} and {folder / 'report.html'}")


if __name__ == "__main__":
    sys.argv[1:] = study_shorthand(sys.argv[1:])
    main()
