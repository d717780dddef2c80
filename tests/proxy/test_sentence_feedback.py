"""Feedback on one sentence: recorded apart from the answer's, idempotent, logged, and
learnt from by a rule judged by sentence (and only by one).

The upstream is the shared fake, scripted with the sentence tests' answer ("Peru is in
South America. Its capital is Lima. Its currency is the peseta.", the last sentence
unsure). The calibration is of
sentences (a Platt map of min_logprob): the sure sentences get P = 0.92, the unsure 0.38.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from proxy.cli import main
from proxy.confidence.calibration import load_calibration
from tests.proxy.test_metrics import value
from tests.proxy.test_recalibration import wait_for
from tests.proxy.test_sentences import TOKENS

CALIBRATION = {
    "format": "abstain-calibration/1",
    "method": "logprobs",
    "score": "min_logprob",
    "model": "peru",
    "calibrator": {"kind": "platt", "a": 1.0, "b": 2.5},
    "fitted_on": {"granularity": "sentence"},
}

POLICY = """
upstreams:
  fake: {base_url: "http://upstream.test/v1"}
models:
  peru: {upstream: fake, granularity: sentence, calibration: cal.json}
  peru-stream: {upstream: fake, upstream_model: peru, streaming: sentence, calibration: cal.json}
  peru-whole: {upstream: fake, upstream_model: peru}
defaults:
  threshold: 0.5
  score: min_logprob
  recalibrate: true
  recalibrate_min_labels: 20
  recalibrate_every: 10
  recalibrate_holdout: 0.3
auth: {unknown_keys: default, default_tenant: public}
tenants: {public: {}}
"""

SHIPPED_SURE = 0.9205  # sigmoid(log 0.95 + 2.5)


@pytest.fixture
def policy_path(tmp_path: Path) -> Path:
    """Overrides the shared fixture: the ``make_client`` fixture uses this policy."""
    (tmp_path / "cal.json").write_text(json.dumps(CALIBRATION))
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


@pytest.fixture
def client(make_client: Callable[..., TestClient], tmp_path: Path) -> TestClient:
    return make_client(decision_log=tmp_path / "decisions.jsonl")


def ask(
    client: TestClient, model: str = "peru", stream: bool = False, rid: str | None = None
) -> dict[str, Any]:
    """The response (or, streamed, the verdict chunk) to the Peru answer of the fake
    (with the response id ``rid``, else the fake's one id for every answer)."""
    body = {"model": model, "x_tokens": TOKENS, "stream": stream, "x_id": rid,
            "messages": [{"role": "user", "content": "Tell me about Peru."}]}  # fmt: skip
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    if not stream:
        return dict(r.json())
    events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    return dict(events[-1])


def feedback(client: TestClient, rid: str, **fields: Any) -> httpx.Response:
    return client.post("/v1/feedback", json={"id": rid, **fields})


def log_lines(tmp_path: Path) -> list[dict[str, Any]]:
    text = (tmp_path / "decisions.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_a_sentence_is_labelled_apart_from_the_answer_and_once(
    client: TestClient, tmp_path: Path
) -> None:
    rid = ask(client)["id"]
    first = feedback(client, rid, sentence=0, correct=True)
    assert first.status_code == 200, first.text
    assert first.json() == {"id": rid, "choice": 0, "correct": True, "sentence": 0,
                            "recorded": True, "bin": "0.9"}  # fmt: skip
    again = feedback(client, rid, sentence=0, correct=True)
    assert again.json()["recorded"] is False and again.json()["duplicate"] is True
    other = feedback(client, rid, sentence=0, correct=False)
    assert other.status_code == 409
    assert "sentence 0 of choice 0 of this response" in other.json()["error"]["message"]
    # Another sentence, and the whole answer, are labels of their own.
    assert feedback(client, rid, sentence=2, correct=False).json()["recorded"] is True
    assert feedback(client, rid, correct=False).json()["recorded"] is True
    assert value(client, "abstain_sentence_feedback_total", model="peru") == 2
    assert value(client, "abstain_sentence_feedback_total", bin="0.3", correct="false") == 1
    assert value(client, "abstain_feedback_total", model="peru") == 1

    # The log joins a sentence's feedback to that sentence's raw scores.
    lines = log_lines(tmp_path)
    decision = next(x for x in lines if x["type"] == "decision")
    assert len(decision["sentence_scores"]) == len(decision["sentences"]) == 3
    assert decision["sentence_scores"][2]["min_logprob"] == pytest.approx(math.log(0.05))
    labels = [(x.get("sentence"), x["correct"]) for x in lines if x["type"] == "feedback"]
    assert labels == [(0, True), (2, False), (None, False)]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sentence": 3}, "has 3 part(s)"),
        ({"sentence": -1}, "'sentence' must be a non-negative integer"),
        ({"sentence": True}, "'sentence' must be a non-negative integer"),
        ({"sentence": "0"}, "'sentence' must be a non-negative integer"),
    ],
)
def test_a_sentence_that_is_not_there_is_refused(
    client: TestClient, fields: dict[str, Any], message: str
) -> None:
    rid = ask(client)["id"]
    r = feedback(client, rid, correct=True, **fields)
    assert r.status_code == 400
    assert message in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "sentence"


