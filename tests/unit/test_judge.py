"""The judging stage: evidence in, verdicts out, whoever gathered the evidence."""

from __future__ import annotations

import math

import pytest

from proxy.confidence.consistency import score_agreement
from proxy.errors import UpstreamError
from proxy.evidence import CallEvidence, ChoiceEvidence, StreamEvidence, from_response
from proxy.judge import judge_call, shown_answer
from proxy.policy.loading import parse_policy
from proxy.policy.rules import Rule
from proxy.sampling.draw import SamplingResult

POLICY = """
upstreams: {u: {base_url: "http://127.0.0.1:9/v1"}}
models:
  m: {upstream: u}
  c: {upstream: u, method: consistency, show: majority}
defaults: {threshold: 0.5, action: hedge}
"""


def rule(model: str = "m", **overrides: object) -> Rule:
    extra = "".join(f"\n  {k}: {v}" for k, v in overrides.items())
    text = POLICY + (f"tenants:\n t:{extra}\n" if extra else "")
    return parse_policy(text).rule("t" if extra else None, model)


def choice(lp: float, *, text: str = "Paris", index: int = 0, tool: bool = False) -> ChoiceEvidence:
    return ChoiceEvidence(index, text, {"min_logprob": lp}, tool_call=tool)


def test_each_choice_is_judged_on_its_own_scores() -> None:
    sure, unsure = choice(math.log(0.9)), choice(math.log(0.2), index=1)
    verdicts = judge_call(CallEvidence([sure, unsure]), rule())
    assert [v.decision for v in verdicts] == ["answer", "hedge"]
    assert verdicts[0].confidence == pytest.approx(0.9)
    assert not verdicts[0].calibrated and verdicts[0].tenant == "anonymous"


def test_unjudged_answers_name_the_reason() -> None:
    tool = judge_call(CallEvidence([choice(-5.0, tool=True)]), rule())[0]
    assert tool.decision == "unjudged" and "tool calls" in (tool.reason or "")
    json = judge_call(CallEvidence([choice(-5.0)], json_mode=True), rule())[0]
    assert json.decision == "unjudged" and "JSON" in (json.reason or "")


def test_text_already_sent_can_only_be_annotated() -> None:
    evidence = CallEvidence([choice(math.log(0.1))], already_sent=True)
    assert judge_call(evidence, rule())[0].decision == "annotate"


def test_no_score_follows_on_missing_score() -> None:
    verdict = judge_call(CallEvidence([ChoiceEvidence(0, "x", {})]), rule())[0]
    assert verdict.decision == "hedge" and verdict.confidence is None
    assert "no score" in (verdict.reason or "")


def sampled(texts: tuple[str, ...], *, min_samples: int = 2) -> SamplingResult:
    return SamplingResult(
        samples=texts,
        budget=4,
        min_samples=min_samples,
        upstream_requests=len(texts),
        completion_tokens=0,
        early_stopped=False,
        last_check=None,
    )


def test_agreement_decides_for_the_sampled_methods_and_the_majority_is_shown() -> None:
    evidence = CallEvidence([choice(-0.1, text="Lyon")])
    result = sampled(("Paris", "Paris", "Paris", "Lyon"))
    evidence.add_samples(result, [score_agreement(None, result.samples)])
    verdict = judge_call(evidence, rule("c"))[0]
    assert verdict.confidence == pytest.approx(0.75) and verdict.samples == 4
    assert shown_answer(evidence, rule("c")) == "Paris"
    two = CallEvidence([choice(-0.1), choice(-0.1, index=1)])
    two.add_samples(result, [score_agreement(None, result.samples)] * 2)
    assert shown_answer(two, rule("c")) is None  # n answers asked for: keep them


@pytest.mark.parametrize(
    ("how", "decision"), [("answer", "answer"), ("abstain", "hedge"), ("fallback", "hedge")]
)
def test_too_few_samples_follow_on_sampling_error(how: str, decision: str) -> None:
    evidence = CallEvidence([choice(math.log(0.3))])
    evidence.add_samples(sampled(("Paris",)), [None])
    verdict = judge_call(evidence, rule("c", on_sampling_error=how))[0]
    assert verdict.decision == decision
    assert f"on_sampling_error={how}" in (verdict.reason or "")
    if how == "fallback":  # judged on the logprob score instead
        assert verdict.method == "logprobs" and verdict.confidence == pytest.approx(0.3)


def test_too_few_samples_can_fail_the_request() -> None:
    evidence = CallEvidence([choice(-0.1)])
    evidence.add_samples(sampled(()), [None])
    with pytest.raises(UpstreamError):
        judge_call(evidence, rule("c", on_sampling_error="error"))


