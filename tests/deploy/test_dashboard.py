"""The Grafana dashboard: its structure, its PromQL, and that every metric it (and every
rule) reads is one the proxy really exports, checked against a live ``/metrics``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.procs import (
    DEPLOY,
    chat,
    decision,
    http_get,
    metric_families,
    need_binary,
    proxy_from_environment,
    write_policy,
)
from tests.deploy.promql import as_promql, metric_names, variable_query_names

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "abstain-proxy.json"
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
#: Metrics labelled by tenant and model: panels on them must follow the variables.
TENANT_MODEL_LABELLED = (
    "abstain_requests",
    "abstain_choices",
    "abstain_confidence",
    "abstain_expected_errors",
    "abstain_feedback",
    "abstain_samples_used",
    "abstain_sampling_",
    "abstain_sentence",
    "abstain_generation_stops",
)


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _panels() for t in p["targets"]]


def _rules() -> list[dict[str, Any]]:
    return [
        rule
        for file in RULE_FILES
        for group in yaml.safe_load(file.read_text())["groups"]
        for rule in group["rules"]
    ]


def test_dashboard_has_tenant_and_model_variables_and_sound_panels() -> None:
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "tenant", "model"} <= set(variables)
    for name in ("tenant", "model"):
        assert variables[name]["multi"] and variables[name]["allValue"] == ".*"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in _panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            if any(n.startswith(TENANT_MODEL_LABELLED) for n in metric_names(expr)):
                assert 'tenant=~"$tenant"' in expr and 'model=~"$model"' in expr, expr


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    panels = _panels()

    def reading(metric: str, kind: str | None = None) -> list[str]:
        return [
            p["title"]
            for p in panels
            if (kind is None or p["type"] == kind)
            and any(metric in metric_names(t["expr"]) for t in p["targets"])
        ]

    assert reading("abstain_choices_total")  # abstention rates
    assert reading("abstain_expected_errors_total")  # estimated hallucination
    assert reading("abstain_confidence_bucket", kind="heatmap")
    assert reading("abstain_feedback_total", kind="barchart")  # reliability diagram
    assert reading("abstain_expected_errors_avoided_total")
    assert reading("abstain_sampling_tokens_total") and reading("abstain_samples_used_bucket")
    assert reading("abstain_overhead_seconds_bucket")
    assert reading("abstain_upstream_latency_seconds_bucket")
    assert reading("abstain_upstream_errors_total")
    assert reading("abstain_sentences_total") and reading("abstain_generation_stops_total")


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = need_binary("promtool")
    # promtool has no "check this expression"; a rules file of the queries is checked.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": as_promql(expr)}
        for i, expr in enumerate(_dashboard_exprs())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _exported_names(exposition: str) -> set[str]:
    names = set()
    for family, kind in metric_families(exposition).items():
        if kind == "histogram":
            names |= {f"{family}_bucket", f"{family}_sum", f"{family}_count"}
        else:
            names.add(family)
    return names


@pytest.fixture(scope="module")
def live_metrics(tmp_path_factory: pytest.TempPathFactory, upstream_url: str) -> str:
    """``/metrics`` of a running proxy after answered, abstained and failed requests."""
    tmp = tmp_path_factory.mktemp("live")
    with proxy_from_environment(write_policy(tmp, upstream_url), tmp / "proxy.log") as base:
        decisions = [decision(chat(base, m)) for m in ("sure", "unsure")]
        assert decisions == ["answer", "abstain"]
        assert chat(base, "error-500")["status"] == 502
        status, body = http_get(f"{base}/metrics")
    assert status == 200
    return body


def test_every_metric_in_the_dashboard_and_rules_is_exported(live_metrics: str) -> None:
    exported = _exported_names(live_metrics)
    # Sanity: the names the requests above must have produced are there.
    assert {"abstain_choices_total", "abstain_upstream_errors_total"} <= exported
    recorded = {rule["record"] for rule in _rules() if "record" in rule}

    used: dict[str, set[str]] = {}
    for expr in _dashboard_exprs():
        used.setdefault("dashboard", set()).update(metric_names(expr))
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            used["dashboard"] |= variable_query_names(variable["query"]["query"])
    for rule in _rules():
        used.setdefault(rule.get("alert") or rule["record"], set()).update(
            metric_names(rule["expr"])
        )

    unknown = {
        where: sorted(n for n in names if n not in (recorded if ":" in n else exported))
        for where, names in used.items()
    }
    assert {where: names for where, names in unknown.items() if names} == {}
    # And the raw names the dashboard reads cover most of what the proxy exports.
    assert len({n for n in used["dashboard"] if ":" not in n}) >= 15
