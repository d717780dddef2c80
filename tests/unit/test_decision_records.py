"""The decision log's one record format: what the writer writes, the reader reads."""

from __future__ import annotations

import json

from proxy.decision_records import DecisionRecord, FeedbackRecord, parse_record
from proxy.verdict import Verdict


def verdict() -> Verdict:
    return Verdict(
        decision="abstain",
        confidence=0.2,
        threshold=0.5,
        score=-1.6,
        score_name="min_logprob",
        method="logprobs",
        calibrated=True,
        tenant="clinic",
        scores={"min_logprob": -1.6, "mean_logprob": -0.4},
    )


def test_a_decision_round_trips_through_a_json_line() -> None:
    record = DecisionRecord.of("cmpl-1", 2, "clinic", "m", verdict(), text=("Q?", "A"))
    line = json.dumps(record.to_json())
    back = parse_record(json.loads(line))
    assert back == record
    data = json.loads(line)
    assert data["type"] == "decision" and data["decision"] == "abstain"
    assert data["tenant"] == data["policy"] == "clinic"  # the alias, for one release
    assert (data["prompt"], data["answer"]) == ("Q?", "A")


def test_text_is_absent_unless_logged() -> None:
    data = DecisionRecord.of("cmpl-1", 0, "clinic", "m", verdict()).to_json()
    assert "prompt" not in data and "answer" not in data


def test_feedback_round_trips() -> None:
    record = FeedbackRecord("cmpl-1", 1, False)
    assert parse_record(json.loads(json.dumps(record.to_json()))) == record


def test_malformed_lines_are_no_record() -> None:
    for bad in (
        [],
        {"type": "decision", "id": "x", "choice": 0},  # no scores
        {"type": "decision", "id": 3, "choice": 0, "scores": {}},
        {"type": "feedback", "id": "x", "choice": True, "correct": True},
        {"type": "feedback", "id": "x", "correct": "yes"},
        {"type": "other", "id": "x"},
    ):
        assert parse_record(bad) is None, bad


def test_sentence_feedback_round_trips_and_whole_feedback_has_no_sentence_key() -> None:
    record = FeedbackRecord("cmpl-1", 0, True, sentence=2)
    data = record.to_json()
    assert data["sentence"] == 2
    assert parse_record(json.loads(json.dumps(data))) == record
    assert "sentence" not in FeedbackRecord("cmpl-1", 0, True).to_json()
    bad = {"type": "feedback", "id": "x", "choice": 0, "sentence": "1", "correct": True}
    assert parse_record(bad) is None


def test_a_sentence_verdict_logs_each_parts_raw_scores() -> None:
    from proxy.verdict import SentenceVerdict

    v = verdict()
    v.sentences = [
        SentenceVerdict(0, 5, "sentence", "answer", 0.9, {"min_logprob": -0.1}),
        SentenceVerdict(6, 9, "code", "unjudged", None),
    ]
    record = DecisionRecord.of("cmpl-1", 0, "clinic", "m", v)
    data = json.loads(json.dumps(record.to_json()))
    assert data["sentence_scores"] == [{"min_logprob": -0.1}, {}]
    assert len(data["sentences"]) == 2
    assert parse_record(data) == record
    assert "sentence_scores" not in DecisionRecord.of("c", 0, "t", "m", verdict()).to_json()
