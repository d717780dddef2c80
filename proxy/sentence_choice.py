"""One choice of a ``streaming: sentence`` stream: its held text, judged part by part.

A :class:`SentenceChoice` reads the choice's deltas, decides each segment once it is
complete (:func:`proxy.sentences.complete`), and keeps what is owed to the client: the
text of the parts sent (kept, replaced or hedged, white space verbatim), the logprob
entries of the tokens sent as the model wrote them, and, until a part is kept, the
markers held back. :mod:`proxy.sentence_stream` drives one per choice index and turns what
they owe into SSE chunks.

No web framework: it reads the wire format through :mod:`proxy.protocol`.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.confidence.logprobs import scores_from_tokens
from proxy.confidence.recalibration import Recalibration
from proxy.confidence.spans import Alignment, segment_scores, token_offsets
from proxy.evidence import ChoiceEvidence, Tokens
from proxy.judge import judge_sentences, summarize
from proxy.policy.rules import Rule
from proxy.protocol import Kind, choice_text
from proxy.rewrite import apply_verdict, sentence_text
from proxy.sentence_logprobs import VerbatimLogprobs
from proxy.sentences import Segment, complete, split
from proxy.verdict import SentenceVerdict, Verdict

#: Decisions under which a part is sent as the model wrote it (its tokens may go out).
_AS_IS = ("answer", "annotate", "unjudged")
#: Decisions under which the client sees the part (a kept sentence ends the hold).
_SHOWN = ("answer", "hedge", "annotate")
#: What every complete segment ends with, or is followed by: a sentence's end or a line
#: break. Until one follows the last decided segment, there is nothing new to split.
_MAYBE_END = re.compile(r"[.!?…。！？\n]")
#: Undecided text past which a choice stops judging as it streams and holds the rest
#: for the final verdict. Each chunk looks at the undecided text again, so an upstream
#: that never ends a sentence ("a.a.a…" for megabytes) would cost quadratic time; a
#: real sentence or code block is far shorter.
OPEN_MAX = 16_384


@dataclass(slots=True)
class SentenceChoice:
    """One choice index: its text so far, the parts judged, and what the client got."""

    index: int
    kind: Kind
    #: the client asked for logprobs: keep each scored token's wire entry
    keep_entries: bool
    #: the call's rule, and the recalibration it is judged with (fixed for the call)
    rule: Rule
    recalibration: Recalibration | None = None
    text: str = ""
    finish_reason: str | None = None
    #: the upstream's logprob entries, and which of them the client may get
    wire: VerbatimLogprobs = field(init=False)
    #: decided parts, in order: their segments (offsets in ``text``) and verdicts (offsets
    #: in the client's text once placed)
    segments: list[Segment] = field(default_factory=list)
    parts: list[SentenceVerdict] = field(default_factory=list)
    #: complete segments at the last attempt the tokens could not be aligned
    unaligned_at: int = -1
    #: stop_on_withheld: where the answer ends (the end of its first withheld sentence)
    stop_at: int | None = None
    # What the client gets, built as :func:`proxy.rewrite.rewrite_sentences` builds it.
    cursor: int = 0
    length: int = 0
    previous: SentenceVerdict | None = None
    #: a kept sentence was placed: nothing is held back any more
    shown: bool = False
    held: list[str] = field(default_factory=list)
    held_entries: list[Any] = field(default_factory=list)
    out: list[str] = field(default_factory=list)
    out_entries: list[Any] = field(default_factory=list)
    role_sent: bool = False
    #: where each scored token starts in ``text``, placed once each
    alignment: Alignment = field(default_factory=Alignment)
    #: more than OPEN_MAX undecided characters: nothing more is judged until the end,
    #: and the text that comes meanwhile is kept in pieces (``tail``) until then
    held_to_end: bool = False
    tail: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.wire = VerbatimLogprobs(self.keep_entries)

    @property
    def generated(self) -> int:
        """Logprob entries received: every token the upstream generated for this choice."""
        return self.wire.generated

    # ---------------------------------------------------------------- reading chunks

    def read(self, choice: dict[str, Any]) -> bool:
        """Take one upstream choice delta; whether it added text."""
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):
            self.wire.add(logprobs)
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            self.finish_reason = reason
        if self.kind == "completions":
            piece = choice.get("text")
        else:
            piece = (choice.get("delta") or {}).get("content")
        if self.stop_at is not None or not isinstance(piece, str) or not piece:
            return False
        if self.held_to_end:
            self.tail.append(piece)  # joined once, at the end
        else:
            # ``self.text += piece`` copies the whole text: 8 MB in 1 KB pieces took 13 s.
            # With the attribute cleared, the local is the string's only reference and
            # CPython grows it in place (3 ms for the same).
            text, self.text = self.text, ""
            text += piece
            self.text = text
        return True

    def others(self, choice: dict[str, Any]) -> dict[str, Any] | None:
        """The chat delta's fields other than the text (tool calls, …), to relay as is."""
        if self.kind != "chat":
            return None
        delta = choice.get("delta") or {}
        rest = {k: v for k, v in delta.items() if k not in ("role", "content") and v is not None}
        return rest or None

    # ------------------------------------------------------------------ judging

    def advance(self, tokens: Callable[[], Tokens | None]) -> None:
        """Judge and place the segments completed since the last call (``tokens``: the
        scored tokens so far, read only when there is something to judge)."""
        rule = self.rule
        if self.stop_at is not None or self.held_to_end:
            return
        if len(self.text) - self.cursor > OPEN_MAX:
            self.held_to_end = True  # the final verdict decides the rest, in one pass
            return
        if _MAYBE_END.search(self.text, self.cursor) is None:
            return  # the cheap test first: most chunks complete nothing
        region = self._region()
        if region is None:
            return
        new = [s for s in complete(self.text, region) if s.start >= self.cursor]
        if not new or len(new) == self.unaligned_at:
            return
        scores, scored = None, tokens()
        if scored is not None:
            scores = self._scores(new, scored)
        if scores is None:
            # The tokens do not spell the text (so far): hold, and try again with more.
            self.unaligned_at = len(new)
            return
        self.unaligned_at = -1
        parts = judge_sentences(new, scores, rule, sent=False, recalibration=self.recalibration)
        for segment, part in zip(new, parts, strict=True):
            self.segments.append(segment)
            self.parts.append(part)
            self.place(part)
            if rule.stop_on_withheld and part.decision == "abstain":
                self.stop_at = segment.end
                return

    def _scores(self, new: list[Segment], scored: Tokens) -> list[dict[str, float]] | None:
        """The new segments' scores, from the tokens from just before the first on: the
        tokens are placed in the text once each (:class:`Alignment`)."""
        offsets = self.alignment.extend(scored.texts, self.text)
        if offsets is None:
            return None
        # One token back: a token with leading spaces starts before its segment does.
        first = max(0, bisect_left(offsets, new[0].start) - 1)
        tops = scored.tops[first:] if scored.tops else []
        return segment_scores(
            new, self.text, scored.texts[first:], scored.lps[first:], tops, offsets=offsets[first:]
        )

    def _region(self) -> int | None:
        """Where to split again from: the end of the last decided sentence (a cut the
        splitter made, from which it cuts as in the whole text), or the next line's start.
        Never further back: splitting the whole line again at every sentence made a
        stream quadratic in its longest paragraph."""
        if not self.segments:
            return 0
        last = self.segments[-1]
        if last.kind == "sentence":
            return last.end
        # A list line or a code block ends its line: the next segment is on a later one.
        eol = self.text.find("\n", last.end)
        return None if eol < 0 else eol + 1

    # ------------------------------------------------------------ what is sent

    def place(self, part: SentenceVerdict) -> None:
        """Add what the client gets for one judged part (at its offsets in ``text``, which
        are moved to the client's text), as :func:`~proxy.rewrite.rewrite_sentences` does."""
        assert part.start is not None and part.end is not None
        start, end = part.start, part.end
        gap = self.text[self.cursor : start]
        previous = self.previous
        run = (
            previous is not None
            and previous.decision == "abstain"
            and part.decision == "abstain"
            and "\n" not in gap
        )
        new = sentence_text(self.text, part, self.rule, after_withheld=run)
        gap_start, self.cursor = self.cursor, end
        if run and not new:
            assert previous is not None
            # Shares the replacement of the withheld sentence before it (and drops the gap).
            part.start, part.end = previous.start, previous.end
            self.wire.withheld(self.text, end)
            return
        entries = self.wire.verbatim(self.text, gap_start, start, self.length)
        if part.decision in _AS_IS:
            entries += self.wire.verbatim(self.text, start, end, self.length + len(gap))
        else:
            self.wire.withheld(self.text, end)
        part.start = self.length + len(gap)
        part.end = part.start + len(new)
        self.previous = part
        self._put(gap + new, entries, shows=part.decision in _SHOWN)

    def _put(self, piece: str, entries: list[Any], *, shows: bool) -> None:
        if shows and not self.shown:
            self.shown = True
            self.out += self.held
            self.out_entries += self.held_entries
            self.held.clear()
            self.held_entries.clear()
        self.length += len(piece)
        if self.shown:
            self.out.append(piece)
            self.out_entries += entries
        else:
            self.held.append(piece)
            self.held_entries += entries

    def take(self) -> tuple[str, list[Any]]:
        """The text (and logprob entries) ready to send, and forget it."""
        text, entries = "".join(self.out), self.out_entries
        self.out, self.out_entries = [], []
        return text, entries

    def logprobs(self, entries: list[Any], top_k: int | None) -> dict[str, Any]:
        """The client's ``logprobs`` object for ``entries``, in the upstream's shape."""
        return self.wire.as_logprobs(entries, top_k)

    # --------------------------------------------------------------- the end

    def truncated(self, evidence: ChoiceEvidence) -> ChoiceEvidence:
        """The evidence of the answer as stopped: up to its first withheld sentence."""
        assert self.stop_at is not None
        full = self.text
        self.text = full[: self.stop_at]
        tokens = evidence.tokens
        if tokens is None:
            return ChoiceEvidence(evidence.index, self.text, {}, evidence.tool_call)
        offsets = token_offsets(tokens.texts, full)
        if offsets is None:  # unaligned: cut by length
            offsets, at = [], 0
            for text in tokens.texts:
                offsets.append(at)
                at += len(text)
        k = sum(1 for at in offsets if at < self.stop_at)
        tops = tokens.tops[:k] if tokens.tops else []
        kept = Tokens(tokens.texts[:k], tokens.lps[:k], tops)
        scores = scores_from_tokens(kept.lps, kept.tops)
        return ChoiceEvidence(evidence.index, self.text, scores, evidence.tool_call, tokens=kept)

    def _join_tail(self) -> None:
        if self.tail:
            self.text += "".join(self.tail)
            self.tail.clear()

    def settle(self, verdict: Verdict, tokens: Tokens | None) -> None:
        """Make the judge's verdict on the whole answer describe what was sent (in place).

        In the normal case its first parts are the ones already sent, with the same
        decisions (prefix-stable splitting and scores): they are taken over with their
        offsets in the client's text. If they differ and nothing was sent yet, the judge's
        verdict stands and the answer is placed anew from it; if something was sent, the
        verdict is rebuilt from the decisions the client got.
        """
        self._join_tail()
        decided = len(self.parts)
        if not decided:
            return
        judged = verdict.sentences
        if (
            judged is not None
            and len(judged) >= decided
            and all(
                (p.decision, p.start, p.end) == (part.decision, seg.start, seg.end)
                for p, part, seg in zip(judged, self.parts, self.segments, strict=False)
            )
        ):
            judged[:decided] = self.parts
            return
        if not self.shown:
            self._restart()
            return
        rest = [s for s in split(self.text) if s.start >= self.cursor]
        scores = None
        if tokens is not None and rest:
            scores = segment_scores(rest, self.text, tokens.texts, tokens.lps, tokens.tops)
        rule, recalibration = self.rule, self.recalibration
        parts = judge_sentences(
            rest, scores or [{} for _ in rest], rule, sent=False, recalibration=recalibration
        )
        summarize(self.parts + parts, rule, verdict)
        verdict.reason = (
            "judged sentence by sentence as streamed; the whole answer's tokens could not "
            "be aligned with its text as its sentences' were"
        )

    def _restart(self) -> None:
        """Forget every part placed (nothing of them was sent)."""
        self.segments, self.parts = [], []
        self.cursor = self.length = 0
        self.previous = None
        self.wire.restart()
        self.held, self.held_entries = [], []

    def finish(self, verdict: Verdict) -> None:
        """Place the rest of the answer under the final verdict."""
        self._join_tail()
        text = self.text
        if verdict.sentences is None:
            # Judged whole (code only, a tool call, tokens that cannot be aligned): nothing
            # was sent, so the answer goes out as it would without streaming.
            self._restart()
            choice: dict[str, Any] = (
                {"message": {"role": "assistant", "content": text}}
                if self.kind == "chat"
                else {"text": text}
            )
            apply_verdict(self.kind, choice, verdict, self.rule)
            as_is = verdict.decision in _AS_IS
            entries = self.wire.verbatim(text, 0, len(text), 0) if as_is else []
            self._put(choice_text(self.kind, choice) or "", entries, shows=True)
            return
        for part in verdict.sentences[len(self.parts) :]:
            self.place(part)
        entries = self.wire.verbatim(text, self.cursor, len(text), self.length)
        self._put(text[self.cursor :], entries, shows=False)
        if verdict.decision == "abstain":
            # Nothing was kept (so nothing was sent): the whole answer is the abstention.
            self.held, self.held_entries = [], []
            for part in verdict.sentences:
                part.start = part.end = None
            self._put(self.rule.abstention_message, [], shows=True)
        else:
            self._put("", [], shows=True)
