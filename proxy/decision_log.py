"""The decision log and the feedback loop: appending records, remembering responses.

Every judged response is appended to a JSON Lines log (when a path is configured), one
:class:`~proxy.decision_records.DecisionRecord` per choice, and ``POST /v1/feedback``
appends a :class:`~proxy.decision_records.FeedbackRecord`; the format is defined in
:mod:`proxy.decision_records`. ``abstain calibrate --from-log`` joins the two on
(id, choice) to refit from production. Prompt and answer text are logged only when the
tenant's rule says ``log_text: true``.

Recent verdicts are also remembered so feedback can be binned by the confidence the
proxy predicted: by a :class:`~proxy.shared_state.FeedbackMemory`, in this process
(bounded, the default) or in Redis (a TTL, shared by every pod).
A log that cannot be written is reported and counted, and serving goes on.

The log file is watched like :class:`logging.handlers.WatchedFileHandler` does: before
each write the path is stat'ed and compared, by (device, inode), with the open file; when
it was renamed (logrotate) or deleted, it is reopened, so records land in a fresh file at
the configured path. When the path cannot be opened (its directory is gone, no
permission), every record not written is counted in ``on_error`` (one per record) and
logged at most once a minute; writing resumes by itself once the path is writable.
The path ``-`` writes the JSON Lines to standard output instead (for container
platforms that collect stdout).

Feedback is idempotent per (id, choice): the memory's ``claim_feedback`` tells a first
word from a repeat, and it is remembered with the response, so it is bounded by
``memory`` too. :meth:`DecisionLog.lookup` and :meth:`DecisionLog.previous_feedback`
read the in-process memory only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import orjson

from proxy.decision_records import DecisionRecord, FeedbackRecord, now
from proxy.shared_state.memory import (
    FeedbackMemory,
    InMemoryFeedbackMemory,
    Remembered,
    SentenceParts,
)
from proxy.verdict import Verdict

__all__ = ["DecisionLog", "Remembered"]

log = logging.getLogger("abstain.decisions")

#: Seconds between two log lines about the same unwritable path.
_ERROR_LOG_INTERVAL = 60.0


class DecisionLog:
    """Appends decision and feedback records; remembers recent responses for feedback."""

    def __init__(
        self,
        path: Path | None,
        *,
        memory: int = 100_000,
        on_error: Callable[[int], object] = lambda _lost: None,
        stream: IO[str] | None = None,
        feedback_memory: FeedbackMemory | None = None,
    ) -> None:
        """``path`` ``-`` means standard output (or ``stream``, when given);
        ``feedback_memory`` defaults to the last ``memory`` responses in this process."""
        self.path = path
        self._stdout = path is not None and str(path) == "-"
        self._stream = stream
        self.memory: FeedbackMemory = (
            feedback_memory if feedback_memory is not None else InMemoryFeedbackMemory(memory)
        )
        self._on_error = on_error
        self._fh: IO[bytes] | None = None
        self._identity: tuple[int, int] | None = None
        self._last_error_logged = 0.0

    def _open(self, path: Path) -> IO[bytes]:
        """The open log file, reopened when the path no longer names it."""
        if self._fh is not None:
            try:
                st = os.stat(path)
                same = (st.st_dev, st.st_ino) == self._identity
            except FileNotFoundError:
                same = False
            if not same:
                self._close_file()
        if self._fh is None:
            fh = open(path, "ab")  # noqa: SIM115 - kept open for appends
            st = os.fstat(fh.fileno())
            self._fh, self._identity = fh, (st.st_dev, st.st_ino)
        return self._fh

    def _close_file(self) -> None:
        fh, self._fh, self._identity = self._fh, None, None
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()

    def _write(self, records: Sequence[DecisionRecord | FeedbackRecord]) -> None:
        if self.path is None or not records:
            return
        data = b"".join(orjson.dumps(r.to_json()) + b"\n" for r in records)
        try:
            if self._stdout:
                stream = self._stream or sys.stdout
                stream.write(data.decode())
                stream.flush()
            else:
                fh = self._open(self.path)
                fh.write(data)
                fh.flush()
        except (OSError, ValueError) as exc:  # ValueError: a closed stream
            if not self._stdout:
                self._close_file()
            self._on_error(len(records))
            moment = time.monotonic()
            if moment - self._last_error_logged > _ERROR_LOG_INTERVAL:
                self._last_error_logged = moment
                reason = getattr(exc, "strerror", None) or str(exc)
                log.error(
                    "cannot write the decision log %s (%d record(s) lost): %s",
                    self.path,
                    len(records),
                    reason,
                )

    def record(
        self,
        response_id: str,
        tenant: str,
        model: str,
        verdicts: Sequence[Verdict],
        texts: dict[str, Any] | None = None,
    ) -> None:
        """Log one response's verdicts and remember them for feedback."""
        self.memory.remember(
            response_id,
            tenant,
            model,
            [v.confidence for v in verdicts],
            bases=_bases(verdicts),
            sentences=_sentence_parts(verdicts),
        )
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
        """The response in the in-process memory (None with a shared one)."""
        memory = self.memory
        return memory.get(response_id) if isinstance(memory, InMemoryFeedbackMemory) else None

    def previous_feedback(
        self, response_id: str, choice: int, sentence: int | None = None
    ) -> bool | None:
        """The ``correct`` already recorded for (id, choice[, sentence]), or None."""
        seen = self.lookup(response_id)
        return None if seen is None else seen.previous(choice, sentence)

    def feedback(
        self, response_id: str, choice: int, correct: bool, sentence: int | None = None
    ) -> None:
        """Log feedback and remember it, so that a repeat can be recognized (a shared
        memory remembers it when it is claimed, see ``FeedbackMemory.claim_feedback``)."""
        if isinstance(self.memory, InMemoryFeedbackMemory):
            self.memory.mark(response_id, choice, correct, sentence)
        self._write([FeedbackRecord(response_id, choice, correct, sentence=sentence)])

    def close(self) -> None:
        self._close_file()


def _bases(verdicts: Sequence[Verdict]) -> list[float | None] | None:
    """The shipped P(correct) per choice, when a recalibration answered any of them."""
    if all(v.shipped_confidence is None for v in verdicts):
        return None
    return [v.label_base for v in verdicts]


def _sentence_parts(verdicts: Sequence[Verdict]) -> list[SentenceParts | None] | None:
    """Per choice judged by sentence, (confidence, shipped P) of each part."""
    if all(v.sentences is None for v in verdicts):
        return None
    return [
        None
        if v.sentences is None
        else tuple((part.confidence, part.label_base) for part in v.sentences)
        for v in verdicts
    ]
