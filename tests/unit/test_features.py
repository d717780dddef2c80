"""The vocabulary of scores: one table that the estimators, the policy and fitting share."""

from __future__ import annotations

import math

import pytest

from proxy.confidence.consistency import score_agreement
from proxy.confidence.features import (
    AGREEMENT_SCORES,
    HYBRID_FEATURES,
    LOGISTIC_FEATURES,
    LOGPROB_SCORES,
    SCORES,
    needing_top_k,
    uncalibrated,
)
from proxy.confidence.logprobs import scores_from_tokens
from proxy.confidence.shift_scores import question_words, text_scores
from proxy.policy.loading import PolicyError, parse_policy


def test_every_score_the_estimators_compute_is_in_the_vocabulary() -> None:
    lps, tops = [-0.1, -0.5, -2.0], [[-0.1, -2.5], [-0.5, -1.2], [-2.0, -0.3]]
    texts = text_scores([" Par", "is", "."], lps, question_words("Capital of France?"))
    computed = (
        set(scores_from_tokens(lps, tops))
        | set(score_agreement("Paris", ["Paris", "Lyon"]).features())
        | set(texts)
    )
    assert computed == set(SCORES)
    assert {SCORES[n].source for n in scores_from_tokens(lps, tops)} == {"logprobs"}
    assert {SCORES[n].source for n in texts} == {"text"}


def test_scores_that_need_top_k_are_exactly_those_missing_without_it() -> None:
    lps = [-0.1, -0.5]
    with_top = set(scores_from_tokens(lps, [[-0.1, -2.5], [-0.5, -1.2]]))
    without = set(scores_from_tokens(lps, []))
    assert sorted(with_top - without) == needing_top_k(SCORES)


def test_a_rule_may_name_every_rankable_score_and_no_other() -> None:
    base = "upstreams: {u: {base_url: 'http://x'}}\nmodels: {m: {upstream: u}}\n"
    for name in LOGPROB_SCORES:
        parse_policy(base + f"defaults: {{score: {name}}}\n")
    for name in AGREEMENT_SCORES:
        parse_policy(base + f"defaults: {{consistency_score: {name}}}\n")
    with pytest.raises(PolicyError, match="score must be one of"):
        parse_policy(base + "defaults: {score: log_length}\n")


def test_logistic_inputs_are_known_scores() -> None:
    assert set(LOGISTIC_FEATURES) <= set(SCORES)
    assert set(HYBRID_FEATURES) <= set(SCORES)


@pytest.mark.parametrize("name", sorted(SCORES))
def test_uncalibrated_values_stay_in_the_unit_interval_and_keep_the_order(name: str) -> None:
    values = [-1e9, -50.0, -3.0, -0.5, 0.0, 0.3, 0.9, 1.0, 800.0]
    mapped = [uncalibrated(name, v) for v in values]
    assert all(m is not None and 0.0 <= m <= 1.0 for m in mapped)
    assert mapped == sorted(mapped)  # higher raw score, never a lower value


def test_uncalibrated_without_a_value_is_none() -> None:
    assert uncalibrated("min_logprob", None) is None
    assert uncalibrated("min_logprob", math.log(0.25)) == pytest.approx(0.25)
