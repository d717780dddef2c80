"""The one place a verdict is made: evidence → scores → calibration → decision.

:func:`judge_call` takes a call's :class:`~proxy.evidence.CallEvidence` and the tenant's
rule and returns one :class:`~proxy.verdict.Verdict` per choice. It does not know whether
the evidence came from a complete response or a stream, nor how samples were drawn:

* a choice the rule does not judge (method none, tool calls, JSON mode) is ``unjudged``;
* the sampled methods read the choice's agreement with the samples, plus its logprob
  scores for hybrid; when too few samples came back, the rule's ``on_sampling_error``
  decides (judge on logprobs, answer, abstain, or fail with 502);
* the score is mapped to P(correct) by the rule's calibration, or put on the 0-1 scale
  without one (``calibrated: false``), and :func:`~proxy.policy.rules.decide` applies t;
* text that already reached the client (passthrough) can only be annotated;
* with ``granularity: sentence`` each sentence (list line) is scored on its own tokens and
  decided on its own (:func:`judge_sentences`); the choice's verdict sums them up.

Pure: no web or HTTP imports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from proxy.confidence.features import uncalibrated
from proxy.confidence.recalibration import Recalibration
from proxy.confidence.spans import segment_scores
from proxy.confidence.stopping import expected_final_share
from proxy.errors import UpstreamError
from proxy.evidence import CallEvidence, ChoiceEvidence
from proxy.policy.rules import Rule, decide
from proxy.sampling.draw import SamplingResult
from proxy.sentences import Segment, split
from proxy.verdict import Decision, SentenceVerdict, Verdict


def confidence_of(scores: Mapping[str, float], rule: Rule) -> float | None:
    """P(correct) under the rule's calibration, or the uncalibrated 0-1 value without one."""
    if rule.calibration is not None:
        return rule.calibration(scores)
    if rule.method == "hybrid":
        # Without a fitted logistic model, the plain mean of the two 0-1 scales: a
        # placeholder that keeps both signals until `abstain calibrate` fits the weights.
        parts = [
            p
            for p in (
                uncalibrated(rule.score, scores.get(rule.score)),
                uncalibrated(rule.consistency_score, scores.get(rule.consistency_score)),
            )
            if p is not None
        ]
        return sum(parts) / len(parts) if parts else None
    return uncalibrated(rule.score, scores.get(rule.score))


def outside_inputs(scores: Mapping[str, float], rule: Rule) -> list[str] | None:
    """The calibration's inputs whose value lies outside what it was fitted on (beyond
    the reference's min/max); None when the calibration records no reference."""
    cal = rule.calibration
    if cal is None or cal.reference is None:
        return None
    return cal.reference.outside_inputs(scores)


def _ood_rule(rule: Rule, outside: list[str] | None) -> Rule:
    """The rule to decide with: its ``ood_threshold`` out of distribution, if stricter."""
    t = rule.ood_threshold
    if outside and t is not None and t > rule.threshold:
        return dataclasses.replace(rule, threshold=t)
    return rule


def drifted_rule(rule: Rule, drift: Mapping[str, Any]) -> Rule:
    """``rule`` for a call made while the tenant's traffic reads drifted (``drift_psi``):
    judged at its ``ood_threshold`` when that is stricter, and carrying the reading."""
    t = rule.ood_threshold
    threshold = t if t is not None and t > rule.threshold else rule.threshold
    return dataclasses.replace(rule, threshold=threshold, traffic_drift=drift)


def _drift_note(rule: Rule) -> str:
    d = rule.traffic_drift or {}
    note = (
        f"the traffic has drifted from the calibration's data (PSI {d.get('psi')} on "
        f"{d.get('input')} over the last {d.get('answers')} answers, drift_psi "
        f"{d.get('drift_psi')})"
    )
    if rule.ood_threshold is not None and rule.threshold == rule.ood_threshold:
        return f"{note}; judged at ood_threshold {rule.threshold}"
    return note


