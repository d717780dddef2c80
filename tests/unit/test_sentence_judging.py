"""Sentence granularity: each sentence scored on its own tokens, decided and rewritten."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.confidence.spans import Alignment, context_words, segment_scores, token_offsets
from proxy.evidence import CallEvidence, ChoiceEvidence, Tokens, from_response
from proxy.judge import judge_call
from proxy.policy.loading import parse_policy
from proxy.policy.rules import Rule
from proxy.rewrite import apply_verdict
from proxy.sentences import split

POLICY = """
upstreams: {u: {base_url: "http://127.0.0.1:9/v1"}}
models:
  m: {upstream: u, granularity: sentence, score: min_logprob, threshold: 0.5}
defaults: {action: abstain}
"""

SURE, UNSURE = math.log(0.95), math.log(0.1)


def rule(**overrides: object) -> Rule:
    extra = "".join(f"\n  {k}: {v}" for k, v in overrides.items())
    text = POLICY + (f"tenants:\n t:{extra}\n" if extra else "")
    return parse_policy(text).rule("t" if extra else None, "m")


def answer(pieces: list[tuple[str, float]]) -> ChoiceEvidence:
    """A choice whose tokens are ``pieces`` (text, logprob)."""
    texts = [t for t, _ in pieces]
    lps = [lp for _, lp in pieces]
    return ChoiceEvidence(
        0, "".join(texts), {"min_logprob": min(lps)}, tokens=Tokens(texts, lps, [])
    )


PERU = [
    ("Peru", SURE), (" is", SURE), (" in", SURE), (" South", SURE), (" America", SURE), (".", SURE),
    (" Its", SURE), (" capital", SURE), (" is", SURE), (" L", SURE), ("ima", SURE), (".", SURE),
    (" Its", SURE), (" currency", SURE), (" is", SURE), (" the", SURE), (" pes", UNSURE),
    ("eta", SURE), (".", SURE),
]  # fmt: skip


def test_token_offsets_follow_the_text_and_refuse_a_mismatch() -> None:
    assert token_offsets(["Its", " cap", "ital"], "Its capital") == [0, 3, 7]
    # A token spelled differently (byte fallback) is skipped over; the rest still match.
    text = "a b c d e f g h i j k"
    tokens = [" " + c if i else c for i, c in enumerate(text.split())]
    tokens[3] = "\ufffd"
    assert token_offsets(tokens, text) is not None
    assert token_offsets(["x", "y", "z"], "abc") is None


def test_each_sentence_gets_the_scores_of_its_own_tokens() -> None:
    choice = answer(PERU)
    assert choice.text is not None and choice.tokens is not None
    segments = split(choice.text)
    scores = segment_scores(segments, choice.text, choice.tokens.texts, choice.tokens.lps, [])
    assert scores is not None
    assert [s["min_logprob"] for s in scores] == pytest.approx([SURE, SURE, UNSURE])
    # Every token of the sentence, its full stop included (white space has none).
    assert [s["log_length"] for s in scores] == pytest.approx([math.log(n) for n in (6, 6, 7)])
    assert scores[1]["first_logprob"] == pytest.approx(SURE)  # "Its", the sentence's first


def test_the_claim_tokens_rule_kept_for_comparison() -> None:
    """With ``context``, only the claim's tokens are read: in "Its capital is Lima." with
    a prompt holding "its capital", that is "Lima" (the proxy itself reads every token)."""
    pieces = [("Its", math.log(0.5)), (" capital", SURE), (" is", SURE), (" L", math.log(0.3)),
              ("ima", SURE), (".", SURE)]  # fmt: skip
    choice = answer(pieces)
    assert choice.text is not None and choice.tokens is not None
    context = context_words(["Tell me about Peru: its capital."])
    segments = split(choice.text)
    lps = choice.tokens.lps
    claimed = segment_scores(segments, choice.text, choice.tokens.texts, lps, [], context)
    every = segment_scores(segments, choice.text, choice.tokens.texts, lps, [], frozenset())
    assert claimed is not None and every is not None
    assert claimed[0]["first_logprob"] == pytest.approx(math.log(0.3))
    assert claimed[0]["log_length"] == pytest.approx(math.log(2))  # " L", "ima"
    # Without the prompt, "capital" is part of the claim ("Its" never is).
    assert every[0]["first_logprob"] == pytest.approx(SURE)
    assert every[0]["log_length"] == pytest.approx(math.log(3))
    # All words given: the sentence is scored on all its tokens rather than on none.
    all_given = segment_scores(segments, choice.text, choice.tokens.texts, lps, [],
                               context_words(["its capital is lima"]))  # fmt: skip
    assert all_given is not None and all_given[0]["log_length"] == pytest.approx(math.log(6))


def test_the_unsure_sentence_is_withheld_and_the_rest_kept() -> None:
    r = rule()
    verdict = judge_call(CallEvidence([answer(PERU)]), r)[0]
    assert verdict.decision == "partial"
    assert verdict.sentences is not None
    assert [p.decision for p in verdict.sentences] == ["answer", "answer", "abstain"]
    # The least sure sentence the client sees.
    assert verdict.confidence == pytest.approx(0.95)
    choice = {"message": {"role": "assistant", "content": answer(PERU).text}}
    apply_verdict("chat", choice, verdict, r)
    content = choice["message"]["content"]
    assert content == "Peru is in South America. Its capital is Lima. (not sure about this part)"
    spans = [(p.start, p.end) for p in verdict.sentences]
    assert [content[s:e] for s, e in spans][2] == "(not sure about this part)"
    assert [content[s:e] for s, e in spans][1] == "Its capital is Lima."
    wire = verdict.to_dict()["sentences"]
    assert wire[2] == {"start": spans[2][0], "end": spans[2][1], "kind": "sentence",
                       "decision": "abstain", "confidence": pytest.approx(0.1)}  # fmt: skip


def test_a_run_of_withheld_sentences_shares_one_marker() -> None:
    pieces = [("One", SURE), (".", SURE), (" Two", UNSURE), (".", SURE), (" Three", UNSURE),
              (".", SURE), ("\n", SURE), ("Four", UNSURE), (".", SURE)]  # fmt: skip
    r = rule(sentence_abstention='"[?]"')
    verdict = judge_call(CallEvidence([answer(pieces)]), r)[0]
    choice = {"text": answer(pieces).text}
    apply_verdict("completions", choice, verdict, r)
    assert choice["text"] == "One. [?]\n[?]"
    assert verdict.sentences is not None
    assert [(p.start, p.end) for p in verdict.sentences] == [(0, 4), (5, 8), (5, 8), (9, 12)]


def test_nothing_left_is_the_tenants_abstention() -> None:
    r = rule()
    verdict = judge_call(CallEvidence([answer([("Two", UNSURE), (".", SURE)])]), r)[0]
    assert verdict.decision == "abstain" and verdict.confidence == pytest.approx(0.1)
    choice = {"text": "Two."}
    apply_verdict("completions", choice, verdict, r)
    assert choice["text"] == r.abstention_message
    assert verdict.sentences is not None and verdict.sentences[0].start is None


def test_hedge_marks_each_doubtful_sentence_and_list_lines_keep_their_marker() -> None:
    pieces = [("-", SURE), (" Lima", SURE), ("\n", SURE), ("-", SURE), (" pes", UNSURE),
              ("eta", SURE)]  # fmt: skip
    r = rule(action="hedge")
    verdict = judge_call(CallEvidence([answer(pieces)]), r)[0]
    assert verdict.decision == "hedge"
    choice = {"text": answer(pieces).text}
    apply_verdict("completions", choice, verdict, r)
    assert choice["text"] == "- Lima\n- (not sure) peseta"
    r = rule(action="abstain")
    verdict = judge_call(CallEvidence([answer(pieces)]), r)[0]
    choice = {"text": answer(pieces).text}
    apply_verdict("completions", choice, verdict, r)
    assert choice["text"] == "- Lima\n- (not sure about this part)"


def test_sent_text_is_annotated_sentence_by_sentence() -> None:
    verdict = judge_call(CallEvidence([answer(PERU)], already_sent=True), rule())[0]
    assert verdict.sentences is not None
    assert [p.decision for p in verdict.sentences] == ["answer", "answer", "annotate"]
    assert verdict.decision == "annotate"


def test_code_is_passed_unjudged() -> None:
    pieces = [("Run", SURE), (":", SURE), ("\n```", UNSURE), ("\nx", UNSURE), ("\n```", SURE)]
    verdict = judge_call(CallEvidence([answer(pieces)]), rule())[0]
    assert verdict.sentences is not None
    assert [p.decision for p in verdict.sentences] == ["answer", "unjudged"]
    assert verdict.decision == "answer"


def test_without_token_texts_the_answer_is_judged_whole() -> None:
    unaligned = ChoiceEvidence(0, "One. Two.", {"min_logprob": UNSURE},
                               tokens=Tokens(["x", "y", "z"], [SURE, SURE, SURE], []))  # fmt: skip
    no_tokens = ChoiceEvidence(0, "One. Two.", {"min_logprob": UNSURE})
    for choice in (unaligned, no_tokens):
        verdict = judge_call(CallEvidence([choice]), rule())[0]
        assert verdict.sentences is None and verdict.decision == "abstain"


def test_answer_granularity_ignores_tokens() -> None:
    verdict = judge_call(CallEvidence([answer(PERU)]), rule(granularity="answer"))[0]
    assert verdict.sentences is None and verdict.decision == "abstain"


def test_streaming_sentence_implies_sentence_granularity() -> None:
    assert rule(granularity="answer", streaming="sentence").granularity == "sentence"


def test_responses_keep_token_texts_in_both_wire_shapes() -> None:
    chat = {"choices": [{"message": {"content": "A. B."}, "logprobs": {"content": [
        {"token": "A", "logprob": -0.1, "top_logprobs": []}, {"token": ".", "logprob": 0.0},
        {"token": " B", "logprob": -2.0}, {"token": ".", "logprob": 0.0}]}}]}  # fmt: skip
    got = from_response("chat", chat, json_mode=False, keep_tokens=True).choices[0].tokens
    assert got is not None and got.texts == ["A", ".", " B", "."]
    completions = {"choices": [{"text": "A.", "logprobs": {"tokens": ["A", "."],
                   "token_logprobs": [-0.1, 0.0], "top_logprobs": [{"A": -0.1}, {".": 0.0}]}}]}  # fmt: skip
    got = from_response("completions", completions, json_mode=False, keep_tokens=True).choices[0]
    assert got.tokens is not None and got.tokens.texts == ["A", "."] and len(got.tokens.tops) == 2
    assert from_response("chat", chat, json_mode=False).choices[0].tokens is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["Pa", "ris", " is", ".", " It", "", " 3", "7", "é", "\n"])))
def test_a_streams_alignment_placed_token_by_token_is_the_whole_texts(tokens: list[str]) -> None:
    alignment, text = Alignment(), ""
    for i, token in enumerate(tokens):
        text += token
        got = alignment.extend(tokens[: i + 1], text)
        assert got == token_offsets(tokens[: i + 1], text)
