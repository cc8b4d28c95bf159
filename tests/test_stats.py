"""The paired bootstrap on cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from finqa_exp import stats


def test_a_constant_difference_has_a_zero_width_interval():
    low, high = stats.paired_bootstrap([0.5, 0.7, 0.2], [0.4, 0.6, 0.1])
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)


def test_identical_sides_give_zero_and_unscored_questions_are_skipped():
    assert stats.paired_bootstrap([0.3, None, 0.5], [0.3, 0.9, 0.5]) == (0.0, 0.0)
    assert stats.paired([1.0, None, 3.0], [0.5, 2.0, None]).tolist() == [0.5]


def test_the_interval_matches_the_normal_theory_width_for_many_questions():
    rng = np.random.default_rng(1)
    diffs = rng.normal(0.05, 0.2, size=2000)
    low, high = stats.bootstrap_interval(diffs, resamples=4000)
    se = diffs.std(ddof=1) / np.sqrt(diffs.size)
    assert low < diffs.mean() < high
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert low == pytest.approx(diffs.mean() - 1.96 * se, abs=0.2 * se)


def test_same_scores_same_interval_and_a_wider_level_is_wider():
    a, b = [0.1, 0.5, 0.3, 0.9, 0.2], [0.2, 0.1, 0.3, 0.4, 0.0]
    assert stats.paired_bootstrap(a, b) == stats.paired_bootstrap(a, b)  # fixed seed
    l95, h95 = stats.paired_bootstrap(a, b, level=0.95)
    l99, h99 = stats.paired_bootstrap(a, b, level=0.99)
    assert l99 <= l95 < h95 <= h99


def test_no_common_question_gives_nan_and_mismatched_lengths_fail():
    assert all(np.isnan(stats.paired_bootstrap([None], [0.2])))
    with pytest.raises(ValueError, match="same questions"):
        stats.paired([0.1], [0.1, 0.2])
