"""The decision log and POST /v1/feedback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from tests.conftest import POLICY, auth
from tests.fakes import ANSWER
from tests.proxy.test_metrics import value

CHAT = {"messages": [{"role": "user", "content": "Capital of France?"}]}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ask(client: TestClient, model: str = "unsure", tenant: str = "clinic", **extra) -> dict:
    r = client.post(
        "/v1/chat/completions", json={"model": model, **CHAT, **extra}, headers=auth(tenant)
    )
    assert r.status_code == 200
    return r.json()


def test_feedback_is_counted_in_the_predicted_confidence_bin(client: TestClient) -> None:
    body = ask(client, "sure")
    r = client.post(
        "/v1/feedback", json={"id": body["id"], "correct": False}, headers=auth("clinic")
    )
    assert r.status_code == 200
    expected_bin = f"{int(body['abstention']['confidence'] * 10) / 10:.1f}"
    assert r.json() == {
        "id": body["id"],
        "choice": 0,
        "correct": False,
        "recorded": True,
        "bin": expected_bin,
    }
    assert value(client, "abstain_feedback_total", tenant="clinic", model="sure",
                 bin=expected_bin, correct="false") == 1  # fmt: skip


def test_feedback_for_an_unknown_id_is_404(client: TestClient) -> None:
    r = client.post(
        "/v1/feedback", json={"id": "cmpl-never", "correct": True}, headers=auth("clinic")
    )
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_feedback_for_another_tenants_response_is_404(client: TestClient) -> None:
    body = ask(client, "sure", tenant="clinic")
    r = client.post("/v1/feedback", json={"id": body["id"], "correct": True}, headers=auth("chat"))
    assert r.status_code == 404


def test_malformed_feedback_is_400(client: TestClient) -> None:
    body = ask(client, "sure")
    for bad in ({"correct": True}, {"id": body["id"]}, {"id": body["id"], "correct": "yes"},
                {"id": body["id"], "correct": True, "choice": 5}):  # fmt: skip
        r = client.post("/v1/feedback", json=bad, headers=auth("clinic"))
        assert r.status_code == 400, bad
    assert client.post("/v1/feedback", json={"id": body["id"], "correct": True}).status_code == 401


def test_decision_log_records_scores_and_verdicts_but_no_text(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    log = tmp_path / "decisions.jsonl"
    client = make_client(decision_log=log)
    body = ask(client, "unsure")
    client.post("/v1/feedback", json={"id": body["id"], "correct": False}, headers=auth("clinic"))
    decision, fb = records(log)
    assert decision["type"] == "decision"
    assert decision["id"] == body["id"]
    assert decision["tenant"] == "clinic"
    assert decision["model"] == "unsure"
    assert decision["decision"] == "abstain"
    assert decision["confidence"] == pytest.approx(body["abstention"]["confidence"], abs=1e-6)
    assert decision["scores"]["min_logprob"] == -3.0
    assert "prompt" not in decision and "answer" not in decision
    assert fb == {
        "type": "feedback",
        "id": body["id"],
        "choice": 0,
        "time": fb["time"],
        "correct": False,
    }


def test_log_text_keeps_the_models_own_answer(
    make_client: Callable[..., TestClient], tmp_path: Path, policy_path: Path
) -> None:
    policy_path.write_text(
        POLICY.replace("    threshold: 0.9\n", "    threshold: 0.9\n    log_text: true\n")
    )
    log = tmp_path / "decisions.jsonl"
    client = make_client(decision_log=log)
    body = ask(client, "unsure")
    assert body["choices"][0]["message"]["content"] == "Please ask a clinician."
    (decision,) = records(log)
    assert decision["answer"] == ANSWER  # what the model said, not the abstention
    assert decision["prompt"] == CHAT["messages"]


def test_streams_are_logged_too(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    client = make_client(decision_log=log)
    for tenant in ("clinic", "tool"):  # buffer and passthrough
        r = client.post("/v1/chat/completions", json={"model": "sure", **CHAT, "stream": True},
                        headers=auth(tenant))  # fmt: skip
        assert r.status_code == 200
    assert [(d["tenant"], d["decision"]) for d in records(log)] == [
        ("clinic", "answer"),
        ("tool", "answer"),
    ]


def test_unwritable_log_is_counted_and_serving_goes_on(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    client = make_client(decision_log=tmp_path / "missing-dir" / "decisions.jsonl")
    body = ask(client, "sure")
    assert body["abstention"]["decision"] == "answer"
    ask(client, "sure")
    assert value(client, "abstain_decision_log_errors_total") == 2
    # Feedback still works from memory, and the log resumes once the path is writable.
    (tmp_path / "missing-dir").mkdir()
    r = client.post(
        "/v1/feedback", json={"id": body["id"], "correct": True}, headers=auth("clinic")
    )
    assert r.status_code == 200
    assert records(tmp_path / "missing-dir" / "decisions.jsonl")[0]["type"] == "feedback"


def test_repeated_feedback_is_recorded_once(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    log = tmp_path / "decisions.jsonl"
    client = make_client(decision_log=log)
    body = ask(client, "sure")
    bin_ = f"{int(body['abstention']['confidence'] * 10) / 10:.1f}"
    fb = {"id": body["id"], "correct": True}
    first = client.post("/v1/feedback", json=fb, headers=auth("clinic"))
    again = client.post("/v1/feedback", json=fb, headers=auth("clinic"))
    assert first.json()["recorded"] is True and "duplicate" not in first.json()
    assert again.status_code == 200
    assert again.json() == {
        "id": body["id"],
        "choice": 0,
        "correct": True,
        "recorded": False,
        "duplicate": True,
        "bin": bin_,
    }
    assert value(client, "abstain_feedback_total", tenant="clinic", model="sure",
                 bin=bin_, correct="true") == 1  # fmt: skip
    assert [r["type"] for r in records(log)] == ["decision", "feedback"]


def test_contradicting_feedback_is_a_conflict_and_the_first_word_stands(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    log = tmp_path / "decisions.jsonl"
    client = make_client(decision_log=log)
    body = ask(client, "sure")
    bin_ = f"{int(body['abstention']['confidence'] * 10) / 10:.1f}"
    client.post("/v1/feedback", json={"id": body["id"], "correct": True}, headers=auth("clinic"))
    r = client.post(
        "/v1/feedback", json={"id": body["id"], "correct": False}, headers=auth("clinic")
    )
    assert r.status_code == 409
    error = r.json()["error"]
    assert error["code"] == "feedback_conflict"
    assert error["param"] == "correct"
    assert "first feedback stands" in error["message"]
    for correct, expected in (("true", 1), ("false", 0)):
        assert value(client, "abstain_feedback_total", tenant="clinic", model="sure",
                     bin=bin_, correct=correct) == expected  # fmt: skip
    assert [(r["type"], r.get("correct")) for r in records(log)] == [
        ("decision", None),
        ("feedback", True),
    ]


def test_feedback_is_per_choice(client: TestClient) -> None:
    body = ask(client, "sure", n=2)
    for choice in (0, 1):
        r = client.post("/v1/feedback", json={"id": body["id"], "correct": True,
                        "choice": choice}, headers=auth("clinic"))  # fmt: skip
        assert r.json()["recorded"] is True, choice
