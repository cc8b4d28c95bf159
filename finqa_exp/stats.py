"""Statistics for "is the difference real?": paired bootstrap intervals over test questions
(or, for a perplexity, over held-out documents).

    low, high = paired_bootstrap([0.2, 0.4, 0.1], [0.1, 0.3, 0.1])   # mean of a - b, 95 %

The same questions are scored for both sides (tuned and base, or two trials), so the
difference is resampled by question: what one question favours, the other side shares.
Percentile intervals, a fixed seed: the same scores give the same interval every time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95
SEED = 0


def paired(a: Sequence[float | None], b: Sequence[float | None] | None = None) -> np.ndarray:
    """``a - b`` (or ``a``) for the questions both sides scored (None: not scored)."""
    if b is None:
        return np.array([x for x in a if x is not None], dtype=float)
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same questions: {len(a)} vs {len(b)}")
    return np.array([x - y for x, y in zip(a, b) if x is not None and y is not None], dtype=float)


def bootstrap_interval(
    diffs: np.ndarray, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs``; (nan, nan) if empty."""
    if diffs.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, diffs.size, size=(resamples, diffs.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_bootstrap(
    a: Sequence[float | None],
    b: Sequence[float | None] | None = None,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> tuple[float, float]:
    """Interval of the mean of ``a - b`` over the questions both scored (of ``a`` alone
    when ``b`` is None)."""
    return bootstrap_interval(paired(a, b), resamples, level, seed)


def perplexity_interval(
    nll: Sequence[float],
    tokens: Sequence[int],
    base_nll: Sequence[float] | None = None,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a perplexity, ``exp(sum nll / sum tokens)`` over
    held-out documents (per document: summed negative log-likelihood and tokens), or of
    its difference from ``base_nll``'s on the same documents, resampled by document."""
    a, n = np.asarray(nll, dtype=float), np.asarray(tokens, dtype=float)
    if a.size == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, a.size, size=(resamples, a.size))
    count = n[idx].sum(axis=1)
    values = np.exp(a[idx].sum(axis=1) / count)
    if base_nll is not None:
        values -= np.exp(np.asarray(base_nll, dtype=float)[idx].sum(axis=1) / count)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
