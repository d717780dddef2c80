"""Policy validation, rule layering, tenant lookup and the decision rule."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from proxy.confidence.selective import penalty
from proxy.policy.loading import PolicyError, load_policy, parse_policy
from proxy.policy.rules import decide

BASE = """
upstreams:
  up: {base_url: "http://127.0.0.1:9/v1"}
models:
  m: {upstream: up, threshold: 0.6}
  other: {upstream: up, upstream_model: real-name}
defaults: {threshold: 0.5, action: abstain}
tenants:
  t:
    api_key_sha256: ["KEYHASH"]
    action: hedge
""".replace("KEYHASH", hashlib.sha256(b"key-t").hexdigest())


def test_rules_layer_defaults_then_model_then_tenant() -> None:
    policy = parse_policy(BASE)
    assert policy.rule(None, "other").threshold == 0.5
    assert policy.rule(None, "m").threshold == 0.6
    rule = policy.rule("t", "m")
    assert (rule.threshold, rule.action, rule.tenant) == (0.6, "hedge", "t")
    assert policy.route("other").upstream_model == "real-name"
    assert policy.route("nope") is None


def test_tenant_lookup_by_hash_and_unknown_keys() -> None:
    policy = parse_policy(BASE)
    assert policy.tenant_for("key-t") == "t"
    assert policy.tenant_for("key-x") is None
    assert policy.tenant_for(None) is None
    default = parse_policy(BASE + "auth: {unknown_keys: default, default_tenant: t}\n")
    assert default.tenant_for("anything") == "t"
    assert default.tenant_for(None) == "t"


def test_every_problem_is_reported_with_its_key_path() -> None:
    text = BASE.replace("threshold: 0.6", "threshold: 1.5").replace(
        "action: hedge", "action: shrug\n    colour: blue"
    )
    with pytest.raises(PolicyError) as err:
        parse_policy(text, "p.yaml")
    problems = "\n".join(err.value.problems)
    assert "models.m.threshold" in problems
    assert "tenants.t.action" in problems
    assert "tenants.t.colour" in problems
    assert str(err.value).startswith("p.yaml: ")


@pytest.mark.parametrize(
    ("patch", "where"),
    [
        (("upstream: up, threshold", "upstream: nowhere, threshold"), "no upstream named 'nowhere'"),
        (('base_url: "http://127.0.0.1:9/v1"', 'base_url: "ftp://x"'), "base_url"),
        (('base_url: "http://127.0.0.1:9/v1"', 'base_url: "http://x", litellm_model: "a/b"'),
         "exactly one"),
        (("defaults: {threshold: 0.5", "defaults: {score: vibes, threshold: 0.5"), "score"),
        (('["', '["not-a-hash", "'), "api_key_sha256"),
    ],
)  # fmt: skip
def test_invalid_policies(patch: tuple[str, str], where: str) -> None:
    with pytest.raises(PolicyError, match=where):
        parse_policy(BASE.replace(*patch))


def test_default_tenant_must_exist() -> None:
    with pytest.raises(PolicyError, match="auth"):
        parse_policy(BASE + "auth: {unknown_keys: default, default_tenant: ghost}\n")


def test_yaml_errors_have_a_line_number() -> None:
    with pytest.raises(PolicyError, match=r"line \d+, column \d+: not valid YAML"):
        parse_policy("upstreams:\n  - [unclosed\n")


def test_calibration_path_is_relative_to_the_policy_file(tmp_path: Path) -> None:
    (tmp_path / "cal").mkdir()
    cal = {"format": "abstain-calibration/1", "score": "mean_logprob",
           "calibrator": {"kind": "platt", "a": 1.0, "b": 0.0}}  # fmt: skip
    (tmp_path / "cal" / "c.json").write_text(json.dumps(cal))
    (tmp_path / "p.yaml").write_text(BASE.replace("threshold: 0.6", "calibration: cal/c.json"))
    rule = load_policy(tmp_path / "p.yaml").rule(None, "m")
    assert rule.calibration is not None
    assert rule.score == "mean_logprob"  # the calibration decides which score is read


def test_broken_calibration_is_a_policy_error(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(BASE.replace("threshold: 0.6", "calibration: missing.json"))
    with pytest.raises(PolicyError, match=r"models\.m\.calibration"):
        load_policy(tmp_path / "p.yaml")


def test_decide_answers_only_above_the_threshold() -> None:
    rule = parse_policy(BASE).rule("t", "m")  # t = 0.6, action hedge
    assert decide(0.61, rule) == "answer"
    assert decide(0.6, rule) == "hedge"  # strictly greater
    assert decide(None, rule) == "hedge"  # on_missing_score defaults to the action


@pytest.mark.parametrize("threshold", [0.25, 0.5, 0.75, 0.9])
def test_decide_answers_exactly_when_answering_scores_above_abstaining(threshold: float) -> None:
    # Right earns 1, wrong costs t/(1−t), abstaining 0: answering pays iff p > t.
    rule = parse_policy(BASE.replace("threshold: 0.6", f"threshold: {threshold}")).rule("t", "m")
    assert rule.threshold == threshold
    for p in (threshold - 0.01, threshold + 0.01):
        expected_score = p - (1 - p) * penalty(threshold)
        assert (decide(p, rule) == "answer") == (expected_score > 0)


def _logistic_calibration(path: Path, method: str, second: str, **fitted_on: object) -> None:
    cal = {
        "format": "abstain-calibration/1",
        "method": method,
        "score": "mean_logprob",
        "calibrator": {"kind": "logistic", "features": ["mean_logprob", second],
                       "weights": [1.0, 1.0], "bias": 0.0},
        "fitted_on": fitted_on,
    }  # fmt: skip
    path.write_text(json.dumps(cal))


def _hybrid_calibration(tmp_path: Path) -> None:
    _logistic_calibration(tmp_path / "hybrid.json", "hybrid", "agreement", samples=8,
                          sample_temperature=0.7, matcher="embedding",
                          embedding_threshold=0.7)  # fmt: skip


def test_a_rule_that_samples_as_its_calibration_was_fitted_has_no_warning(tmp_path: Path) -> None:
    _hybrid_calibration(tmp_path)
    route = ("m: {upstream: up, method: hybrid, calibration: hybrid.json, samples: 8, "
             "sample_temperature: 0.7, matcher: embedding, embedding_threshold: 0.7}")  # fmt: skip
    (tmp_path / "p.yaml").write_text(BASE.replace("m: {upstream: up, threshold: 0.6}", route))
    assert load_policy(tmp_path / "p.yaml").warnings() == []


def test_calibration_mismatches_are_warned_about(tmp_path: Path) -> None:
    _hybrid_calibration(tmp_path)
    route = "m: {upstream: up, method: hybrid, calibration: hybrid.json, matcher: exact}"
    wrong_method = "other: {upstream: up, calibration: hybrid.json}"
    text = BASE.replace("m: {upstream: up, threshold: 0.6}", route).replace(
        "other: {upstream: up, upstream_model: real-name}", wrong_method
    )
    (tmp_path / "p.yaml").write_text(text)
    warnings = "\n".join(load_policy(tmp_path / "p.yaml").warnings())
    assert (
        "models.m: matcher is 'exact' but the calibration was fitted with 'embedding'" in warnings
    )
    assert "models.m: sample_temperature is 1.0 but the calibration was fitted with 0.7" in warnings
    assert "models.other: method logprobs with a calibration fitted for hybrid" in warnings
    assert "embedding_threshold" not in warnings  # irrelevant to the exact matcher


def test_drift_psi_without_a_reference_or_a_stricter_ood_threshold_is_warned_about(
    tmp_path: Path,
) -> None:
    from proxy.confidence import drift
    from proxy.confidence.calibration import Calibration, Platt

    reference = drift.build_reference({"min_logprob": [-2.0, -1.0, -0.5]}, ["min_logprob"])
    Calibration("min_logprob", Platt("min_logprob", 1.0, 0.0), reference=reference).save(
        tmp_path / "lp.json"
    )
    _logistic_calibration(tmp_path / "bare.json", "logprobs", "min_logprob")  # no reference
    routes = ("m: {upstream: up, calibration: bare.json, drift_psi: 0.25, ood_threshold: 0.9}\n"
              "  other: {upstream: up, calibration: lp.json, drift_psi: 0.25}\n"
              "  plain: {upstream: up, drift_psi: 0.25, ood_threshold: 0.9}")  # fmt: skip
    text = BASE.replace(
        "m: {upstream: up, threshold: 0.6}\n  other: {upstream: up, upstream_model: real-name}",
        routes,
    )
    (tmp_path / "p.yaml").write_text(text)
    warnings = "\n".join(load_policy(tmp_path / "p.yaml").warnings())
    assert "models.m: drift_psi needs a calibration with a reference distribution" in warnings
    assert "models.other: drift_psi has no effect on decisions: ood_threshold" in warnings
    assert "models.plain" not in warnings  # no calibration: nothing to drift from


def test_check_policy_prints_warnings_but_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.cli import main

    _hybrid_calibration(tmp_path)
    route = "m: {upstream: up, method: hybrid, calibration: hybrid.json, matcher: exact}"
    (tmp_path / "p.yaml").write_text(BASE.replace("m: {upstream: up, threshold: 0.6}", route))
    assert main(["check-policy", str(tmp_path / "p.yaml")]) == 0
    assert "warning: models.m: matcher is 'exact'" in capsys.readouterr().out


def test_a_calibration_reading_top_k_features_warns_when_top_logprobs_is_zero(
    tmp_path: Path,
) -> None:
    _logistic_calibration(tmp_path / "lp.json", "logprobs", "first_margin")
    routes = ("m: {upstream: up, calibration: lp.json, top_logprobs: 0}\n"
              "  other: {upstream: up, calibration: lp.json}")  # fmt: skip
    text = BASE.replace(
        "m: {upstream: up, threshold: 0.6}\n  other: {upstream: up, upstream_model: real-name}",
        routes,
    )
    (tmp_path / "p.yaml").write_text(text)
    warnings = load_policy(tmp_path / "p.yaml").warnings()
    problem = (
        "top_logprobs is 0 but the calibration reads first_margin, which needs the top-k "
        "alternatives: answers will get no P(correct)"
    )
    # models.other keeps the default top_logprobs (5): no warning.
    assert warnings == [f"models.m for tenant t: {problem}", f"models.m: {problem}"]
