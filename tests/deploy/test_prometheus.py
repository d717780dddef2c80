"""Prometheus for real: promtool on the config and rules, and a live scrape of the proxy.

Needs Debian's ``prometheus`` package (prometheus and promtool); skipped without it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.metrics import FEEDBACK_BINS
from tests.deploy.procs import (
    DEPLOY,
    chat,
    decision,
    free_port,
    http_get,
    need_binary,
    prometheus_query,
    proxy_from_environment,
    running,
    scalar,
    wait_for,
)

PROM = DEPLOY / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
ALERTS = PROM / "rules" / "alerts.yml"
README = DEPLOY / "README.md"


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need_binary("promtool"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_accepts_the_config_and_the_rules() -> None:
    config = promtool("check", "config", PROM / "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    # The config's rule_files glob must pick up every rules file.
    found = re.search(r"(\d+) rule files? found", config.stdout)
    assert found is not None and int(found.group(1)) == len(RULE_FILES), config.stdout
    rules = promtool("check", "rules", *RULE_FILES)
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_promtool_unit_tests_of_every_alert_pass() -> None:
    result = promtool("test", "rules", PROM / "tests" / "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_documented_and_unit_tested_both_ways() -> None:
    tests = yaml.safe_load((PROM / "tests" / "alerts_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    headings = set(re.findall(r"^#+ (\w+)\s*$", README.read_text(), flags=re.M))
    alerts = _alert_rules()
    assert len(alerts) >= 5
    for rule in alerts:
        name = rule["alert"]
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), name
        assert annotations["runbook_url"] == f"deploy/README.md#{name.lower()}"
        assert name in headings, f"no runbook section '### {name}' in deploy/README.md"
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name} is never tested firing"
        assert any(not case["exp_alerts"] for case in mine), f"{name} is never tested silent"


def test_expected_accuracy_rules_cover_every_feedback_bin_at_its_midpoint() -> None:
    groups = yaml.safe_load((PROM / "rules" / "recording.yml").read_text())["groups"]
    expected = {
        rule["labels"]["bin"]: rule["expr"]
        for group in groups
        for rule in group["rules"]
        if rule.get("record") == "bin:abstain_feedback_expected_accuracy:value"
    }
    assert sorted(expected) == sorted(FEEDBACK_BINS)
    for label, expr in expected.items():
        assert expr == f"vector({float(label) + 0.05:.2f})"


def _start_prometheus(tmp_path: Path, target: str) -> tuple[list[str], str]:
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                # Short intervals keep the test short; the deployed config uses 15 s.
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(f) for f in RULE_FILES],
                "scrape_configs": [
                    {"job_name": "abstain-proxy", "static_configs": [{"targets": [target]}]}
                ],
            }
        )
    )
    command = [
        need_binary("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    return command, f"http://127.0.0.1:{port}"


def test_prometheus_reads_the_abstention_rate_of_a_live_proxy(
    tmp_path: Path, policy_file: Path
) -> None:
    need_binary("prometheus")
    with proxy_from_environment(policy_file, tmp_path / "proxy.log") as proxy:
        command, prom = _start_prometheus(tmp_path, proxy.removeprefix("http://"))
        with running(command, tmp_path / "prometheus.log", f"{prom}/-/ready"):
            judged = 'sum(abstain_choices_total{decision!="unjudged"})'

            # Phase 1 creates the series; rate() only counts what happens after a series
            # is first scraped, so phase 2 is what the recording rules will see.
            assert [decision(chat(proxy, m)) for m in ("sure", "unsure")] == ["answer", "abstain"]
            seen = wait_for(lambda: scalar(prometheus_query(prom, judged)), lambda v: v == 2)
            assert seen == 2, f"Prometheus never scraped the first requests (saw {seen})"

            phase2 = ["sure", "unsure", "unsure", "unsure"]
            assert [decision(chat(proxy, m)) for m in phase2] == ["answer"] + ["abstain"] * 3
            seen = wait_for(lambda: scalar(prometheus_query(prom, judged)), lambda v: v == 6)
            assert seen == 6

            # The cumulative abstention rate, straight from the counters: 4 of 6.
            overall = scalar(
                prometheus_query(
                    prom, f'sum(abstain_choices_total{{decision="abstain"}}) / {judged}'
                )
            )
            assert overall == pytest.approx(4 / 6)

            # The recording rules, per tenant and model (unsure always abstains, sure
            # never: 0, not missing), and summed over models: 3 of phase 2's 4.
            def per_model() -> dict[str, float]:
                result = prometheus_query(prom, "tenant_model:abstain_abstention:ratio_rate5m")
                return {r["metric"]["model"]: float(r["value"][1]) for r in result}

            rates = wait_for(per_model, lambda r: r == {"sure": 0.0, "unsure": 1.0})
            assert rates == {"sure": 0.0, "unsure": 1.0}

            tenant_rate = (
                "sum by (tenant) (tenant_model:abstain_choices_abstained:rate5m)"
                " / sum by (tenant) (tenant_model:abstain_choices_judged:rate5m)"
            )
            value = wait_for(
                lambda: scalar(prometheus_query(prom, tenant_rate)),
                lambda v: v is not None and abs(v - 0.75) < 0.01,
            )
            assert value == pytest.approx(0.75, abs=0.01)

            # Every rule evaluates cleanly against real series (no matching errors).
            status, body = http_get(f"{prom}/api/v1/rules")
            assert status == 200
            rules = [r for g in yaml.safe_load(body)["data"]["groups"] for r in g["rules"]]
            assert len(rules) >= 30
            assert [r["name"] for r in rules if r["health"] == "err"] == []