def test_a_response_and_its_stream_give_the_same_evidence() -> None:
    lps = {"content": [{"token": "Par", "logprob": -0.2, "top_logprobs": []},
                       {"token": "is", "logprob": -0.05, "top_logprobs": []}]}  # fmt: skip
    response = {"choices": [{"index": 0, "message": {"content": "Paris"}, "logprobs": lps}]}
    whole = from_response("chat", response, json_mode=False)
    stream = StreamEvidence("chat", keep_texts=True)
    for tok in lps["content"]:
        stream.add({"index": 0, "delta": {"content": tok["token"]}, "logprobs": {"content": [tok]}})
    pieces = stream.evidence(json_mode=False)
    assert pieces.already_sent and not whole.already_sent
    assert pieces.choices[0].text == whole.choices[0].text == "Paris"
    assert pieces.choices[0].scores == whole.choices[0].scores
    assert judge_call(pieces, rule())[0].confidence == judge_call(whole, rule())[0].confidence


def test_a_streamed_stop_string_does_not_change_the_scores() -> None:
    # llama-server streams the stop string's tokens with empty text; its complete answers
    # leave them out. The same answer must score the same either way.
    toks = [
        {"token": "Lima", "logprob": -0.3, "top_logprobs": [{"token": "Lima", "logprob": -0.3}]}
    ]
    stop = {"token": "", "logprob": -0.01, "top_logprobs": [{"token": "", "logprob": -0.01}]}
    whole = from_response(
        "chat",
        {"choices": [{"index": 0, "message": {"content": "Lima"}, "logprobs": {"content": toks}}]},
        json_mode=False,
    )
    stream = StreamEvidence("chat")
    stream.add({"index": 0, "delta": {"content": "Lima"}, "logprobs": {"content": toks}})
    stream.add(
        {
            "index": 0,
            "delta": {"content": ""},
            "logprobs": {"content": [stop]},
            "finish_reason": "stop",
        }
    )
    assert stream.evidence(json_mode=False).choices[0].scores == whole.choices[0].scores
    # cut by length, an empty token is held-back text: it stays
    held = StreamEvidence("chat")
    held.add({"index": 0, "delta": {"content": "Lima"}, "logprobs": {"content": toks}})
    held.add({"index": 0, "delta": {}, "logprobs": {"content": [stop]}, "finish_reason": "length"})
    assert held.evidence(json_mode=False).choices[0].scores["log_length"] > 0


def test_completions_in_the_chat_shape_are_trimmed_to_the_clients_ask() -> None:
    from proxy.protocol import trim_top_logprobs

    alts = [{"token": t, "logprob": -i} for i, t in enumerate("abcde")]
    logprobs = {"content": [{"token": "a", "logprob": 0.0, "top_logprobs": list(alts)}]}
    trim_top_logprobs(logprobs, 2)
    assert [a["token"] for a in logprobs["content"][0]["top_logprobs"]] == ["a", "b"]


def test_a_drifted_call_is_judged_at_ood_threshold_and_says_why() -> None:
    from proxy.judge import drifted_rule

    drift = {"input": "min_logprob", "psi": 0.71, "answers": 500, "drift_psi": 0.25}
    sure = CallEvidence([choice(math.log(0.7))])
    base = rule(ood_threshold=0.8, drift_psi=0.25)
    assert base.drift_psi == 0.25 and base.traffic_drift is None
    plain = judge_call(sure, base)[0]
    assert plain.decision == "answer" and plain.traffic_drift is None
    drifted = judge_call(sure, drifted_rule(base, drift))[0]
    assert drifted.decision == "hedge" and drifted.threshold == 0.8
    assert drifted.traffic_drift == drift and drifted.to_dict()["traffic_drift"] == drift
    assert drifted.reason == (
        "the traffic has drifted from the calibration's data (PSI 0.71 on min_logprob over "
        "the last 500 answers, drift_psi 0.25); judged at ood_threshold 0.8"
    )
    # An ood_threshold that is not stricter never lowers t: only the reading is shown.
    lax = judge_call(sure, drifted_rule(rule(threshold=0.6, ood_threshold=0.55), drift))[0]
    assert lax.threshold == 0.6 and lax.decision == "answer"
    assert lax.reason is not None and "judged at" not in lax.reason
    # An answer the rule does not judge carries no drift note.
    tool = judge_call(CallEvidence([choice(-5.0, tool=True)]), drifted_rule(base, drift))[0]
    assert tool.decision == "unjudged" and tool.traffic_drift is None
