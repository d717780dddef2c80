"""Online recalibration end to end: feedback on systematically wrong answers swaps a
recalibration in, verdicts and metrics change, and a restart on the same store keeps it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from proxy.cli import main
from proxy.confidence.calibration import load_calibration
from tests.proxy.test_metrics import value

# The fake's ``sure`` model: every token at logprob -0.01, so min_logprob = -0.01 and the
# calibration below says P(correct) = sigmoid(-0.01 + 3) ≈ 0.95. Its answers are wrong.
CALIBRATION = {
    "format": "abstain-calibration/1",
    "method": "logprobs",
    "score": "min_logprob",
    "model": "sure",
    "calibrator": {"kind": "platt", "a": 1.0, "b": 3.0},
}

POLICY = """
upstreams:
  fake: {base_url: "http://upstream.test/v1"}
models:
  sure: {upstream: fake, calibration: cal.json}
  plain: {upstream: fake, upstream_model: sure, calibration: cal.json, recalibrate: false}
defaults:
  threshold: 0.5
  recalibrate: true
  recalibrate_min_labels: 20
  recalibrate_every: 10
  recalibrate_holdout: 0.3
auth: {unknown_keys: default, default_tenant: demo}
tenants:
  demo: {}
"""

CHAT = {"messages": [{"role": "user", "content": "Capital of France?"}]}


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    (tmp_path / "cal.json").write_text(json.dumps(CALIBRATION))
    path = tmp_path / "recal-policy.yaml"
    path.write_text(POLICY)
    return path


def ask(client: TestClient, model: str = "sure") -> dict:
    r = client.post("/v1/chat/completions", json={"model": model, **CHAT})
    assert r.status_code == 200, r.text
    return r.json()


def verdict(client: TestClient, model: str = "sure") -> dict:
    return ask(client, model)["choices"][0]["abstention"]


def label(client: TestClient, correct: bool, model: str = "sure") -> None:
    body = ask(client, model)
    r = client.post("/v1/feedback", json={"id": body["id"], "correct": correct})
    assert r.status_code == 200 and r.json()["recorded"], r.text


def wait_for(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_feedback_swaps_in_a_recalibration_that_survives_a_restart(
    make_client: Callable[..., TestClient], policy: Path, tmp_path: Path
) -> None:
    store = tmp_path / "recal"
    client = make_client(policy=policy, recalibration_dir=store)
    before = verdict(client)
    assert before["calibration_source"] == "shipped"
    assert before["confidence"] == pytest.approx(0.952, abs=1e-3)
    assert before["decision"] == "answer"

    # Below min_labels nothing is fitted; the answers are wrong 9 times in 10.
    for i in range(19):
        label(client, correct=i % 10 == 0)
    assert verdict(client)["calibration_source"] == "shipped"
    assert value(client, "abstain_recalibration_labels", tenant="demo", model="sure") == 19
    label(client, correct=False)
    wait_for(lambda: value(client, "abstain_recalibration_swaps_total", model="sure") == 1)

    after = verdict(client)
    assert after["calibration_source"] == "recalibrated:1"
    assert after["confidence"] < 0.5  # learnt that these answers are usually wrong
    assert after["decision"] == "abstain"
    assert value(client, "abstain_recalibration_info", tenant="demo", model="sure",
                 version="1") == 1  # fmt: skip
    assert value(client, "abstain_recalibration_refits_total", model="sure", result="swapped") == 1
    assert value(client, "abstain_choices_total", model="sure", decision="abstain") >= 1

    # A model whose rule does not recalibrate is untouched, even behind the same upstream.
    assert verdict(client, "plain")["calibration_source"] == "shipped"

    # Labels stored are the shipped P(correct), not the recalibrated one the client saw.
    label(client, correct=False)
    lines = [json.loads(x) for x in next(store.iterdir()).read_text().splitlines()]
    labels = [x for x in lines if x["type"] == "label"]
    assert len(labels) == 21
    assert labels[-1]["base"] == pytest.approx(0.952, abs=1e-3)

    # A restart: a new app on the same directory answers with the learnt map at once.
    restarted = make_client(policy=policy, recalibration_dir=store)
    again = verdict(restarted)
    assert again["calibration_source"] == "recalibrated:1"
    assert again["confidence"] == pytest.approx(after["confidence"])
    assert value(restarted, "abstain_recalibration_info", model="sure", version="1") == 1
    assert value(restarted, "abstain_recalibration_labels", model="sure") == 21

    # The CLI shows it and exports it as an ordinary calibration file.
    out = tmp_path / "exported.json"
    assert main(["recalibration", "show", "--dir", str(store)]) == 0
    assert main(["recalibration", "export", "--dir", str(store), "--tenant", "demo",
                 "--model", "sure", "--policy", str(policy), "--out", str(out)]) == 0  # fmt: skip
    exported = load_calibration(out)
    assert exported({"min_logprob": -0.01}) == pytest.approx(after["confidence"], abs=1e-5)


def test_without_a_directory_the_store_follows_the_decision_log(
    make_client: Callable[..., TestClient], policy: Path, tmp_path: Path
) -> None:
    log = tmp_path / "logs" / "decisions.jsonl"
    log.parent.mkdir()
    client = make_client(policy=policy, decision_log=log)
    label(client, correct=False)
    files = list((tmp_path / "logs" / "recalibration").iterdir())
    assert [f.name for f in files] == ["demo@sure.jsonl"]


def test_in_memory_only_without_a_directory_or_log(
    make_client: Callable[..., TestClient], policy: Path, tmp_path: Path
) -> None:
    client = make_client(policy=policy)
    for _ in range(20):
        label(client, correct=False)
    wait_for(lambda: value(client, "abstain_recalibration_swaps_total", model="sure") == 1)
    assert verdict(client)["calibration_source"] == "recalibrated:1"
    assert not list(tmp_path.glob("**/*@*.jsonl"))
