"""Numeric accuracy: does the answer state the reference's key number?

A Hugging Face ``evaluate`` module, loaded from this folder (no hub)::

    import evaluate
    metric = evaluate.load("finqa_exp/metrics/numeric_accuracy")
    metric.compute(predictions=["It was $1,628.89."], references=["Revenue: 1628.89 USD"])
    # {'numeric_accuracy': 1.0, 'numeric_questions': 1}
    metric.compute(predictions=[...], references=[...], per_question=True)
    # adds 'per_question': {'numeric_accuracy': [1.0, None, ...]}: None where no number

ROUGE cannot tell "$1,628.89" from "$1,268.89"; this can. Only references that contain a
number count (``numeric_questions``); with none, the accuracy is NaN. The key number is the
reference's number with the most digits (the first of those): an amount, not a list marker
or a footnote. An answer states it when one of its numbers, rounded to the reference's
precision, equals it. ``$``, thousands separators and spaces before ``%`` are ignored; a
percentage matches its fraction too ("12 %" and "0.12"); "-5" and "\u2212 5" are negative (a
hyphen between words or numbers, as in "2019-2020", is not a sign).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import datasets
import evaluate

# A minus sign (not a hyphen after a word or number), a currency sign, digits with optional
# thousands separators, a decimal part, a percent sign.
NUMBER = re.compile(
    r"(?:(?<![\w.])(?P<sign>[-\u2212]))?\$?\s?"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?P<decimals>\.\d+)?\s?(?P<percent>%)?"
)


@dataclass(frozen=True)
class Number:
    value: float
    decimals: int  # digits after the decimal point, as written
    percent: bool
    digits: int  # significant length, to pick the key number


def numbers(text: str) -> list[Number]:
    """The numbers written in ``text``, in order."""
    found = []
    for m in NUMBER.finditer(text):
        if not m.group("digits") and not m.group("decimals"):
            continue
        whole = (m.group("digits") or "0").replace(",", "")
        frac = m.group("decimals") or ""
        value = float(whole + frac)
        if m.group("sign"):
            value = -value
        decimals = len(frac) - 1 if frac else 0
        found.append(Number(value, decimals, bool(m.group("percent")), len(whole) + decimals))
    return found


def key_number(reference: str) -> Number | None:
    """The reference's number with the most digits, the first of those; None if none."""
    found = numbers(reference)
    return max(found, key=lambda n: n.digits) if found else None


def states(answer: str, key: Number) -> bool:
    """Whether one of ``answer``'s numbers, rounded to ``key``'s precision, equals ``key``."""
    target = round(key.value, key.decimals)
    for n in numbers(answer):
        value = n.value
        if key.percent and not n.percent:
            value *= 100  # 0.12 for 12 %
        elif n.percent and not key.percent:
            value /= 100  # 12 % for 0.12
        if math.isclose(round(value, key.decimals), target, rel_tol=1e-12, abs_tol=1e-12):
            return True
    return False


def score(prediction: str, reference: str) -> float | None:
    """1.0 or 0.0 for a reference with a number, None for one without."""
    key = key_number(reference)
    return None if key is None else float(states(prediction, key))


class NumericAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: answers; references: reference answers (strings)",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self, predictions: list[str], references: list[str], per_question: bool = False
    ) -> dict:
        each = [score(p, r) for p, r in zip(predictions, references)]
        scored = [s for s in each if s is not None]
        accuracy = sum(scored) / len(scored) if scored else math.nan
        out: dict = {"numeric_accuracy": accuracy, "numeric_questions": len(scored)}
        if per_question:
            out["per_question"] = {"numeric_accuracy": each}
        return out
