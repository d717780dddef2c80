"""Choosing a threshold for a target error: the bound, the procedure, and its guarantee."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from proxy.confidence.risk_control import GRID, binomial_cdf, choose_threshold, upper_bound
from proxy.policy.loading import parse_policy


def exact_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.mark.parametrize(
    ("k", "n", "p"), [(0, 10, 0.1), (3, 10, 0.3), (7, 40, 0.2), (50, 120, 0.45)]
)
def test_the_binomial_cdf_is_exact(k: int, n: int, p: float) -> None:
    assert binomial_cdf(k, n, p) == pytest.approx(exact_cdf(k, n, p), rel=1e-9)


@pytest.mark.parametrize(("errors", "n"), [(0, 10), (1, 20), (5, 50), (30, 100), (99, 100)])
def test_the_upper_bound_is_the_clopper_pearson_limit(errors: int, n: int) -> None:
    alpha = 0.05
    bound = upper_bound(errors, n, alpha)
    # At the bound the chance of seeing this few errors is exactly alpha; above it, less.
    assert exact_cdf(errors, n, bound) == pytest.approx(alpha, abs=1e-6)
    assert exact_cdf(errors, n, min(1.0, bound + 0.01)) < alpha
    assert bound > errors / n


def test_the_bound_with_no_errors_has_its_closed_form() -> None:
    # P(0 errors) = (1 - e)^n = alpha  =>  e = 1 - alpha^(1/n)
    assert upper_bound(0, 30, 0.05) == pytest.approx(1 - 0.05 ** (1 / 30), rel=1e-9)
    assert upper_bound(0, 0, 0.05) == 1.0  # nothing answered proves nothing


def test_the_lowest_threshold_that_keeps_the_bound_is_chosen() -> None:
    # Answers above 0.5 are right 19 times in 20; below, a coin flip.
    confidence = [0.9] * 400 + [0.3] * 400
    correct = [i % 20 != 0 for i in range(400)] + [i % 2 == 0 for i in range(400)]
    choice = choose_threshold(confidence, correct, target_error=0.1)
    assert choice.threshold is not None and 0.3 <= choice.threshold < 0.9
    assert choice.coverage == pytest.approx(0.5)
    assert choice.bound is not None and choice.bound <= 0.1
    assert choice.observed_error == pytest.approx(0.05)
    # a looser target buys more coverage (27.5 % observed, bounded by 32 %); an
    # impossible one buys nothing
    assert choose_threshold(confidence, correct, target_error=0.35).coverage == 1.0
    none = choose_threshold(confidence, correct, target_error=0.01)
    assert none.threshold is None and none.coverage == 0.0 and "refused" in (none.reason or "")


def test_too_few_labels_choose_nothing() -> None:
    choice = choose_threshold([0.99] * 5, [True] * 5, target_error=0.1)
    assert choice.threshold is None  # 5 of 5 right still allows a 45 % error rate
    assert choice.labels == 5


def test_the_guarantee_holds_on_fresh_data() -> None:
    """Simulated: the chosen threshold's true error exceeds the target in at most ~δ of runs."""
    rng = random.Random(0)
    target, delta, runs, violations = 0.2, 0.1, 100, 0
    for _ in range(runs):
        # P(correct) is calibrated: an answer with confidence p is right with probability p.
        ps = [rng.random() for _ in range(300)]
        ys = [rng.random() < p for p in ps]
        choice = choose_threshold(ps, ys, target_error=target, target_confidence=1 - delta)
        if choice.threshold is None:
            continue
        t = choice.threshold
        true_error = (1 - t) / 2  # uniform p above t: mean error (1 - t) / 2
        violations += true_error > target
    assert violations / runs <= delta


def test_a_rule_with_target_error_gets_its_threshold_from_the_calibration(tmp_path: Path) -> None:
    rng = random.Random(1)
    ps = [round(rng.random(), 4) for _ in range(2000)]
    ys = [rng.random() < p for p in ps]
    cal = {
        "format": "abstain-calibration/1", "method": "logprobs", "score": "min_logprob",
        "calibrator": {"kind": "platt", "a": 1.0, "b": 0.0},
        "validation": {"source": "synthetic", "confidence": ps, "correct": ys},
    }  # fmt: skip
    (tmp_path / "cal.json").write_text(json.dumps(cal))
    policy = parse_policy(
        """
upstreams: {u: {base_url: "http://x"}}
models: {m: {upstream: u, calibration: cal.json}}
tenants:
  clinic: {target_error: 0.2}
  strict: {target_error: 0.001}
""",
        base_dir=tmp_path,
    )
    clinic = policy.rule("clinic", "m")
    expected = choose_threshold(ps, ys, target_error=0.2)
    assert clinic.threshold == expected.threshold and clinic.threshold in GRID
    assert clinic.risk is not None and clinic.risk["labels"] == 2000
    assert clinic.risk["error_bound"] <= 0.2
    strict = policy.rule("strict", "m")
    assert strict.threshold == 1.0  # nothing qualifies: every answer is refused
    assert any("no threshold keeps" in w for w in policy.warnings())
    assert any("threshold" in line and "clinic" in line for line in policy.risk_report())


def test_the_verdict_shows_what_the_threshold_rests_on(tmp_path: Path) -> None:
    from proxy.evidence import CallEvidence, ChoiceEvidence
    from proxy.judge import judge_call

    cal = {
        "format": "abstain-calibration/1", "method": "logprobs", "score": "min_logprob",
        "calibrator": {"kind": "platt", "a": 1.0, "b": 0.0},
        "validation": {"source": "synthetic", "confidence": [0.9] * 300 + [0.2] * 300,
                       "correct": [True] * 300 + [False] * 300},
    }  # fmt: skip
    (tmp_path / "cal.json").write_text(json.dumps(cal))
    text = "upstreams: {u: {base_url: 'http://x'}}\nmodels: {m: {upstream: u, calibration: cal.json}}\n"
    rule = parse_policy(text + "defaults: {target_error: 0.05}\n", base_dir=tmp_path).rule(
        None, "m"
    )
    assert rule.threshold == 0.2  # the lowest t that leaves the wrong answers (at 0.2) out
    evidence = CallEvidence([ChoiceEvidence(0, "x", {"min_logprob": 5.0})])  # sigmoid(5) = 0.993
    shown = judge_call(evidence, rule)[0].to_dict()
    assert shown["decision"] == "answer" and shown["threshold"] == 0.2
    assert shown["risk"]["labels"] == 600 and shown["risk"]["error_bound"] <= 0.05
    assert shown["risk"]["coverage"] == 0.5
