"""What the proxy decided about one answer: the :class:`Verdict` and its :data:`Decision`.

A verdict is made in one place, :mod:`proxy.judge`; everything downstream (rewriting the
response, the verdict chunk of a stream, metrics, the decision log) only reads it.

Pure: standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

#: ``answer``: the model's answer as is; ``abstain``: replaced by the abstention message;
#: ``hedge``: prefixed by the hedge; ``annotate``: as is, with a low verdict attached;
#: ``unjudged``: the policy does not judge this kind of answer (tool calls, JSON mode).
Decision = Literal["answer", "abstain", "hedge", "annotate", "unjudged"]


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
    #: the tenant whose rule decided (the wire object also carries it as ``policy``)
    tenant: str
    samples: int | None = None
    #: every raw score computed, for the decision log and calibration from production
    scores: Mapping[str, float] = field(default_factory=dict)
    reason: str | None = None
    #: whether the answer's inputs lie outside what the calibration was fitted on
    #: (None when the calibration records no reference distribution)
    out_of_distribution: bool | None = None
    #: which map produced ``confidence``: the shipped calibration, or a recalibration
    #: learnt from the tenant's feedback (None without a calibration)
    calibration_source: str | None = None
    #: for a rule with ``target_error``: how its threshold was chosen (the bound, the
    #: coverage it buys, how many labels it rests on)
    risk: Mapping[str, Any] | None = None

    @property
    def delivered(self) -> bool:
        """Whether the client received the model's answer (possibly hedged or annotated)."""
        return self.decision in ("answer", "hedge", "annotate")

    def to_dict(self) -> dict[str, Any]:
        """The verdict object of the wire format (``choice.abstention``)."""
        out: dict[str, Any] = {
            "decision": self.decision,
            "confidence": None if self.confidence is None else round(self.confidence, 6),
            "threshold": self.threshold,
            "score": None if self.score is None else round(self.score, 6),
            "score_name": self.score_name,
            "method": self.method,
            "calibrated": self.calibrated,
            "tenant": self.tenant,
            # Deprecated alias of ``tenant``, kept for one release (0.1 called it policy).
            "policy": self.tenant,
        }
        if self.samples is not None:
            out["samples"] = self.samples
        if self.reason:
            out["reason"] = self.reason
        if self.out_of_distribution is not None:
            out["out_of_distribution"] = self.out_of_distribution
        if self.calibration_source is not None:
            out["calibration_source"] = self.calibration_source
        if self.risk is not None:
            out["risk"] = dict(self.risk)
        return out
