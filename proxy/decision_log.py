"""The decision log and the feedback loop.

Every judged response is appended to a JSON Lines log (when a path is configured)::

    {"type": "decision", "id": "cmpl-1", "choice": 0, "time": "2026-11-24T01:02:03Z",
     "tenant": "clinic", "model": "gemma-3-270m", "method": "logprobs",
     "scores": {"min_logprob": -0.3, ...}, "score_name": "min_logprob",
     "confidence": 0.81, "calibrated": true, "threshold": 0.9, "decision": "abstain"}

and ``POST /v1/feedback`` appends ``{"type": "feedback", "id", "choice", "time", "correct"}``.
``abstain calibrate --from-log`` joins the two on (id, choice) to refit from production.
Prompt and answer text are logged only when the tenant's rule says ``log_text: true``.

Recent verdicts are also kept in memory (bounded) so feedback can be binned by the
confidence the proxy predicted; that index is per process, like the metrics.
A log that cannot be written is reported and counted, and serving goes on.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from proxy.judge import Verdict

log = logging.getLogger("abstain.decisions")

#: Seconds between two log lines about the same unwritable path.
_ERROR_LOG_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class Remembered:
    """What feedback needs to know about a past response."""

    tenant: str
    model: str
    confidences: tuple[float | None, ...]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class DecisionLog:
    """Appends decision and feedback records; remembers recent responses for feedback."""

    def __init__(
        self,
        path: Path | None,
        *,
        memory: int = 100_000,
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self.path = path
        self._memory = memory
        self._recent: OrderedDict[str, Remembered] = OrderedDict()
        self._on_error = on_error
        self._fh: IO[bytes] | None = None
        self._last_error_logged = 0.0

    def _write(self, records: Sequence[dict[str, Any]]) -> None:
        if self.path is None or not records:
            return
        data = b"".join(orjson.dumps(r) + b"\n" for r in records)
        try:
            if self._fh is None:
                # Opened lazily and re-opened after a failure, so a directory that
                # appears (or becomes writable) later starts receiving records.
                self._fh = open(self.path, "ab")  # noqa: SIM115 - kept open for appends
            self._fh.write(data)
            self._fh.flush()
        except OSError as exc:
            self._fh = None
            self._on_error()
            now = time.monotonic()
            if now - self._last_error_logged > _ERROR_LOG_INTERVAL:
                self._last_error_logged = now
                log.error("cannot write the decision log %s: %s", self.path, exc.strerror)

    def record(
        self,
        response_id: str,
        tenant: str,
        model: str,
        verdicts: Sequence[Verdict],
        texts: dict[str, Any] | None = None,
    ) -> None:
        """Log one response's verdicts and remember them for feedback."""
        self._recent[response_id] = Remembered(tenant, model, tuple(v.confidence for v in verdicts))
        self._recent.move_to_end(response_id)
        while len(self._recent) > self._memory:
            self._recent.popitem(last=False)
        if self.path is None:
            return
        now = _now()
        records = []
        for i, v in enumerate(verdicts):
            record: dict[str, Any] = {
                "type": "decision",
                "id": response_id,
                "choice": i,
                "time": now,
                "tenant": tenant,
                "model": model,
                **v.to_dict(),
                "scores": dict(v.scores),
            }
            if texts is not None:
                record["prompt"] = texts.get("prompt")
                answers = texts.get("answers") or []
                record["answer"] = answers[i] if i < len(answers) else None
            records.append(record)
        self._write(records)

    def lookup(self, response_id: str) -> Remembered | None:
        return self._recent.get(response_id)

    def feedback(self, response_id: str, choice: int, correct: bool) -> None:
        self._write(
            [
                {
                    "type": "feedback",
                    "id": response_id,
                    "choice": choice,
                    "time": _now(),
                    "correct": correct,
                }
            ]
        )

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
