"""Through the proxy: shifted scores raise the exported PSI, mark the verdict
``out_of_distribution``, and ``ood_threshold`` makes the decision stricter, per answer and,
with ``drift_psi``, for traffic that has drifted as a whole."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.confidence import drift
from proxy.confidence.calibration import Calibration, Platt
from proxy.confidence.recalibration import Recalibration
from proxy.settings import Settings
from tests.conftest import KEYS, auth, sha
from tests.fakes import completion

CHAT = {"messages": [{"role": "user", "content": "q"}]}
#: In-domain min_logprob values: the reference is this grid, the traffic cycles over it.
IN_DOMAIN = [-1.5 + i / 100 for i in range(100)]  # -1.5 .. -0.51
SHIFTED = -0.01  # far more confident than anything the calibration saw

POLICY = f"""
upstreams:
  fake: {{base_url: http://upstream.test/v1}}
models:
  plain: {{upstream: fake, calibration: cal.json}}
  strict: {{upstream: fake, calibration: cal.json, ood_threshold: 0.95}}
  watched:
    upstream: fake
    calibration: cal.json
    ood_threshold: 0.8
    drift_psi: 0.25
    recalibrate: true
defaults:
  threshold: 0.5
  score: min_logprob
tenants:
  chat:
    api_key_sha256: ["{sha(KEYS["chat"])}"]
"""


class Upstream:
    """Every token of the answer at ``self.logprob``."""

    def __init__(self) -> None:
        self.logprob = -1.0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        out = completion("chat", body)
        for choice in out["choices"]:
            for token in choice["logprobs"]["content"]:
                token["logprob"] = self.logprob
                token["top_logprobs"][0]["logprob"] = self.logprob
        return httpx.Response(200, json=out)


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


@pytest.fixture
def client(tmp_path: Path, upstream: Upstream) -> Iterator[TestClient]:
    reference = drift.build_reference({"min_logprob": IN_DOMAIN}, ["min_logprob"], source="test")
    Calibration(
        score="min_logprob",
        calibrator=Platt("min_logprob", 2.0, 2.0),  # P(-0.01) = 0.88, P(-1) = 0.5
        model="plain",
        reference=reference,
    ).save(tmp_path / "cal.json")
    (tmp_path / "policy.yaml").write_text(POLICY)
    app = create_app(
        Settings(policy=tmp_path / "policy.yaml", handle_signals=False, reload_interval_seconds=0),
        transport=httpx.MockTransport(upstream),
        registry=CollectorRegistry(),
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def ask(client: TestClient, model: str = "plain") -> dict[str, Any]:
    r = client.post("/v1/chat/completions", json={"model": model, **CHAT}, headers=auth("chat"))
    assert r.status_code == 200, r.text
    verdict: dict[str, Any] = r.json()["abstention"]
    return verdict


def metric(client: TestClient, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                return float(s.value)
    return None


def test_shifted_scores_raise_the_exported_psi_and_mark_the_verdicts(
    client: TestClient, upstream: Upstream
) -> None:
    for lp in IN_DOMAIN + IN_DOMAIN[::-1]:
        upstream.logprob = lp
        verdict = ask(client)
        assert verdict["out_of_distribution"] is False
    in_domain = metric(client, "abstain_input_drift", tenant="chat", model="plain")
    per_input = metric(
        client, "abstain_input_drift_psi", tenant="chat", model="plain", input="min_logprob"
    )
    assert in_domain is not None and in_domain < 0.01
    assert per_input == in_domain
    assert metric(client, "abstain_input_drift_window_answers", model="plain") == 200
    assert metric(client, "abstain_out_of_distribution_total", model="plain") is None

    upstream.logprob = SHIFTED
    for _ in range(100):
        verdict = ask(client)
        assert verdict["out_of_distribution"] is True
        assert "min_logprob" in verdict["reason"]
    shifted = metric(client, "abstain_input_drift", tenant="chat", model="plain")
    # A third of the window now sits in the reference's top decile.
    assert shifted == pytest.approx(drift.psi([0.1] * 10, [20] * 9 + [120]))
    assert shifted > 0.5 > 50 * in_domain
    assert metric(client, "abstain_out_of_distribution_total", model="plain") == 100
    assert metric(client, "abstain_input_drift_window_answers", model="plain") == 300


def test_ood_threshold_makes_the_decision_stricter_out_of_distribution(
    client: TestClient, upstream: Upstream
) -> None:
    upstream.logprob = SHIFTED
    plain, strict = ask(client, "plain"), ask(client, "strict")
    assert plain["confidence"] == pytest.approx(strict["confidence"])
    assert plain["confidence"] == pytest.approx(0.879, abs=1e-3)
    assert plain["decision"] == "answer" and plain["threshold"] == 0.5
    assert strict["decision"] == "abstain" and strict["threshold"] == 0.95
    assert "ood_threshold 0.95" in strict["reason"]
    # In distribution the rule's own threshold applies.
    upstream.logprob = -0.6
    verdict = ask(client, "strict")
    assert verdict["out_of_distribution"] is False
    assert verdict["threshold"] == 0.5 and verdict["decision"] == "answer"


def test_drift_psi_judges_drifted_traffic_at_ood_threshold_until_feedback_answers_for_it(
    client: TestClient, upstream: Upstream
) -> None:
    # In-domain traffic, 300 answers in a random order: the window never reads drifted.
    # (In sorted order it would: 30 answers in a row at one end of the reference are.)
    for lp in random.Random(0).sample(IN_DOMAIN * 3, 300):
        upstream.logprob = lp
        verdict = ask(client, "watched")
        assert "traffic_drift" not in verdict and verdict["threshold"] == 0.5
    # Then every answer at -0.6: inside the fitted range (no answer is out of
    # distribution), but all of them in its top decile, where P = 0.69.
    upstream.logprob = -0.6
    seen = []
    for _ in range(300):
        verdict = ask(client, "watched")
        assert verdict["out_of_distribution"] is False
        assert verdict["confidence"] == pytest.approx(0.69, abs=0.01)
        seen.append(verdict)
    drifted = [v for v in seen if "traffic_drift" in v]
    assert drifted, "the window never read drifted"
    first = seen.index(drifted[0])
    # Before: judged at the rule's threshold and answered; after: at ood_threshold.
    assert all(v["decision"] == "answer" and v["threshold"] == 0.5 for v in seen[:first])
    assert all("traffic_drift" in v for v in seen[first:])
    last = seen[-1]
    assert last["decision"] == "abstain" and last["threshold"] == 0.8
    assert last["traffic_drift"]["input"] == "min_logprob"
    assert last["traffic_drift"]["psi"] >= 0.25 and last["traffic_drift"]["answers"] == 500
    assert "drifted" in last["reason"] and "ood_threshold 0.8" in last["reason"]
    assert metric(client, "abstain_drifted_answers_total", model="watched") == 300 - first
    # Other models of the tenant have their own windows: "plain" has seen nothing.
    assert "traffic_drift" not in ask(client, "plain")

    # A map learnt from the tenant's feedback now answers: its labels decide.
    store = client.app.state.recalibration.store  # type: ignore[attr-defined]
    assert client.portal.call(store.swap, "chat", "watched", Recalibration(1.0, 0.1, version=1))
    verdict = ask(client, "watched")
    assert "traffic_drift" not in verdict
    assert verdict["threshold"] == 0.5 and verdict["calibration_source"] == "recalibrated:1"
