"""Question sets, the split, prompt templates, the decision-log reader, the policy copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from proxy.evaluation import datasets, inproc
from proxy.evaluation.log_labels import parse_log
from proxy.evaluation.prompts import FEW_SHOT, get_template
from tests.eval import fake_model


def test_split_is_disjoint_stratified_and_deterministic() -> None:
    qs = [datasets.Question(f"{k}{i}", "q?", ("a",), k) for k in "ab" for i in range(50)]
    fit, held = datasets.split(qs, 0.4, seed=1)
    assert {q.id for q in fit}.isdisjoint({q.id for q in held})
    assert len(fit) + len(held) == 100
    assert sum(q.kind == "a" for q in held) == sum(q.kind == "b" for q in held) == 20
    assert datasets.split(qs, 0.4, seed=1) == (fit, held)
    assert datasets.split(qs, 0.4, seed=2)[1] != held


def test_select_limits_and_keeps_order() -> None:
    qs = [datasets.Question(str(i), "q?", ("a",)) for i in range(10)]
    assert [q.id for q in datasets.select(qs, "all", limit=3)] == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"id": "x", "question": "q?", "answers": []}', "answers"),
        ('{"id": "x", "answers": ["a"]}', "question"),
    ],
)
def test_bad_question_lines_name_the_line(line: str, message: str) -> None:
    good = '{"id": "ok", "question": "q?", "answers": ["a"]}'
    with pytest.raises(datasets.DatasetError, match=rf"f\.jsonl:2: .*{message}"):
        datasets.parse_questions([good, line], "f.jsonl")


def test_duplicate_ids_are_refused() -> None:
    line = '{"id": "x", "question": "q?", "answers": ["a"]}'
    with pytest.raises(datasets.DatasetError, match="duplicate"):
        datasets.parse_questions([line, line])


def test_fewshot_template_body_and_answer() -> None:
    t = get_template("qa-fewshot")
    body = t.body("What is the capital of Chile?", "m")
    assert t.path == "/completions"
    assert body["prompt"].endswith("Q: What is the capital of Chile?\nA:")
    assert body["prompt"].count("\nA: ") == len(FEW_SHOT)
    assert (body["stop"], body["logprobs"], body["temperature"]) == (["\n"], 5, 0)
    assert t.answer({"text": " Santiago\nQ: next"}) == "Santiago"


def test_chat_template_body_and_answer() -> None:
    t = get_template("chat")
    body = t.body("Who?", "m")
    assert t.path == "/chat/completions"
    assert body["messages"][-1] == {"role": "user", "content": "Who?"}
    assert body["logprobs"] is True and body["top_logprobs"] == 5
    assert t.answer({"message": {"content": " Marie Curie "}}) == "Marie Curie"
    assert t.answer({"message": {"content": None}}) == ""


def test_decision_log_join_counts_and_last_feedback_wins() -> None:
    def rec(**kw: object) -> str:
        return json.dumps(kw)

    lines = [
        rec(type="decision", id="a", choice=0, model="m", scores={"min_logprob": -0.1}),
        rec(type="decision", id="a", choice=1, model="m", scores={"min_logprob": -3.0}),
        rec(type="decision", id="b", choice=0, model="other", scores={"min_logprob": -1.0}),
        rec(type="decision", id="c", choice=0, model="m", scores={"min_logprob": -2.0}),
        rec(type="feedback", id="a", choice=0, correct=False),
        rec(type="feedback", id="a", choice=0, correct=True),
        rec(type="feedback", id="a", choice=1, correct=False),
        rec(type="feedback", id="zzz", choice=0, correct=True),
        '{"type": "feedback", "id": "torn", "choi',
    ]
    got = parse_log(lines, model="m")
    assert got.correct.tolist() == [1.0, 0.0]
    assert got.features["min_logprob"].tolist() == [-0.1, -3.0]
    c = got.counts
    assert (c["labelled"], c["unlabelled"], c["other_model"]) == (2, 1, 1)
    assert (c["malformed"], c["feedback_without_decision"]) == (1, 1)


def test_policy_copy_annotates_everywhere_and_fixes_paths(tmp_path: Path) -> None:
    (tmp_path / "cal").mkdir()
    policy = tmp_path / "p.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "upstreams": {"up": {"base_url": "http://a/v1"}},
                "models": {"m": {"upstream": "up", "action": "hedge"}},
                "defaults": {"calibration": "cal/x.json"},
                "tenants": {"t": {"action": "abstain", "threshold": 0.9}},
            }
        )
    )
    data = inproc.derived_policy(policy, model="m", upstream_url="http://b/v1")
    assert data["defaults"]["action"] == "annotate"
    assert data["models"]["m"]["action"] == data["tenants"]["t"]["action"] == "annotate"
    assert data["defaults"]["calibration"] == str((tmp_path / "cal" / "x.json").resolve())
    assert data["upstreams"]["up"]["base_url"] == "http://b/v1"
    other = inproc.derived_policy(policy, model="m", calibration=tmp_path / "y.json")
    assert other["defaults"]["calibration"] == str((tmp_path / "y.json").resolve())
    assert inproc.policy_tag(data) != inproc.policy_tag(other)
    # The same model restarted elsewhere keeps its cached answers; another rule does not.
    moved = inproc.derived_policy(policy, model="m", upstream_url="http://c/v1")
    assert inproc.policy_tag(moved) == inproc.policy_tag(data)
    stricter = inproc.derived_policy(policy, model="m", upstream_url="http://b/v1")
    stricter["tenants"]["t"]["threshold"] = 0.95
    assert inproc.policy_tag(stricter) != inproc.policy_tag(data)
    with pytest.raises(ValueError, match="no model"):
        inproc.derived_policy(policy, model="nope", upstream_url="http://b/v1")


def test_fake_model_questions_are_valid_question_lines() -> None:
    lines = [json.dumps(q) for q in fake_model.questions(5)]
    assert len(datasets.parse_questions(lines)) == 5


def test_a_sentences_feedback_is_no_label_of_the_whole_answer() -> None:
    decision = {"type": "decision", "id": "a", "choice": 0, "model": "m", "scores": {}}
    feedback = {"type": "feedback", "id": "a", "choice": 0, "sentence": 1, "correct": False}
    got = parse_log([json.dumps(decision), json.dumps(feedback)], model="m")
    assert got.correct.tolist() == []
    assert (got.counts["sentence_feedback"], got.counts["unlabelled"]) == (1, 1)


def test_sentence_labels_from_the_log_are_grouped_by_answer() -> None:
    parts = [{"min_logprob": -0.1}, {"min_logprob": -2.0}]
    lines = [
        json.dumps(
            {
                "type": "decision",
                "id": i,
                "choice": 0,
                "model": "m",
                "scores": {},
                "sentence_scores": parts,
            }
        )
        for i in ("a", "b")
    ]
    lines += [
        json.dumps({"type": "feedback", "id": i, "choice": 0, "sentence": k, "correct": k == 0})
        for i in ("a", "b")
        for k in (0, 1)
    ]
    got = parse_log(lines, model="m", sentences=True)
    assert got.correct.tolist() == [1.0, 0.0, 1.0, 0.0]
    # Cross-validation keeps an answer's sentences in one fold.
    assert got.groups is not None and got.groups.tolist() == ["a#0", "a#0", "b#0", "b#0"]
