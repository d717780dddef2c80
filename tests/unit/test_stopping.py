"""The Beta-posterior stopping rule and its helpers."""

from __future__ import annotations

import math
import random

import pytest

from proxy.confidence.stopping import (
    StoppingRule,
    agreement_cutpoint,
    check,
    expected_final_share,
    prob_final_above,
)


def first_stop(rule: StoppingRule, answers: list[bool], budget: int) -> tuple[int, str] | None:
    """Feed agree/disagree samples one at a time; where and why the rule first stops."""
    agreeing = 0
    for drawn, agrees in enumerate(answers, start=1):
        agreeing += agrees
        result = check(rule, agreeing=agreeing, drawn=drawn, budget=budget)
        if result.stop:
            return drawn, result.reason
    return None


def test_stops_early_on_unanimous_samples() -> None:
    rule = StoppingRule(threshold=0.5, risk=0.05)
    # P(more than 4 of 8 agree) after 2 of 2 agreeing is 37/42 = 0.881 (Beta-binomial(6; 3, 1)
    # puts 5/42 on 0..2 more); after 3 of 3 it is 0.960, past 1 - risk.
    assert check(rule, agreeing=2, drawn=2, budget=8).p_above == pytest.approx(37 / 42)
    assert check(rule, agreeing=3, drawn=3, budget=8).p_above == pytest.approx(0.9603, abs=1e-4)
    assert first_stop(rule, [True] * 8, budget=8) == (3, "above")
    # Clearing t takes strictly more than 4 of 8, so disagreement settles sooner: after
    # 0 of 2, P(at least 5 of the remaining 6 agree | Beta(1, 3)) = 1/21 < 0.05.
    assert first_stop(rule, [False] * 8, budget=8) == (2, "below")


def test_a_stricter_risk_needs_more_samples() -> None:
    loose = first_stop(StoppingRule(threshold=0.5, risk=0.1), [True] * 16, budget=16)
    strict = first_stop(StoppingRule(threshold=0.5, risk=0.01), [True] * 16, budget=16)
    assert loose is not None and strict is not None
    assert loose[0] < strict[0]


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("budget", [8, 16])
def test_never_stops_early_when_agreement_is_close_to_the_threshold(
    threshold: float, budget: int
) -> None:
    rule = StoppingRule(threshold=threshold, risk=0.05)
    checked = continued = 0
    for drawn in range(1, budget):
        for agreeing in range(drawn + 1):
            if abs(agreeing / drawn - threshold) > 0.1:
                continue
            result = check(rule, agreeing=agreeing, drawn=drawn, budget=budget)
            # The posterior never claims a side this close to t. The only stop allowed is
            # when the full budget's share is already on one side whatever comes next.
            cut = threshold * budget
            settled = agreeing > cut or agreeing + budget - drawn <= cut
            assert result.stop == settled, (drawn, agreeing, result)
            if result.stop:
                assert result.reason == "decided"
            checked += 1
            continued += not result.stop
    # The grid really exercised the rule, mostly on undecided states.
    assert checked >= budget // 2 and continued >= checked // 2


def test_stops_when_the_remaining_samples_cannot_change_the_outcome() -> None:
    rule = StoppingRule(threshold=0.5, risk=0.001)  # the posterior alone would not stop
    above = check(rule, agreeing=5, drawn=6, budget=8)
    assert (above.stop, above.reason) == (True, "decided")
    below = check(rule, agreeing=1, drawn=5, budget=8)
    assert (below.stop, below.reason) == (True, "decided")
    undecided = check(rule, agreeing=4, drawn=6, budget=8)
    assert not undecided.stop


def test_nothing_drawn_decides_nothing() -> None:
    # With t = 0.01 the prior alone puts P(r > t) at 0.99: still no stop without data.
    assert not check(StoppingRule(threshold=0.01), agreeing=0, drawn=0, budget=8).stop


def test_rule_validation() -> None:
    for bad in (
        {"threshold": 1.5},
        {"threshold": 0.5, "risk": 0.0},
        {"threshold": 0.5, "prior_agree": 0},
    ):
        with pytest.raises(ValueError):
            StoppingRule(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        check(StoppingRule(threshold=0.5), agreeing=1, drawn=9, budget=8)


def test_adaptive_stopping_saves_samples_on_easy_questions() -> None:
    rng = random.Random(7)
    rule = StoppingRule(threshold=0.5, risk=0.05)
    used, wrong_side = [], 0
    for true_rate in [0.97] * 200 + [0.03] * 200:
        answers = [rng.random() < true_rate for _ in range(8)]
        stop = first_stop(rule, answers, budget=8)
        used.append(stop[0] if stop else 8)
        if stop and stop[1] == ("below" if true_rate > 0.5 else "above"):
            wrong_side += 1
    assert sum(used) / len(used) <= 0.6 * 8
    assert wrong_side / len(used) <= 0.05


def test_final_share_prediction_by_hand() -> None:
    # 1 of 2 agreed, budget 4, t = 0.5: the share ends above 1/2 only if both remaining
    # samples agree: Beta(2, 2) predictive, P = (2/4) * (3/5) = 0.3.
    assert prob_final_above(1, 2, 4, 0.5) == pytest.approx(0.3)
    assert prob_final_above(3, 4, 4, 0.5) == 1.0
    assert prob_final_above(0, 3, 4, 0.5) == 0.0
    assert expected_final_share(2, 2, 8) == pytest.approx((2 + 6 * 3 / 4) / 8)
    assert expected_final_share(5, 8, 8) == pytest.approx(5 / 8)


def test_a_cut_point_near_one_does_not_stop_below_on_unanimous_samples() -> None:
    # A calibration that needs 8 of 8 samples to agree: testing the rate r would say
    # "below" at once; the predicted final share keeps sampling while 8 of 8 is likely.
    rule = StoppingRule(threshold=0.99, risk=0.05)
    assert not check(rule, agreeing=2, drawn=2, budget=8).stop
    assert check(rule, agreeing=3, drawn=4, budget=8).reason == "decided"


def test_agreement_cutpoint() -> None:
    assert agreement_cutpoint(lambda a: a, 0.7) == pytest.approx(0.7, abs=1e-3)

    def logistic(a: float) -> float:
        return 1 / (1 + math.exp(-(8 * a - 4)))

    # sigmoid(8a - 4) = 0.9 at a = (4 + ln 9) / 8.
    assert agreement_cutpoint(logistic, 0.9) == pytest.approx((4 + math.log(9)) / 8, abs=1e-3)
    assert agreement_cutpoint(lambda a: 0.2, 0.5) == 1.0
    assert agreement_cutpoint(lambda a: 0.8, 0.5) == 0.0
    assert agreement_cutpoint(lambda a: None, 0.5) == 1.0
