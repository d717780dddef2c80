"""The shipped sentence calibration: it loads, says it was fitted on sentences, carries its
held-out labels, and the example policy uses it at granularity sentence without a warning."""

from __future__ import annotations

from pathlib import Path

from proxy.confidence.calibration import load_calibration
from proxy.confidence.features import SENTENCE_LOGISTIC_FEATURES
from proxy.confidence.risk_control import choose_threshold
from proxy.policy.loading import load_policy
from proxy.policy.rules import calibration_mismatches

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "policies" / "calibration" / "gemma-3-270m-sentence.json"
EXAMPLE = ROOT / "policies" / "multi-tenant.example.yaml"


def test_the_sentence_calibration_loads_and_records_granularity_sentence() -> None:
    cal = load_calibration(SHIPPED)
    assert cal.fitted_on["granularity"] == "sentence"
    assert cal.fitted_on["dataset"] == "facts-multi-dev"
    assert cal.fitted_on["template"] == "sentences-fewshot"
    assert cal.model == "gemma-3-270m" and cal.method == "logprobs"
    assert cal.inputs == SENTENCE_LOGISTIC_FEATURES
    assert cal.reference is not None
    assert set(cal.reference.inputs) == set(SENTENCE_LOGISTIC_FEATURES)
    # A sure sentence outranks a guess, whatever its first token (mean_entropy is the
    # negated entropy: higher is surer), and the guess is below any sensible threshold.
    sure = {"mean_logprob": -0.05, "min_logprob": -0.1, "mean_entropy": -0.2,
            "first_logprob": -0.01, "first_margin": 5.0, "log_length": 1.8}  # fmt: skip
    guess = {**sure, "mean_logprob": -1.0, "min_logprob": -5.8, "mean_entropy": -1.2,
             "first_logprob": -3.0, "first_margin": 0.1}  # fmt: skip
    assert (cal(sure) or 0.0) > 0.5 > (cal(guess) or 1.0)


def test_its_validation_block_is_the_held_out_test_split() -> None:
    cal = load_calibration(SHIPPED)
    labels = cal.validation
    assert labels["source"] == "facts-multi-test"
    assert labels["n"] == len(labels["confidence"]) == len(labels["correct"]) > 400
    assert all(0.0 <= p <= 1.0 for p in labels["confidence"])
    # target_error reads it: a loose target gets a threshold.
    choice = choose_threshold(labels["confidence"], labels["correct"], target_error=0.5)
    assert choice.threshold is not None and choice.labels == labels["n"]


def test_the_example_policy_judges_sentences_with_it_without_a_warning() -> None:
    rules = load_policy(EXAMPLE)
    rule = rules.rule("internal-tool", "gemma-3-270m-sentences")
    assert rule.granularity == "sentence" and rule.calibration is not None
    assert rule.calibration.fitted_on["granularity"] == "sentence"
    assert calibration_mismatches(rule) == []
    # The answer-level model of the same file is unchanged.
    assert rules.rule("internal-tool", "gemma-3-270m").granularity == "answer"
