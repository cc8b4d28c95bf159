"""Answer metrics beyond ROUGE, as Hugging Face ``evaluate`` modules.

``eval.metrics`` names them: a module shipped here (``numeric_accuracy``, in its own folder),
a local folder or script, or a hub name (``bleu``; needs the network once, then evaluate's
cache). Each is loaded before any model, so a metric that cannot be loaded is a one-line
error that costs nothing::

    python -m finqa_exp eval.metrics=[numeric_accuracy,/abs/path/my_metric]

A module scores the answers as a whole (its own aggregate, logged as is) and one question at
a time (the per-question table, and the bootstrap intervals). Float outputs are scores; int
outputs (``numeric_questions``) are counts. A module whose ``_compute`` takes
``per_question`` returns every question's scores in one call (``per_question``: score name ->
list, None where a question does not count); any other is called once per question.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

from finqa_exp.errors import BadInput

SHIPPED = Path(__file__).resolve().parent
# rouge-score's F-measures, which every trial scores (finqa_exp/evaluation.py).
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


class MetricError(BadInput, ValueError):
    """A metric in ``eval.metrics`` cannot be loaded or used."""


def source(name: str) -> str:
    """Where ``evaluate.load`` finds ``name``: a shipped folder, a local path, or the hub."""
    if (SHIPPED / name / f"{name}.py").is_file():
        return str(SHIPPED / name)
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.endswith(".py"):
        raise MetricError(f"eval.metrics: no metric file or folder at {name}")
    return name  # a hub name


def check(names: list[str]) -> None:
    """Find every metric without importing ``evaluate`` (MetricError for a missing local
    one): a sweep's check before its trials, which must stay fast. ``import evaluate``
    imports transformers' pipelines, about 10 s in a process without torch; each trial
    loads its metrics (:func:`load`) before its model anyway."""
    for name in names:
        source(name)


def expected_scores(names: list[str]) -> set[str] | None:
    """The score names a trial with ``eval.metrics=names`` logs: ROUGE's and the shipped
    metrics' (each is named for its score), found without importing ``evaluate``; None if
    another metric's names are only known once it is loaded (:func:`score_names`)."""
    if any(not (SHIPPED / name / f"{name}.py").is_file() for name in names):
        return None
    return {*ROUGE_KEYS, *names}


def score_names(modules: dict[str, Any]) -> set[str]:
    """The score names a trial logs with these loaded modules: ROUGE's, and the modules'
    float outputs, found by scoring one made-up answer."""
    found: set[str] = set(ROUGE_KEYS)
    for name, module in modules.items():
        try:
            out = module.compute(predictions=["It was 1.5%."], references=["It was 1.5%."])
        except Exception as err:  # a metric that cannot score plain strings fails here
            raise MetricError(f"eval.metrics: {name!r} cannot score answers: {err}") from err
        found.update(k for k, v in out.items() if isinstance(v, float))
    return found


def load(names: list[str]) -> dict[str, Any]:
    """The ``evaluate`` modules named in ``eval.metrics``, by name, loaded in memory."""
    import evaluate

    modules = {}
    for name in names:
        src = source(name)
        try:
            modules[name] = evaluate.load(src, keep_in_memory=True)
        except Exception as err:  # evaluate raises many kinds; say which metric and why
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise MetricError(f"eval.metrics: cannot load {name!r} ({src}): {first}") from err
    return modules


def compute(
    module: Any, predictions: list[str], references: list[str]
) -> tuple[dict[str, float], dict[str, int], dict[str, list[float | None]]]:
    """Scores over all answers, counts, and each score per question (None where a question
    does not count, e.g. numeric accuracy for a reference without a number)."""
    batched = "per_question" in inspect.signature(module._compute).parameters
    extra = {"per_question": True} if batched else {}
    whole = module.compute(predictions=predictions, references=references, **extra)
    scores = {k: float(v) for k, v in whole.items() if isinstance(v, float)}
    counts = {k: int(v) for k, v in whole.items() if isinstance(v, int) and not isinstance(v, bool)}
    given = whole.get("per_question") or {}
    if batched and all(len(given.get(k, ())) == len(predictions) for k in scores):
        return scores, counts, {k: [_score(v) for v in given[k]] for k in scores}
    per_question: dict[str, list[float | None]] = {k: [] for k in scores}
    for pred, ref in zip(predictions, references):
        one = module.compute(predictions=[pred], references=[ref])
        for k in scores:
            per_question[k].append(_score(one.get(k)))
    return scores, counts, per_question


def _score(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not math.isnan(value)
    return float(value) if ok else None
