"""Selective-prediction metrics against small cases computed by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from proxy.confidence import selective as s


def test_midranks_share_the_mean_rank_of_a_tie() -> None:
    assert s.midranks([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_auroc_counts_a_tied_pair_as_half() -> None:
    # Pairs (right vs wrong): .9>.5, .9>.1, .5=.5 (half), .5>.1  ->  3.5 / 4
    assert s.auroc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.875)


def test_auroc_extremes_and_all_tied() -> None:
    assert s.auroc([0.9, 0.8, 0.2], [1, 1, 0]) == 1.0
    assert s.auroc([0.1, 0.2, 0.9], [1, 1, 0]) == 0.0
    assert s.auroc([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0]) == 0.5


def test_auroc_is_undefined_with_one_class() -> None:
    assert math.isnan(s.auroc([0.2, 0.7], [1, 1]))


def test_auroc_ignores_missing_confidence() -> None:
    assert s.auroc([0.9, float("nan"), 0.1], [1, 1, 0]) == 1.0


def test_auroc_matches_pairwise_counting_with_many_ties() -> None:
    rng = np.random.default_rng(3)
    p = rng.integers(0, 5, size=60) / 4.0
    y = rng.integers(0, 2, size=60)
    wins = 0.0
    for i, j in itertools.product(np.nonzero(y == 1)[0], np.nonzero(y == 0)[0]):
        wins += 1.0 if p[i] > p[j] else 0.5 if p[i] == p[j] else 0.0
    expected = wins / (np.sum(y == 1) * np.sum(y == 0))
    assert s.auroc(p, y) == pytest.approx(expected)


def test_ece_keeps_ties_together_and_skips_empty_bins() -> None:
    # Sorted: .2 .2 .2 .8 -> the tie group starts at position 0, so bins 1 and 2 are empty.
    bins = s.reliability_bins([0.2, 0.8, 0.2, 0.2], [0, 1, 1, 0], bins=4)
    assert bins.counts == (3, 0, 0, 1)
    assert bins.bins_used == 2
    assert math.isnan(bins.accuracy[1])
    # 3/4·|0.2 − 1/3| + 1/4·|0.8 − 1| = 0.1 + 0.05
    assert bins.ece == pytest.approx(0.15)


def test_ece_with_fewer_answers_than_bins() -> None:
    # Positions 0 and 1 of 2 land in bins 0 and 2 of 5: ½·0.3 + ½·0.1
    assert s.ece([0.3, 0.9], [0, 1], bins=5) == pytest.approx(0.2)


def test_ece_is_zero_when_every_bin_is_calibrated() -> None:
    p = [0.25] * 4 + [0.75] * 4
    y = [1, 0, 0, 0, 1, 1, 1, 0]
    assert s.ece(p, y, bins=2) == pytest.approx(0.0)
    assert s.ece(p, y, bins=1) == pytest.approx(0.0)


def test_ece_of_an_overconfident_model() -> None:
    assert s.ece([0.9] * 10, [1] * 5 + [0] * 5, bins=10) == pytest.approx(0.4)


def test_ece_noise_floor_is_zero_when_labels_are_certain() -> None:
    assert s.ece_noise_floor([0.0, 1.0, 1.0, 0.0], bins=2) == 0.0


def test_ece_noise_floor_shrinks_with_the_sample() -> None:
    small = s.ece_noise_floor(np.linspace(0.05, 0.95, 40), bins=10, draws=200)
    large = s.ece_noise_floor(np.linspace(0.05, 0.95, 4000), bins=10, draws=50)
    assert large < 0.03 < small
    # Deterministic for a given seed, so reports do not wobble between runs.
    assert s.ece_noise_floor([0.3] * 50, draws=20, seed=1) == s.ece_noise_floor(
        [0.3] * 50, draws=20, seed=1
    )


def test_brier_and_log_loss() -> None:
    assert s.brier([1.0, 0.5, 0.0], [1, 0, 0]) == pytest.approx(0.25 / 3)
    assert s.log_loss([0.5, 0.5], [1, 0]) == pytest.approx(math.log(2))
    # A confident mistake is clipped, not infinite.
    assert math.isfinite(s.log_loss([0.0], [1]))
    assert s.log_loss([0.0], [1]) > 10


def test_risk_coverage_points_are_tie_group_boundaries() -> None:
    curve = s.risk_coverage([0.9, 0.8, 0.8, 0.1], [1, 0, 1, 0])
    assert curve.coverage == (0.25, 0.75, 1.0)
    assert curve.risk == pytest.approx((0.0, 1 / 3, 0.5))
    assert curve.thresholds == (0.9, 0.8, 0.1)


def test_risk_coverage_area_is_the_expectation_over_tie_breaks() -> None:
    # k=1: 0; k=2: half an error expected in the tie -> 0.5/2; k=3: 1/3; k=4: 2/4
    curve = s.risk_coverage([0.9, 0.8, 0.8, 0.1], [1, 0, 1, 0])
    assert curve.area == pytest.approx((0 + 0.25 + 1 / 3 + 0.5) / 4)


def test_coverage_at_target_risk() -> None:
    p, y = [0.9, 0.8, 0.8, 0.1], [1, 0, 1, 0]
    assert s.coverage_at_risk(p, y, 0.0) == 0.25
    assert s.coverage_at_risk(p, y, 0.34) == 0.75
    assert s.coverage_at_risk(p, y, 0.5) == 1.0
    assert s.coverage_at_risk([0.9, 0.1], [0, 1], 0.2) == 0.0


def test_penalty_is_the_price_of_a_wrong_answer() -> None:
    assert s.penalty(0.0) == 0.0
    assert s.penalty(0.5) == 1.0
    assert s.penalty(0.75) == pytest.approx(3.0)
    assert s.penalty(0.9) == pytest.approx(9.0)
    with pytest.raises(ValueError):
        s.penalty(1.0)


def test_penalised_score_by_hand() -> None:
    answered, correct = [True, True, False, True], [1, 0, 0, 1]
    assert s.penalised_score(answered, correct, 0.0) == pytest.approx(0.5)  # plain accuracy
    assert s.penalised_score(answered, correct, 0.5) == pytest.approx((1 - 1 + 0 + 1) / 4)
    assert s.penalised_score(answered, correct, 0.75) == pytest.approx((1 - 3 + 0 + 1) / 4)
    assert s.penalised_score([False] * 4, correct, 0.9) == 0.0


def test_outcome_rates_partition_the_questions() -> None:
    row = s.outcome([True, True, False, True], [1, 0, 0, 1], 0.75)
    assert (row.abstention_rate, row.accuracy, row.error_rate) == (0.25, 0.5, 0.25)
    assert row.risk == pytest.approx(1 / 3)
    assert row.score == pytest.approx(-0.25)
    assert math.isnan(s.outcome([False, False], [1, 0], 0.5).risk)


def test_answered_at_is_strictly_above_and_missing_abstains() -> None:
    got = s.answered_at([0.75, 0.76, float("nan"), 0.0], 0.75)
    assert got.tolist() == [False, True, False, False]
    assert s.answered_at([0.0, 0.1], 0.0).tolist() == [False, True]


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError):
        s.brier([0.1, 0.2], [1])
