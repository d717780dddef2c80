"""Turn one answer's raw scores into a verdict under a tenant's rule.

Pure: scores in, :class:`Verdict` out. The pipeline computes scores (logprobs,
agreement) and applies the verdict to the wire response.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.confidence import consistency, logprobs
from proxy.policy import Decision, Rule, decide


@dataclass(slots=True)
class Verdict:
    """What the proxy decided about one answer, as shown to the client."""

    decision: Decision
    confidence: float | None
    threshold: float
    score: float | None
    score_name: str
    method: str
    calibrated: bool
    policy: str
    samples: int | None = None
    #: every raw score computed, for the decision log and calibration from production
    scores: Mapping[str, float] = field(default_factory=dict)
    reason: str | None = None

    @property
    def delivered(self) -> bool:
        """Whether the client received the model's answer (possibly hedged or annotated)."""
        return self.decision in ("answer", "hedge", "annotate")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "decision": self.decision,
            "confidence": None if self.confidence is None else round(self.confidence, 6),
            "threshold": self.threshold,
            "score": None if self.score is None else round(self.score, 6),
            "score_name": self.score_name,
            "method": self.method,
            "calibrated": self.calibrated,
            "policy": self.policy,
        }
        if self.samples is not None:
            out["samples"] = self.samples
        if self.reason:
            out["reason"] = self.reason
        return out


def uncalibrated(name: str, value: float | None) -> float | None:
    """A raw score on the [0, 1] scale, for rules without a calibration file."""
    if value is None:
        return None
    if name in consistency.SCORES:
        return consistency.as_probability(name, value)
    return logprobs.as_probability(name, value)


def _hybrid_without_calibration(scores: Mapping[str, float], rule: Rule) -> float | None:
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


def judge(
    scores: Mapping[str, float],
    rule: Rule,
    *,
    method: str | None = None,
    samples: int | None = None,
) -> Verdict:
    """Calibrate the rule's score and decide."""
    name = rule.score
    raw = scores.get(name)
    calibrated = rule.calibration is not None
    if rule.calibration is not None:
        p = rule.calibration(scores)
    elif (method or rule.method) == "hybrid":
        p = _hybrid_without_calibration(scores, rule)
    else:
        p = uncalibrated(name, raw)
    return Verdict(
        decision=decide(p, rule),
        confidence=p,
        threshold=rule.threshold,
        score=raw,
        score_name=name,
        method=method or rule.method,
        calibrated=calibrated,
        policy=rule.tenant,
        samples=samples,
        scores=scores,
        reason=None if p is not None else "no score could be computed for this answer",
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
        policy=rule.tenant,
        reason=reason,
    )