def verdict_on(
    scores: Mapping[str, float],
    rule: Rule,
    *,
    samples: int | None = None,
    recalibration: Recalibration | None = None,
) -> Verdict:
    """Calibrate the rule's score and decide (at ``ood_threshold`` out of distribution).

    ``recalibration``: the map learnt from the tenant's feedback, applied to the rule's
    calibrated P(correct) (ignored without a calibration); the shipped P is kept on the
    verdict, since feedback labels are learnt on it.
    """
    p = confidence_of(scores, rule)
    source = None if rule.calibration is None else "shipped"
    shipped = None
    if recalibration is not None and source is not None and p is not None:
        shipped, p = p, recalibration(p)
        source = recalibration.source
    outside = outside_inputs(scores, rule)
    judged = _ood_rule(rule, outside)
    reason = None if p is not None else "no score could be computed for this answer"
    if outside and reason is None:
        reason = f"inputs outside what the calibration was fitted on: {', '.join(outside)}"
        if judged is not rule:
            reason += f"; judged at ood_threshold {judged.threshold}"
    return Verdict(
        decision=decide(p, judged),
        confidence=p,
        threshold=judged.threshold,
        score=scores.get(rule.score),
        score_name=rule.score,
        method=rule.method,
        calibrated=rule.calibration is not None,
        tenant=rule.tenant,
        samples=samples,
        scores=scores,
        reason=reason,
        out_of_distribution=None if outside is None else bool(outside),
        calibration_source=None if p is None else source,
        shipped_confidence=shipped,
    )


def unjudged(rule: Rule, reason: str) -> Verdict:
    """A verdict for an answer the policy does not judge (tool calls, JSON mode, method none)."""
    return Verdict(
        decision="unjudged",
        confidence=None,
        threshold=rule.threshold,
        score=None,
        score_name=rule.score,
        method=rule.method,
        calibrated=rule.calibration is not None,
        tenant=rule.tenant,
        reason=reason,
    )


def skip_reason(rule: Rule, *, tool_call: bool, json_mode: bool) -> str | None:
    """Why an answer is passed through unjudged, or None when it is judged."""
    if rule.method == "none":
        return "the policy's method is none"
    if tool_call and not rule.judge_tool_calls:
        return "tool calls are not judged by this policy"
    if json_mode and not rule.judge_json:
        return "JSON-mode answers are not judged by this policy"
    return None


def _on_samples(
    choice: ChoiceEvidence,
    result: SamplingResult,
    rule: Rule,
    recalibration: Recalibration | None = None,
) -> Verdict:
    """The verdict on agreement with the samples (plus logprob scores, for hybrid)."""
    agreement = choice.agreement
    if not result.ok or agreement is None:
        return _too_few_samples(choice, result, rule)
    features = {**choice.scores, **agreement.features()}
    if result.early_stopped and agreement.samples:
        # Judge what the stopping rule predicted for the full budget, so the verdict
        # and the reason sampling stopped cannot disagree.
        budget = max(agreement.samples, result.budget - result.failures)
        features["agreement"] = expected_final_share(agreement.agreeing, agreement.samples, budget)
    return verdict_on(features, rule, samples=result.used, recalibration=recalibration)


def _too_few_samples(choice: ChoiceEvidence, result: SamplingResult, rule: Rule) -> Verdict:
    how = rule.sampling.on_error if rule.sampling is not None else "fallback"
    if how == "error":
        raise UpstreamError("Too few samples came back to judge the answer.", kind="sampling")
    if how == "fallback" and rule.logprob_score in choice.scores:
        lp_rule = dataclasses.replace(
            rule, method="logprobs", score=rule.logprob_score, calibration=None
        )
        verdict = verdict_on(choice.scores, lp_rule, samples=result.used)
    else:
        verdict = verdict_on({}, rule, samples=result.used)
        if how in ("answer", "abstain"):
            verdict.decision = "answer" if how == "answer" else rule.action
    verdict.reason = (
        f"only {result.used} of {result.min_samples} required samples came back; "
        f"decided by on_sampling_error={how}"
    )
    return verdict


def judge_sentences(
    segments: list[Segment],
    scores: list[dict[str, float]],
    rule: Rule,
    *,
    sent: bool,
    recalibration: Recalibration | None = None,
) -> list[SentenceVerdict]:
    """Each segment's verdict, at the segment's offsets (the rewrite moves them).

    ``sent``: the text already reached the client, so a doubt can only be annotated.
    ``recalibration``: the map learnt from sentence feedback (see :func:`verdict_on`).
    """
    out = []
    for segment, part_scores in zip(segments, scores, strict=True):
        if not segment.judged:
            out.append(SentenceVerdict(segment.start, segment.end, segment.kind, "unjudged", None))
            continue
        verdict = verdict_on(part_scores, rule, recalibration=recalibration)
        decision = verdict.decision
        if sent and decision in ("abstain", "hedge"):
            decision = "annotate"
        part = SentenceVerdict(
            segment.start, segment.end, segment.kind, decision, verdict.confidence, part_scores
        )
        part.out_of_distribution = verdict.out_of_distribution
        part.shipped_confidence = verdict.shipped_confidence
        out.append(part)
    return out


