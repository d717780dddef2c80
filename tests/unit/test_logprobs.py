"""Logprob scores, computed by hand on small token lists."""

from __future__ import annotations

import math

import pytest

from proxy.confidence.features import uncalibrated
from proxy.confidence.logprobs import scores_from_choice, scores_from_tokens


def test_scores_from_tokens_by_hand() -> None:
    s = scores_from_tokens([-0.1, -0.5, -0.3])
    assert s["mean_logprob"] == pytest.approx(-0.3)
    assert s["min_logprob"] == pytest.approx(-0.5)
    assert s["sequence_prob"] == pytest.approx(math.exp(-0.9))
    assert "mean_entropy" not in s  # no top_logprobs, no entropy


def test_entropy_of_uniform_top_k_is_log_k_and_negated() -> None:
    two_way = [math.log(0.5), math.log(0.5)]
    certain = [0.0]
    s = scores_from_tokens([math.log(0.5), 0.0], [two_way, certain])
    assert s["mean_entropy"] == pytest.approx(-(math.log(2) + 0.0) / 2)


def test_entropy_renormalises_a_truncated_top_k() -> None:
    # 0.4 and 0.1 renormalise to 0.8 / 0.2.
    s = scores_from_tokens([math.log(0.4)], [[math.log(0.4), math.log(0.1)]])
    h = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert s["mean_entropy"] == pytest.approx(-h)


def test_chat_shape() -> None:
    lp = {
        "content": [
            {"token": "A", "logprob": -0.2, "top_logprobs": [{"token": "A", "logprob": -0.2}]},
            {"token": "B", "logprob": -1.0, "top_logprobs": []},
        ]
    }
    s = scores_from_choice(lp)
    assert s["min_logprob"] == pytest.approx(-1.0)
    assert s["mean_logprob"] == pytest.approx(-0.6)


def test_completion_shape_skips_null_logprobs() -> None:
    lp = {
        "tokens": ["<echo>", "A", "B"],
        "token_logprobs": [None, -0.2, -0.4],
        "top_logprobs": [None, {"A": -0.2, "C": -2.0}, {"B": -0.4}],
    }
    s = scores_from_choice(lp)
    assert s["mean_logprob"] == pytest.approx(-0.3)
    assert "mean_entropy" in s


@pytest.mark.parametrize("empty", [None, {}, {"content": []}, {"token_logprobs": []}])
def test_no_tokens_no_scores(empty: dict | None) -> None:
    assert scores_from_choice(empty) == {}


def test_uncalibrated_probability_is_bounded_and_monotone() -> None:
    assert uncalibrated("min_logprob", 0.0) == 1.0
    assert uncalibrated("min_logprob", -1.0) == pytest.approx(math.exp(-1))
    assert uncalibrated("sequence_prob", 1.5) == 1.0
    assert uncalibrated("mean_entropy", -0.7) < uncalibrated("mean_entropy", -0.1)


def test_first_token_scores_and_length_by_hand() -> None:
    first, second = math.log(0.6), math.log(0.9)
    s = scores_from_tokens([first, second], [[first, math.log(0.3)], [second, math.log(0.05)]])
    assert s["first_logprob"] == pytest.approx(first)
    assert s["first_margin"] == pytest.approx(math.log(0.6 / 0.3))
    assert s["log_length"] == pytest.approx(math.log(2))


def test_first_margin_is_negative_when_a_sampled_token_was_not_the_favourite() -> None:
    chosen = math.log(0.2)
    s = scores_from_tokens([chosen], [[math.log(0.7), chosen, math.log(0.1)]])
    assert s["first_margin"] == pytest.approx(math.log(0.2 / 0.7))


def test_first_margin_when_the_chosen_token_missed_the_top_k() -> None:
    s = scores_from_tokens([math.log(0.01)], [[math.log(0.5), math.log(0.3)]])
    assert s["first_margin"] == pytest.approx(math.log(0.01 / 0.5))


def test_no_margin_without_a_rival_or_with_gaps_in_the_top_k() -> None:
    assert "first_margin" not in scores_from_tokens([-0.1], [[-0.1]])
    # The second token lacks a top-k list: the first list cannot be told apart.
    assert "first_margin" not in scores_from_tokens([-0.1, -0.2], [[-0.1, -3.0]])
    assert "first_margin" not in scores_from_tokens([-0.1, -0.2])


def test_first_margin_maps_to_a_two_way_share_without_calibration() -> None:
    assert uncalibrated("first_margin", 0.0) == pytest.approx(0.5)
    assert uncalibrated("first_margin", math.log(3)) == pytest.approx(0.75)
    assert uncalibrated("first_margin", -1e9) == pytest.approx(0.0)
    assert uncalibrated("first_logprob", math.log(0.4)) == pytest.approx(0.4)
