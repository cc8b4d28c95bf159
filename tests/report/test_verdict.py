"""The numbers behind "is the winner real?" on cases whose answer is known."""

from __future__ import annotations

import math

import pytest

from finqa_exp.report.numbers import expected_best, seed_noise


def test_expected_best_of_n_trials_follows_the_order_statistics():
    values = [1.0, 2.0, 3.0]
    assert expected_best(values, 1, maximize=True) == (
        pytest.approx(2.0),
        pytest.approx(math.sqrt(2 / 3)),
    )
    # max of 2 draws: P(1) = 1/9, P(2) = 3/9, P(3) = 5/9
    assert expected_best(values, 2, maximize=True)[0] == pytest.approx(22 / 9)
    assert expected_best(values, 2, maximize=False)[0] == pytest.approx(14 / 9)  # the min
    assert expected_best(values, 200, maximize=True)[0] == pytest.approx(3.0)
    means = [expected_best(values, n, maximize=True)[0] for n in (1, 2, 4, 8)]
    assert means == sorted(means)  # more trials never lower the expected best


def test_seed_noise_pools_the_variance_of_each_configuration():
    class Row:
        def __init__(self, *values: float) -> None:
            self.values = values

    assert seed_noise([Row(1.0, 3.0), Row(2.0, 2.0)]) == pytest.approx(1.0)  # sqrt((2 + 0) / 2)
    assert seed_noise([Row(1.0)]) is None  # one seed: no noise to measure