def summarize(parts: list[SentenceVerdict], rule: Rule, whole: Verdict) -> Verdict:
    """The choice's verdict from its sentences' verdicts.

    ``answer`` when every sentence is answered; ``abstain`` when every one is withheld
    (the client gets the tenant's abstention); ``partial`` when some are; otherwise the
    rule's hedge or annotate. Its confidence is that of the least sure sentence the
    client sees (or, when all are withheld, of the surest one).
    """
    judged = [p for p in parts if p.decision != "unjudged"]
    withheld = [p for p in judged if p.decision == "abstain"]
    shown = [p for p in judged if p.decision != "abstain"]
    decision: Decision
    if withheld:
        decision = "partial" if shown else "abstain"
    else:
        # Nothing withheld: answered as is, or the rule's hedge/annotate on some part.
        decision = next((p.decision for p in judged if p.decision != "answer"), "answer")
    known = [p for p in (shown or withheld) if p.confidence is not None]
    pick = None
    if known:
        pick = (min if shown else max)(known, key=lambda p: p.confidence or 0.0)
    whole.decision = decision
    whole.confidence = pick.confidence if pick is not None else None
    whole.shipped_confidence = pick.shipped_confidence if pick is not None else None
    if whole.confidence is None:
        whole.calibration_source = None
    whole.score = pick.scores.get(rule.score) if pick is not None else None
    whole.sentences = parts
    # The calibration's reference is of sentences: the answer is outside it when a part is.
    flags = [p.out_of_distribution for p in judged if p.out_of_distribution is not None]
    whole.out_of_distribution = any(flags) if flags else None
    whole.reason = None if pick is not None else "no sentence could be scored"
    return whole


def _by_sentence(
    choice: ChoiceEvidence,
    call: CallEvidence,
    rule: Rule,
    recalibration: Recalibration | None = None,
) -> Verdict | None:
    """The verdict sentence by sentence; None when the answer must be judged whole."""
    text, tokens = choice.text, choice.tokens
    if rule.granularity != "sentence" or rule.method != "logprobs":
        return None
    if not text or tokens is None:
        return None
    segments = split(text)
    if not any(s.judged for s in segments):
        return None
    scores = segment_scores(segments, text, tokens.texts, tokens.lps, tokens.tops)
    if scores is None:
        return None
    parts = judge_sentences(
        segments, scores, rule, sent=call.already_sent, recalibration=recalibration
    )
    return summarize(parts, rule, verdict_on(choice.scores, rule, recalibration=recalibration))


def judge_choice(
    choice: ChoiceEvidence,
    call: CallEvidence,
    rule: Rule,
    recalibration: Recalibration | None = None,
) -> Verdict:
    """One choice's verdict (``recalibration``: see :func:`judge_call`)."""
    reason = skip_reason(rule, tool_call=choice.tool_call, json_mode=call.json_mode)
    if reason is not None:
        return unjudged(rule, reason)
    if call.sampling is not None:
        verdict = _on_samples(choice, call.sampling, rule, recalibration)
    elif (by_sentence := _by_sentence(choice, call, rule, recalibration)) is not None:
        verdict = by_sentence
    else:
        verdict = verdict_on(choice.scores, rule, recalibration=recalibration)
    if call.already_sent and verdict.decision in ("abstain", "hedge"):
        # The text has already gone out: all that is left is to say so.
        verdict.decision = "annotate"
    if rule.risk is not None:
        # The threshold came from a target error: say what it rests on.
        verdict.risk = rule.risk
    if rule.traffic_drift is not None:
        verdict.traffic_drift = rule.traffic_drift
        note = _drift_note(rule)
        verdict.reason = f"{verdict.reason}; {note}" if verdict.reason else note
    return verdict


def judge_call(
    call: CallEvidence, rule: Rule, recalibration: Recalibration | None = None
) -> list[Verdict]:
    """Every choice's verdict, in the order of ``call.choices``.

    ``recalibration``: the map learnt from the tenant's feedback for this model (of
    answers, or of sentences for a rule judged by sentence), applied on top of the rule's
    calibration (ignored without one); each verdict's ``calibration_source`` says which
    map answered ("shipped", "recalibrated:<version>"), and ``shipped_confidence`` keeps
    the shipped P(correct) that feedback labels are learnt on.
    """
    return [judge_choice(choice, call, rule, recalibration) for choice in call.choices]


def shown_answer(call: CallEvidence, rule: Rule) -> str | None:
    """The answer to show instead of the model's, when the rule shows the samples' majority.

    Only for a single-choice call: with ``n`` choices the client asked for ``n`` answers,
    and replacing them all by one majority would erase what it asked for.
    """
    sampling = rule.sampling
    if sampling is None or sampling.show != "majority" or len(call.choices) != 1:
        return None
    if call.sampling is None or not call.sampling.ok:
        return None
    agreement = call.choices[0].agreement
    return agreement.majority_answer if agreement is not None else None
