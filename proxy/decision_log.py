"""The decision log and the feedback loop: appending records, remembering responses.

Every judged response is appended to a JSON Lines log (when a path is configured), one
:class:`~proxy.decision_records.DecisionRecord` per choice, and ``POST /v1/feedback``
appends a :class:`~proxy.decision_records.FeedbackRecord`; the format is defined in
:mod:`proxy.decision_records`. ``abstain calibrate --from-log`` joins the two on
(id, choice) to refit from production. Prompt and answer text are logged only when the
tenant's rule says ``log_text: true``.

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
from pathlib import Path
from typing import IO, Any

import orjson

from proxy.decision_records import DecisionRecord, FeedbackRecord, now
from proxy.verdict import Verdict

log = logging.getLogger("abstain.decisions")

#: Seconds between two log lines about the same unwritable path.
_ERROR_LOG_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class Remembered:
    """What feedback needs to know about a past response."""

    tenant: str
    model: str
    confidences: tuple[float | None, ...]


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

    def _write(self, records: Sequence[DecisionRecord | FeedbackRecord]) -> None:
        if self.path is None or not records:
            return
        data = b"".join(orjson.dumps(r.to_json()) + b"\n" for r in records)
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
            moment = time.monotonic()
            if moment - self._last_error_logged > _ERROR_LOG_INTERVAL:
                self._last_error_logged = moment
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
        stamp = now()
        answers = (texts or {}).get("answers") or []
        records = [
            DecisionRecord.of(
                response_id,
                i,
                tenant,
                model,
                v,
                time=stamp,
                text=None
                if texts is None
                else (texts.get("prompt"), answers[i] if i < len(answers) else None),
            )
            for i, v in enumerate(verdicts)
        ]
        self._write(records)

    def lookup(self, response_id: str) -> Remembered | None:
        return self._recent.get(response_id)

    def feedback(self, response_id: str, choice: int, correct: bool) -> None:
        self._write([FeedbackRecord(response_id, choice, correct)])

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
