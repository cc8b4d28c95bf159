"""A sweep's trials as a report reads them: the Optuna study joined with its MLflow runs.

Used by ``python -m finqa_exp.report study=NAME`` (finqa_exp/report/build.py). Finds and opens
the studies where ``storage`` points, and load_study_data joins each Optuna trial with its
MLflow run (read through finqa_exp.tracking) into a StudyData: trials, searched
distributions, fANOVA importances, the top trials' loss curves and the best trial's
sample answers. finqa_exp/report/numbers.py computes the rest of the report's numbers
from it. Nothing here writes a store.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finqa_exp.errors import BadInput
from finqa_exp.tracking import Champion, RunRecord, RunStore, names, redact

if TYPE_CHECKING:
    from finqa_exp.sweep.confirm import Confirmed

STATES = (names.COMPLETE, names.PRUNED, names.FAIL, "RUNNING", "WAITING")
FINISHED = STATES[:3]
LABELS = {s: s.lower() for s in STATES} | {names.FAIL: "failed"}


class ReportError(BadInput, RuntimeError):
    """Nothing to report (missing, empty or all-failed study); the message is one line."""


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
    values: tuple[float, ...] = ()  # every objective of a multi-objective study (value: first)

    @property
    def duration_s(self) -> float | None:
        return None if self.start is None or self.end is None else self.end - self.start

    def metric(self, key: str) -> float | None:
        return self.run.metrics.get(key) if self.run else None


@dataclass(frozen=True)
class ConfirmedRow:
    """A top trial trained again with other seeds (finqa_exp/sweep/confirm.py), with its runs."""

    trial: TrialRow
    confirmed: Confirmed  # the objective over seeds: values, seeds, mean and spread
    runs: tuple[RunRecord | None, ...]  # aligned with values
    # The objective per test question, averaged over the seeds (None: no scores.json).
    question_means: tuple[float | None, ...] | None

    @property
    def values(self) -> tuple[float, ...]:
        """The objective: the trial's own run, then one per seed."""
        return self.confirmed.values

    @property
    def seeds(self) -> tuple[int | None, ...]:
        """Aligned with values; None: the trial's own seed."""
        return self.confirmed.seeds

    @property
    def mean(self) -> float:
        return self.confirmed.mean

    @property
    def std(self) -> float:
        return self.confirmed.std


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
    # trial number -> the objective per test question (scores.json), for the top trials;
    # for a perplexity, each held-out document's summed NLL, its tokens in doc_tokens
    question_scores: dict[int, list[float | None]] = field(default_factory=dict)
    doc_tokens: list[int] | None = None
    # The confirmed configurations, best mean first ([] if the study was not confirmed).
    confirmed: list[ConfirmedRow] = field(default_factory=list)
    # A multi-objective study's objectives (metric first), which way each is better, and
    # the trials of its Pareto front; () for a single objective.
    objectives: tuple[str, ...] = ()
    maximizes: tuple[bool, ...] = ()
    pareto: tuple[int, ...] = ()

    @property
    def ranked(self) -> list[TrialRow]:
        """Complete trials, best first (ties: lower trial number first)."""
        done = [t for t in self.trials if t.state == names.COMPLETE and t.value is not None]
        sign = -1.0 if self.maximize else 1.0
        return sorted(done, key=lambda t: (sign * t.value, t.number))

    @property
    def best(self) -> TrialRow:
        return self.ranked[0]

    @property
    def unit(self) -> str:
        """What the objective is paired over: test questions, or held-out documents."""
        return "held-out document" if self.doc_tokens is not None else "test question"

    @property
    def finished(self) -> int:
        return sum(t.state in FINISHED for t in self.trials)

    @property
    def unfinished(self) -> int:
        return sum(t.state in ("RUNNING", "WAITING") for t in self.trials)


def _score(value: Any) -> float | None:
    """A per-question score as logged (NaN or None where the question does not count)."""
    return None if value is None or value != value else float(value)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def state_counts(trials: Sequence[TrialRow], states: Sequence[str] = STATES) -> dict[str, int]:
    return {s: sum(t.state == s for t in trials) for s in states}


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

    from finqa_exp.sweep.sweeper import open_storage

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


def _listed(found: Sequence[str]) -> str:
    return ", ".join(found) if found else "none"


def study_names(requested: Sequence[str], template: str) -> list[str]:
    """The studies asked for; with none given, the only study where ``template`` points."""
    if not requested:
        found = available_studies(template)
        if len(found) != 1:
            raise ReportError(f"say which study: study=NAME (studies there: {_listed(found)})")
        return found
    return list(dict.fromkeys(requested))


def _missing(name: str, template: str, where: str) -> ReportError:
    found = available_studies(template)
    return ReportError(f"no study '{name}' in {where}; studies there: {_listed(found)}")


