"""The policy files the project ships load, and point where the README says."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.cli import main
from proxy.policy.loading import load_policy

POLICIES = Path(__file__).resolve().parents[2] / "policies"


@pytest.mark.parametrize("name", ["default.yaml", "multi-tenant.example.yaml"])
def test_shipped_policy_passes_check_policy(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-policy", str(POLICIES / name)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out
    assert "warning" not in out  # every calibration is used as it was fitted


def test_default_policy_fronts_the_local_model_with_its_calibration() -> None:
    policy = load_policy(POLICIES / "default.yaml")
    route = policy.route("gemma-3-270m")
    assert route is not None
    assert policy.spec.upstreams[route.upstream].base_url == "http://127.0.0.1:8081/v1"
    rule = policy.rule(policy.tenant_for("any-key"), "gemma-3-270m")
    assert rule.calibration is not None
    assert rule.calibration.model == "gemma-3-270m"
    assert rule.score == rule.calibration.score


def test_example_tenants_price_wrong_answers_differently() -> None:
    policy = load_policy(POLICIES / "multi-tenant.example.yaml")
    rules = {t: policy.rule(t, "gemma-3-270m") for t in ("clinic", "chat-app", "internal-tool")}
    assert (rules["clinic"].threshold, rules["clinic"].action) == (0.9, "abstain")
    assert (rules["chat-app"].threshold, rules["chat-app"].action) == (0.5, "hedge")
    assert rules["internal-tool"].action == "annotate"
    assert policy.tenant_for("clinic-demo-key") == "clinic"
    assert policy.tenant_for("no-such-key") is None


def test_check_policy_reports_problems_with_their_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: {}\nmodels: {m: {upstream: nowhere}}\ndefaults: {threshold: 2}\n")
    assert main(["check-policy", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: defaults.threshold" in err
    assert "no upstream named 'nowhere'" in err