def test_an_answer_judged_whole_has_no_sentences_to_label(client: TestClient) -> None:
    rid = ask(client, "peru-whole")["id"]
    r = feedback(client, rid, sentence=0, correct=True)
    assert r.status_code == 400
    assert "judged as a whole" in r.json()["error"]["message"]
    assert feedback(client, rid, correct=True).json()["recorded"] is True


@pytest.mark.parametrize("model", ["peru", "peru-stream"])
def test_sentence_labels_recalibrate_the_sentences(
    client: TestClient, model: str, tmp_path: Path, policy_path: Path
) -> None:
    parts = ask(client, model)["choices"][0]["abstention"]["sentences"]
    assert parts[0]["confidence"] == pytest.approx(SHIPPED_SURE, abs=1e-3)
    # The sure sentences are in fact wrong 9 times in 10; whole-answer feedback on a
    # sentence rule is no label (an answer is right only if all its sentences are).
    for i in range(20):
        rid = ask(client, model)["id"]
        assert feedback(client, rid, correct=False).status_code == 200
        assert feedback(client, rid, sentence=i % 2, correct=i % 10 == 0).status_code == 200
    name = f"{model} (sentences)"
    wait_for(lambda: value(client, "abstain_recalibration_swaps_total", model=name) == 1)
    assert value(client, "abstain_recalibration_labels", model=name) == 20
    assert value(client, "abstain_recalibration_labels", model=model) == 0

    # Judged under the learnt map, streamed sentence by sentence or not.
    after = ask(client, model, stream=model == "peru-stream")
    verdict = after["abstention"] if "abstention" in after else after["choices"][0]["abstention"]
    assert verdict["calibration_source"] == "recalibrated:1"
    # Learnt: these sentences are usually wrong, so none is kept any more.
    assert all(p["confidence"] < 0.5 for p in verdict["sentences"])
    assert verdict["decision"] == "abstain"

    # Exported as an ordinary calibration of sentences, from the map's own name.
    out = tmp_path / "exported.json"
    assert main(["recalibration", "export", "--dir", str(tmp_path / "recalibration"),
                 "--tenant", "public", "--model", name, "--policy", str(policy_path),
                 "--out", str(out)]) == 0  # fmt: skip
    exported = load_calibration(out)
    sure = {"min_logprob": math.log(0.95)}
    assert exported(sure) == pytest.approx(verdict["sentences"][0]["confidence"], abs=1e-5)


def test_a_sentence_calibration_is_refitted_from_the_log(
    client: TestClient, tmp_path: Path
) -> None:
    # The sure sentences right 9 times in 10, the unsure one right 1 time in 10.
    for i in range(30):
        rid = ask(client, rid=f"cmpl-{i}")["id"]
        for k in range(3):
            right = (i % 10 != 0) if k < 2 else (i % 10 == 0)
            assert feedback(client, rid, sentence=k, correct=right).status_code == 200
        assert feedback(client, rid, correct=False).status_code == 200  # no sentence label
    out = tmp_path / "refit.json"
    log = tmp_path / "decisions.jsonl"
    assert main(["calibrate", "--from-log", str(log), "--granularity", "sentence",
                 "--calibrators", "platt", "--score", "min_logprob", "--out", str(out)]) == 0  # fmt: skip
    refit = load_calibration(out)
    assert refit.fitted_on["granularity"] == "sentence"
    assert refit.fitted_on["dataset"] == "decision-log:decisions.jsonl"
    sure, unsure = refit({"min_logprob": math.log(0.95)}), refit({"min_logprob": math.log(0.05)})
    assert sure is not None and unsure is not None
    assert sure == pytest.approx(0.9, abs=0.05) and unsure == pytest.approx(0.1, abs=0.05)
    # Without --from-log the granularity comes from the question set.
    assert main(["calibrate", "--dataset", "facts-dev", "--model", "m", "--granularity",
                 "sentence", "--out", str(out)]) == 2  # fmt: skip


def test_feedback_covers_the_first_64_sentences_of_a_long_answer(client: TestClient) -> None:
    sure = math.log(0.95)
    tokens = [(t, sure) for _ in range(70) for t in (" Yes", ".")]
    body = {"model": "peru", "x_tokens": tokens, "x_id": "cmpl-long",
            "messages": [{"role": "user", "content": "Yes?"}]}  # fmt: skip
    r = client.post("/v1/chat/completions", json=body)
    assert len(r.json()["choices"][0]["abstention"]["sentences"]) == 70
    assert feedback(client, "cmpl-long", sentence=63, correct=True).status_code == 200
    late = feedback(client, "cmpl-long", sentence=64, correct=True)
    assert late.status_code == 400
    assert "Only the first 64 parts" in late.json()["error"]["message"]
