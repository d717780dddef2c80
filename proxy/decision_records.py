"""The decision log's record format, for writing and for reading back.

The log is JSON Lines with two record types, joined on ``(id, choice)``::

    {"type": "decision", "id": "cmpl-1", "choice": 0, "time": "2026-11-24T01:02:03.000000Z",
     "tenant": "clinic", "model": "gemma-3-270m", "decision": "abstain", "confidence": 0.81,
     "threshold": 0.9, "score": -0.3, "score_name": "min_logprob", "method": "logprobs",
     "calibrated": true, "policy": "clinic", "scores": {"min_logprob": -0.3, ...}}
    {"type": "feedback", "id": "cmpl-1", "choice": 0, "time": "...", "correct": true}
    {"type": "feedback", "id": "c-2", "choice": 0, "sentence": 1, "time": "...", "correct": false}

A decision record holds the verdict object exactly as the client saw it, plus every raw
score; an answer judged by sentence also has ``sentence_scores``, the raw scores of each
part of ``sentences`` (in order; empty for a part not judged), so that a sentence's
feedback (which names its index) can be joined to them. ``prompt`` and ``answer``
appear only when the tenant's rule says ``log_text``.
:mod:`proxy.decision_log` writes these records and
:mod:`proxy.evaluation.log_labels` reads them back; both go through this module, so
the two cannot drift apart.

Pure: standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from proxy.verdict import Verdict

#: Keys of a decision record that are not the verdict's own (``tenant`` is both).
_DECISION_KEYS = frozenset(
    {"type", "id", "choice", "time", "model", "scores", "sentence_scores", "prompt", "answer"}
)


def now() -> str:
    """The records' timestamp format: UTC, microseconds, ``Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _key(data: Mapping[str, Any]) -> tuple[str, int] | None:
    rid, choice = data.get("id"), data.get("choice", 0)
    if not isinstance(rid, str) or not isinstance(choice, int) or isinstance(choice, bool):
        return None
    return rid, choice


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One judged choice of one response."""

    id: str
    choice: int
    tenant: str
    model: str
    #: the verdict object as the client saw it (``decision``, ``confidence``, ...)
    verdict: Mapping[str, Any]
    #: every raw score computed for the answer (the inputs a refit needs)
    scores: Mapping[str, Any]
    time: str = field(default_factory=now)
    #: judged by sentence: the raw scores of each part, in the verdict's order
    sentence_scores: tuple[Mapping[str, Any], ...] | None = None
    #: prompt and answer text, only when the rule logs text
    prompt: Any = None
    answer: str | None = None
    has_text: bool = False

    @classmethod
    def of(
        cls,
        response_id: str,
        choice: int,
        tenant: str,
        model: str,
        verdict: Verdict,
        *,
        time: str | None = None,
        text: tuple[Any, str | None] | None = None,
    ) -> DecisionRecord:
        """The record of one verdict; ``text`` is (prompt, answer) when text is logged."""
        return cls(
            id=response_id,
            choice=choice,
            tenant=tenant,
            model=model,
            verdict=verdict.to_dict(),
            scores=dict(verdict.scores),
            time=time or now(),
            sentence_scores=None
            if verdict.sentences is None
            else tuple(dict(part.scores) for part in verdict.sentences),
            prompt=text[0] if text else None,
            answer=text[1] if text else None,
            has_text=text is not None,
        )

    @property
    def method(self) -> str:
        return str(self.verdict.get("method") or "logprobs")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "decision",
            "id": self.id,
            "choice": self.choice,
            "time": self.time,
            "tenant": self.tenant,
            "model": self.model,
            **self.verdict,
            "scores": dict(self.scores),
        }
        if self.sentence_scores is not None:
            out["sentence_scores"] = [dict(s) for s in self.sentence_scores]
        if self.has_text:
            out["prompt"] = self.prompt
            out["answer"] = self.answer
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DecisionRecord | None:
        """The record in a parsed line; None when the line is not a valid decision."""
        key = _key(data)
        scores = data.get("scores")
        if data.get("type") != "decision" or key is None or not isinstance(scores, dict):
            return None
        parts = data.get("sentence_scores")
        sentence_scores = None
        if isinstance(parts, list) and all(isinstance(p, dict) for p in parts):
            sentence_scores = tuple(parts)
        return cls(
            id=key[0],
            choice=key[1],
            tenant=str(data.get("tenant")),
            model=str(data.get("model")),
            verdict={k: v for k, v in data.items() if k not in _DECISION_KEYS},
            scores=scores,
            time=str(data.get("time", "")),
            sentence_scores=sentence_scores,
            prompt=data.get("prompt"),
            answer=data.get("answer") if isinstance(data.get("answer"), str) else None,
            has_text="prompt" in data or "answer" in data,
        )


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    """Whether one choice of a past response (or one sentence of it: ``sentence``, its
    index in the verdict's ``sentences``) was right, as ``POST /v1/feedback`` said."""

    id: str
    choice: int
    correct: bool
    time: str = field(default_factory=now)
    sentence: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "feedback", "id": self.id, "choice": self.choice}
        if self.sentence is not None:
            out["sentence"] = self.sentence
        out.update(time=self.time, correct=self.correct)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FeedbackRecord | None:
        """The record in a parsed line; None when the line is not valid feedback."""
        key = _key(data)
        correct = data.get("correct")
        if data.get("type") != "feedback" or key is None or not isinstance(correct, bool):
            return None
        sentence = data.get("sentence")
        if sentence is not None and (not isinstance(sentence, int) or isinstance(sentence, bool)):
            return None
        time = str(data.get("time", ""))
        return cls(id=key[0], choice=key[1], correct=correct, time=time, sentence=sentence)


def parse_record(data: Any) -> DecisionRecord | FeedbackRecord | None:
    """A parsed log line as its record, or None when it is neither kind."""
    if not isinstance(data, dict):
        return None
    return DecisionRecord.from_json(data) or FeedbackRecord.from_json(data)