def open_study(template: str, name: str) -> Any:
    """The Optuna study, or ReportError naming the studies that do exist."""
    import optuna

    from finqa_exp.sweep.sweeper import open_storage

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
        run_id = t.user_attrs.get(names.RUN_ID_ATTR)
        rows.append(
            TrialRow(
                number=t.number,
                state=t.state.name,
                value=t.values[0] if t.state.name == names.COMPLETE else None,
                params=dict(t.params),
                run=store.run(run_id) if run_id else None,
                start=t.datetime_start.timestamp() if t.datetime_start else None,
                end=t.datetime_complete.timestamp() if t.datetime_complete else None,
                steps_reported=tuple(sorted(t.intermediate_values)),
                fail_reason=t.user_attrs.get("fail_reason"),
                values=tuple(t.values) if t.state.name == names.COMPLETE else (),
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
        # A multi-objective study's importances are for its first objective.
        first = (lambda t: t.values[0]) if len(study.directions) > 1 else None
        found = optuna.importance.get_param_importances(
            study, evaluator=FanovaImportanceEvaluator(seed=0), target=first
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


def load_study_data(
    study: Any,
    store: RunStore,
    storage: str,
    curves_top_k: int,
    num_examples: int,
    scores_top_k: int = 0,
) -> StudyData:
    """Read one study's trials and their runs; ReportError if no trial is complete.

    ``storage`` is the URL template the study came from (shown, redacted); the loss
    curves of the best ``curves_top_k`` trials, the per-question scores of the best
    ``max(curves_top_k, scores_top_k)`` (the winners table's leads) and the best trial's
    first ``num_examples`` sample answers come along.
    """
    name = study.study_name
    trials = trial_rows(study, store)
    counts = state_counts(trials)
    if not trials:
        raise ReportError(f"study '{name}' has no trials yet")
    if counts[names.COMPLETE] == 0:
        detail = ", ".join(f"{n} {LABELS[s]}" for s, n in counts.items() if n)
        reasons = [t.fail_reason for t in trials if t.fail_reason]
        why = f"; first failure: {reasons[0].splitlines()[0][:200]}" if reasons else ""
        raise ReportError(f"study '{name}' has no complete trial ({detail}){why}")
    data = StudyData(
        name=name,
        storage=redact(storage_url(storage, name)),
        maximize=study.directions[0].name == "MAXIMIZE",  # the first ranks the trials
        metric="objective",
        distributions=searched_distributions(study),
        trials=trials,
        importances={},
        importance_note="",
        curves={},
        samples=[],
    )
    best = data.best
    if study.metric_names:  # set by the sweep (hydra.sweeper.metric_names)
        data.metric = study.metric_names[0]
    elif best.run is not None:
        data.metric = best.run.params.get("objective.metric", "objective")
    if len(study.directions) > 1:
        data.objectives = tuple(
            study.metric_names or (f"objective {i}" for i in range(len(study.directions)))
        )
        data.maximizes = tuple(d.name == "MAXIMIZE" for d in study.directions)
        data.pareto = tuple(sorted(t.number for t in study.best_trials))
    data.importances, data.importance_note = param_importances(study, counts[names.COMPLETE])
    for rank, t in enumerate(data.ranked[: max(curves_top_k, scores_top_k)]):
        if t.run is None:
            continue
        if rank < curves_top_k:
            data.curves[t.number] = (
                logged_steps(store.history(t.run.run_id, "train_loss")),
                logged_steps(store.history(t.run.run_id, "eval_loss")),
            )
        scores = question_scores(store, t.run.run_id, data.metric)
        if scores is not None and data.metric == names.PERPLEXITY:
            tokens = doc_tokens(store, t.run.run_id)
            if data.doc_tokens is not None and tokens != data.doc_tokens:
                scores = None  # scored on other tokens (another block size): no lead
            data.doc_tokens = data.doc_tokens or tokens
        if scores is not None:
            data.question_scores[t.number] = scores
    if best.run is not None:
        data.samples = store.table(best.run.run_id, names.SAMPLES_ARTIFACT)[:num_examples]
    data.confirmed = confirmed_rows(study, store, data)
    return data


def question_scores(store: RunStore, run_id: str, metric: str) -> list[float | None] | None:
    """The run's objective per test question, from its scores.json (None if it has none,
    or the objective is not scored per question, like eval_loss)."""
    rows = store.table(run_id, names.SCORES_ARTIFACT)
    column = "tuned_nll" if metric == names.PERPLEXITY else f"tuned_{metric}"
    return [_score(r[column]) for r in rows] if rows and column in rows[0] else None


def doc_tokens(store: RunStore, run_id: str) -> list[int]:
    """A text run's scored tokens per held-out document (its scores.json)."""
    return [int(r["tokens"]) for r in store.table(run_id, names.SCORES_ARTIFACT)]


def confirmed_rows(study: Any, store: RunStore, data: StudyData) -> list[ConfirmedRow]:
    from finqa_exp.sweep.confirm import confirmed

    by_number = {t.number: t for t in data.trials}
    rows = []
    for c in confirmed(study):
        run_ids = [c.trial.user_attrs.get(names.RUN_ID_ATTR)]
        run_ids += [t.user_attrs.get(names.RUN_ID_ATTR) for t in c.confirmations]
        runs = tuple(store.run(r) if r else None for r in run_ids)
        per_seed = [question_scores(store, r, data.metric) if r else None for r in run_ids]
        means = None
        if all(s is not None for s in per_seed) and len({len(s) for s in per_seed}) == 1:
            means = tuple(_mean_or_none(q) for q in zip(*per_seed))
        trial = by_number[c.trial.number]
        rows.append(ConfirmedRow(trial, c, runs, means))
    return rows


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    scored = [v for v in values if v is not None]
    return statistics.fmean(scored) if scored else None
