"""``streaming: sentence``: an answer streamed sentence by sentence, each judged before it
is sent.

The upstream stream is read as it comes, but each choice's text is held. As soon as a
segment of it (a sentence, a list line, a code block: :mod:`proxy.sentences`) is complete,
which :func:`proxy.sentences.complete` tells from the text so far, it is scored on its own
tokens (:func:`proxy.confidence.spans.segment_scores`), judged
(:func:`proxy.judge.judge_sentences`) and sent, or its replacement is, as a content
delta: chat ``delta.content`` (the choice's first delta carries the role), completions
``text``. The white space between two segments goes out verbatim in front of the second.
The last segment is judged when the stream ends. **A sentence is never sent
before it is judged.**

What the client reads is what the same answer gets without streaming
(:func:`proxy.rewrite.rewrite_sentences`: a withheld sentence becomes
``sentence_abstention``, a run of them in one line shares one marker, a hedged one gets
``sentence_hedge``), with one rule for the start: nothing is sent until a sentence is kept
(answered, hedged or annotated). Markers of withheld sentences, and code, that come before
it are held back and flushed in front of it; if the answer ends with nothing kept, the
client gets the tenant's ``abstention_message`` instead, as it would without streaming,
and never a string of markers followed by it.

The verdicts are made once, at the end, by the pipeline's judge on the answer as the
upstream streamed it (up to the stop, with ``stop_on_withheld``), and recorded once
through the :class:`~proxy.recording.Recorder`: the same decisions a non-streamed request
gets for the same answer. The splitter and the per-segment scores are prefix-stable, so
they are the decisions each sentence was sent under; ``_Choice.settle`` checks that, and in
the one case where they could differ (an upstream whose token texts do not spell its text,
so that the whole answer's tokens cannot be aligned while a prefix's could) the verdict
recorded is rebuilt from what the client was actually sent. The last chunk before
``[DONE]`` is the verdict chunk, as in passthrough, with every sentence's verdict at its
offsets in the text the client received (and the usage, when the client asked for it).

``stop_on_withheld``: at a choice's first withheld sentence its answer ends there; once
every choice has ended so, or finished, the upstream stream is closed (which cancels the
upstream request), what was judged is sent, and the stop is counted with the completion
tokens generated so far (the verdict says so too: ``generation_stopped``).

Keep-alive comments (``: keep-alive``) go out whenever nothing was sent for
``keepalive_seconds``, from the start (while the upstream has not sent its first chunk)
to the end. Logprobs, when the client asked for them, are sent only for tokens every
character of which was sent as the model wrote it: the tokens of a withheld or hedged
sentence, which would spell out what was withheld, never are. Tool calls and other
non-text delta fields are relayed as they arrive (they are not split into sentences).
Upstream errors mid-stream end the stream with an error event and ``[DONE]``; a client
that goes away cancels the upstream request.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from proxy import streaming
from proxy.call import Call
from proxy.confidence.logprobs import scores_from_tokens
from proxy.confidence.spans import segment_scores, token_offsets
from proxy.errors import ProxyError, UpstreamError
from proxy.evidence import CallEvidence, ChoiceEvidence, StreamEvidence, Tokens
from proxy.judge import judge_sentences, skip_reason, summarize
from proxy.pipeline import Pipeline, UpstreamStream, by_sentence, ensure_id
from proxy.policy.rules import Rule
from proxy.protocol import SSE_DONE, SSE_KEEPALIVE, Kind, choice_text, sse, trim_top_logprobs
from proxy.rewrite import apply_verdict, sentence_text
from proxy.sentences import Segment, complete, split
from proxy.streaming import Stream, chunk_head, verdict_chunk
from proxy.verdict import SentenceVerdict, Verdict

#: Decisions under which a part is sent as the model wrote it (its tokens may go out).
_AS_IS = ("answer", "annotate", "unjudged")
#: Decisions under which the client sees the part (a kept sentence ends the hold).
_SHOWN = ("answer", "hedge", "annotate")
#: What every complete segment ends with, or is followed by: a sentence's end or a line
#: break. Until one follows the last decided segment, there is nothing new to split.
_MAYBE_END = re.compile(r"[.!?…。！？\n]")
#: Upstream stream closes still running after their stream was cancelled: referenced
#: here so that the event loop does not drop them half-way.
_CLOSING: set[asyncio.Task[None]] = set()


async def stream(pipeline: Pipeline, call: Call) -> Stream:
    """The SSE response of a ``streaming: sentence`` rule.

    Errors before the upstream's first chunk keep their status when they come within the
    first keep-alive interval (as in buffer mode); later they are an error event.
    """
    if skip_reason(call.rule, tool_call=False, json_mode=call.json_mode) is not None:
        # Nothing will be judged (method none, JSON mode): nothing to hold back.
        return await streaming.passthrough(pipeline, call)
    if not by_sentence(call):
        # The sampled methods judge the answer whole: only buffering can withhold it.
        return await streaming.buffered(pipeline, call)
    opening = asyncio.ensure_future(pipeline.open_stream(call))
    try:
        done, _ = await asyncio.wait({opening}, timeout=call.rule.keepalive_seconds)
    except BaseException:
        _close_in_background(None, opening, None)  # the client went away
        raise
    relay = _SentenceStream(pipeline, call)
    if done:
        return Stream(relay.body(opening.result(), None))
    return Stream(relay.body(None, opening))


@dataclass(slots=True)
class _Choice:
    """One choice index: its text so far, the parts judged, and what the client got."""

    index: int
    kind: Kind
    #: the client asked for logprobs: keep each scored token's wire entry
    keep_entries: bool
    text: str = ""
    finish_reason: str | None = None
    #: logprob entries received (every token the upstream generated for this choice)
    generated: int = 0
    #: the wire entry of each scored token (aligned with the evidence's tokens): a chat
    #: entry dict, or (token, logprob, top, text_offset) of the completions shape
    entries: list[Any] = field(default_factory=list)
    chat_shape: bool = True
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
    # Which tokens may go out: those inside a run of text sent verbatim.
    next_token: int = 0
    run_start: int | None = None
    run_client: int = 0
    offsets: list[int] | None = None
    offsets_for: tuple[int, int] = (-1, -1)
    no_logprobs: bool = False

    # ---------------------------------------------------------------- reading chunks

    def read(self, choice: dict[str, Any]) -> bool:
        """Take one upstream choice delta; whether it added text."""
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):
            self._count(logprobs)
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            self.finish_reason = reason
        if self.kind == "completions":
            piece = choice.get("text")
        else:
            piece = (choice.get("delta") or {}).get("content")
        if self.stop_at is not None or not isinstance(piece, str) or not piece:
            return False
        self.text += piece
        return True

    def _count(self, logprobs: dict[str, Any]) -> None:
        content = logprobs.get("content")
        if isinstance(content, list):
            self.generated += len(content)
            if self.keep_entries:
                self.entries += [e for e in content if e.get("logprob") is not None]
            return
        tokens = logprobs.get("tokens")
        if not isinstance(tokens, list):
            return
        self.generated += len(tokens)
        if self.keep_entries:
            self.chat_shape = False
            lps = logprobs.get("token_logprobs") or []
            tops = logprobs.get("top_logprobs") or []
            at = logprobs.get("text_offset") or []
            for i, token in enumerate(tokens):
                lp = lps[i] if i < len(lps) else None
                if lp is not None:
                    top = tops[i] if i < len(tops) else None
                    self.entries.append((token, lp, top, at[i] if i < len(at) else None))

    def others(self, choice: dict[str, Any]) -> dict[str, Any] | None:
        """The chat delta's fields other than the text (tool calls, …), to relay as is."""
        if self.kind != "chat":
            return None
        delta = choice.get("delta") or {}
        rest = {k: v for k, v in delta.items() if k not in ("role", "content") and v is not None}
        return rest or None

    # ------------------------------------------------------------------ judging

    def advance(self, tokens: Callable[[], Tokens | None], rule: Rule) -> None:
        """Judge and place the segments completed since the last call (``tokens``: the
        scored tokens so far, read only when there is something to judge)."""
        if self.stop_at is not None or _MAYBE_END.search(self.text, self.cursor) is None:
            return  # the cheap test first: most chunks complete nothing
        region = self._region()
        if region is None:
            return
        new = [
            Segment(s.start + region, s.end + region, s.kind)
            for s in complete(self.text[region:])
            if s.start + region >= self.cursor
        ]
        if not new or len(new) == self.unaligned_at:
            return
        scores, scored = None, tokens()
        if scored is not None:
            scores = segment_scores(new, self.text, scored.texts, scored.lps, scored.tops)
        if scores is None:
            # The tokens do not spell the text (so far): hold, and try again with more.
            self.unaligned_at = len(new)
            return
        self.unaligned_at = -1
        for segment, part in zip(new, judge_sentences(new, scores, rule, sent=False), strict=True):
            self.segments.append(segment)
            self.parts.append(part)
            self.place(part, rule)
            if rule.stop_on_withheld and part.decision == "abstain":
                self.stop_at = segment.end
                return

    def _region(self) -> int | None:
        """Where to split again from: the start of the line of the first undecided
        segment (splitting is line by line, so from there it cuts as the whole text)."""
        if not self.segments:
            return 0
        last = self.segments[-1]
        if last.kind == "sentence":
            return self.text.rfind("\n", 0, last.start) + 1
        # A list line or a code block ends its line: the next segment is on a later one.
        eol = self.text.find("\n", last.end)
        return None if eol < 0 else eol + 1

    # ------------------------------------------------------------ what is sent

    def place(self, part: SentenceVerdict, rule: Rule) -> None:
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
        new = sentence_text(self.text, part, rule, after_withheld=run)
        gap_start, self.cursor = self.cursor, end
        if run and not new:
            assert previous is not None
            # Shares the replacement of the withheld sentence before it (and drops the gap).
            part.start, part.end = previous.start, previous.end
            self._withheld_tokens(end)
            return
        entries = self._verbatim(gap_start, start, self.length)
        if part.decision in _AS_IS:
            entries += self._verbatim(start, end, self.length + len(gap))
        else:
            self._withheld_tokens(end)
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

    # ----------------------------------------------------------------- logprobs

    def _token_offsets(self) -> list[int] | None:
        if self.no_logprobs or not self.keep_entries:
            return None
        key = (len(self.text), len(self.entries))
        if key != self.offsets_for:
            texts = [e.get("token") if isinstance(e, dict) else e[0] for e in self.entries]
            strings = [t for t in texts if isinstance(t, str)]
            ok = len(strings) == len(texts)
            self.offsets = token_offsets(strings, self.text) if ok else None
            self.offsets_for = key
            if self.offsets is None:
                # The tokens cannot be placed in the text: which are safe is unknown.
                self.no_logprobs = True
        return self.offsets

    def _token_text(self, i: int) -> str:
        entry = self.entries[i]
        text = entry.get("token") if isinstance(entry, dict) else entry[0]
        return text if isinstance(text, str) else ""

    def _verbatim(self, start: int, end: int, client_start: int) -> list[Any]:
        """``text[start:end]`` goes out as written, at ``client_start`` in the client's text:
        the tokens now wholly inside the current verbatim run may go out with it."""
        offsets = self._token_offsets()
        if offsets is None:
            return []
        if self.run_start is None:
            self.run_start, self.run_client = start, client_start
        released = []
        while self.next_token < len(offsets):
            at = offsets[self.next_token]
            length = len(self._token_text(self.next_token))
            if at + length > end:
                break  # not all of it is out yet
            if at >= self.run_start:
                released.append(self._client_entry(self.next_token, at))
            self.next_token += 1
        return released

    def _withheld_tokens(self, end: int) -> None:
        """The text up to ``end`` is not sent as written: its tokens never go out."""
        offsets = self._token_offsets()
        self.run_start = None
        if offsets is None:
            return
        while self.next_token < len(offsets) and offsets[self.next_token] < end:
            self.next_token += 1

    def _client_entry(self, i: int, at: int) -> Any:
        entry = self.entries[i]
        if isinstance(entry, dict):
            return entry
        assert self.run_start is not None
        token, lp, top, offset = entry
        # Where the token is in the client's text, on the upstream's own base.
        if isinstance(offset, int):
            offset += self.run_client + (at - self.run_start) - at
        return (token, lp, top, offset)

    def logprobs(self, entries: list[Any], top_k: int | None) -> dict[str, Any]:
        """The client's ``logprobs`` object for ``entries``, in the upstream's shape."""
        out: dict[str, Any]
        if self.chat_shape:
            out = {"content": entries}
        else:
            out = {
                "tokens": [e[0] for e in entries],
                "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [e[2] for e in entries],
                "text_offset": [e[3] for e in entries],
            }
        if top_k is not None:
            trim_top_logprobs(out, top_k)
        return out

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

    def settle(self, verdict: Verdict, tokens: Tokens | None, rule: Rule) -> None:
        """Make the judge's verdict on the whole answer describe what was sent (in place).

        In the normal case its first parts are the ones already sent, with the same
        decisions (prefix-stable splitting and scores): they are taken over with their
        offsets in the client's text. If they differ and nothing was sent yet, the judge's
        verdict stands and the answer is placed anew from it; if something was sent, the
        verdict is rebuilt from the decisions the client got.
        """
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
        parts = judge_sentences(rest, scores or [{} for _ in rest], rule, sent=False)
        summarize(self.parts + parts, rule, verdict)
        verdict.reason = (
            "judged sentence by sentence as streamed; the whole answer's tokens could not "
            "be aligned with its text as its sentences' were"
        )

    def _restart(self) -> None:
        """Forget every part placed (nothing of them was sent)."""
        self.segments, self.parts = [], []
        self.cursor = self.length = self.next_token = 0
        self.previous, self.run_start = None, None
        self.held, self.held_entries = [], []

    def finish(self, verdict: Verdict, rule: Rule) -> None:
        """Place the rest of the answer under the final verdict."""
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
            apply_verdict(self.kind, choice, verdict, rule)
            entries = self._verbatim(0, len(text), 0) if verdict.decision in _AS_IS else []
            self._put(choice_text(self.kind, choice) or "", entries, shows=True)
            return
        for part in verdict.sentences[len(self.parts) :]:
            self.place(part, rule)
        entries = self._verbatim(self.cursor, len(text), self.length)
        self._put(text[self.cursor :], entries, shows=False)
        if verdict.decision == "abstain":
            # Nothing was kept (so nothing was sent): the whole answer is the abstention.
            self.held, self.held_entries = [], []
            for part in verdict.sentences:
                part.start = part.end = None
            self._put(rule.abstention_message, [], shows=True)
        else:
            self._put("", [], shows=True)


class _SentenceStream:
    """One ``streaming: sentence`` response: reads the upstream, writes the SSE body."""

    def __init__(self, pipeline: Pipeline, call: Call) -> None:
        self.pipeline = pipeline
        self.call = call
        self.rule = call.rule
        self.kind = call.kind
        self.evidence = StreamEvidence(call.kind, keep_texts=call.rule.log_text, keep_tokens=True)
        self.choices: dict[int, _Choice] = {}
        self.expected = call.body.get("n") or 1
        self.head: dict[str, Any] | None = None
        self.rid: str | None = None
        self.usage: dict[str, Any] | None = None
        self.stopped = False
        self.ttfb: float | None = None
        self.last_sent = time.perf_counter()
        self.pending: asyncio.Future[dict[str, Any] | None] | None = None
        self.final_indexes: list[int] = []

    def _sent(self, data: bytes) -> bytes:
        now = time.perf_counter()
        if self.ttfb is None:
            self.ttfb = now - self.call.started
        self.last_sent = now
        return data

    async def body(
        self, upstream: UpstreamStream | None, opening: asyncio.Future[UpstreamStream] | None
    ) -> AsyncIterator[bytes]:
        """The SSE body; ``opening`` is the upstream still waiting for its first chunk."""
        try:
            if upstream is None:
                assert opening is not None
                while not opening.done():
                    yield self._sent(SSE_KEEPALIVE)
                    await asyncio.wait({opening}, timeout=self.rule.keepalive_seconds)
                try:
                    upstream = opening.result()
                except ProxyError as exc:
                    yield self._sent(sse(exc.body()))
                    yield SSE_DONE
                    self.pipeline.finish(self.call, [], exc.status, self.ttfb)
                    return
            try:
                async for piece in self._relay(upstream):
                    yield self._sent(piece)
                verdicts = await upstream.verdicts(self._final_evidence(), settle=self._settle)
                ending = self._ending(verdicts)
            except UpstreamError as exc:
                yield self._sent(sse(exc.body()))
                yield SSE_DONE
                self.pipeline.finish(self.call, [], exc.status, self.ttfb)
                return
            for piece in ending:
                yield self._sent(piece)
            yield SSE_DONE
            self.pipeline.finish(self.call, verdicts, 200, self.ttfb)
        finally:
            await _close(upstream, opening, self.pending)

    async def _relay(self, upstream: UpstreamStream) -> AsyncIterator[bytes]:
        """What can be sent while the upstream streams: judged parts and keep-alives."""
        chunks = upstream.chunks().__aiter__()
        while True:
            if self.pending is None:
                self.pending = asyncio.ensure_future(_next_chunk(chunks))
            idle = self.rule.keepalive_seconds - (time.perf_counter() - self.last_sent)
            if idle > 0:
                await asyncio.wait({self.pending}, timeout=idle)
            if not self.pending.done():
                yield SSE_KEEPALIVE
                continue
            task, self.pending = self.pending, None
            chunk = task.result()  # an upstream error is raised here
            if chunk is None:
                return
            for piece in self._feed(chunk):
                yield piece
            if self._all_stopped():
                await self._stop(upstream)
                return

    def _feed(self, chunk: dict[str, Any]) -> list[bytes]:
        if self.head is None:
            self.rid = ensure_id(chunk)
            self.head = chunk_head(self.kind, chunk)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        out: list[bytes] = []
        grown: list[_Choice] = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            self.evidence.add(choice)  # checks the choice (502 when malformed)
            index = choice.get("index", 0)
            state = self.choices.get(index)
            if state is None:
                state = self.choices[index] = _Choice(index, self.kind, self.call.client_logprobs)
            others = state.others(choice)
            if others is not None and state.stop_at is None:
                out.append(self._delta(state, others))
            if state.read(choice) and state not in grown:
                grown.append(state)
        for state in grown:
            state.advance(partial(self.evidence.tokens, state.index), self.rule)
            out += self._content(state)
        return out

    def _all_stopped(self) -> bool:
        """stop_on_withheld: a choice stopped, and every other one stopped or finished."""
        if not self.rule.stop_on_withheld:
            return False
        states = self.choices.values()
        if not any(s.stop_at is not None for s in states) or len(self.choices) < self.expected:
            return False
        return all(s.stop_at is not None or s.finish_reason is not None for s in states)

    async def _stop(self, upstream: UpstreamStream) -> None:
        """Stop the generation: closing the upstream stream cancels the upstream request."""
        self.stopped = True
        await upstream.aclose()
        generated = sum(s.generated for s in self.choices.values())
        limit = self.call.body.get("max_completion_tokens") or self.call.body.get("max_tokens")
        saved = None
        if isinstance(limit, int) and not isinstance(limit, bool):
            saved = max(0, limit * self.expected - generated)
        self.pipeline.recorder.generation_stopped(self.call, generated, saved)

    def _final_evidence(self) -> CallEvidence:
        """The answers as judged: as streamed, or up to the stop; judged before sent."""
        evidence = self.evidence.evidence(json_mode=self.call.json_mode)
        evidence.already_sent = False
        for i, choice in enumerate(evidence.choices):
            state = self.choices.get(choice.index)
            if state is not None and state.stop_at is not None:
                evidence.choices[i] = state.truncated(choice)
        self.final_indexes = [c.index for c in evidence.choices]
        return evidence

    def _settle(self, verdicts: list[Verdict]) -> None:
        for verdict, index in zip(verdicts, self.final_indexes, strict=True):
            state = self.choices.get(index)
            if state is None:
                continue
            tokens = self.evidence.tokens(index)
            state.settle(verdict, tokens, self.rule)
            if state.stop_at is not None:
                verdict.generation_stopped = state.generated

    def _ending(self, verdicts: list[Verdict]) -> list[bytes]:
        """The rest of every choice, its finish, and the verdict chunk."""
        out: list[bytes] = []
        for verdict, index in zip(verdicts, self.final_indexes, strict=True):
            state = self.choices.get(index)
            if state is None:
                continue
            state.finish(verdict, self.rule)
            out += self._content(state, last=True)
            reason = "stop" if state.stop_at is not None else state.finish_reason or "stop"
            out.append(self._finish_chunk(state, reason))
        if self.head is None:  # the upstream sent no chunk at all
            source: dict[str, Any] = {}
            self.rid = ensure_id(source)
            self.head = chunk_head(self.kind, source)
        self.call.response_id = self.rid
        verdict_dicts = [v.to_dict() for v in verdicts]
        out.append(sse(verdict_chunk(self.head, verdict_dicts, self._usage())))
        return out

    def _usage(self) -> dict[str, Any] | None:
        options = self.call.body.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage")):
            return None
        if not self.stopped:
            return self.usage
        # The upstream never got to send its usage: the completion tokens are those
        # received; the prompt's are known only if an earlier chunk said.
        generated = sum(s.generated for s in self.choices.values())
        prompt = (self.usage or {}).get("prompt_tokens")
        total = prompt + generated if isinstance(prompt, int) else None
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": total}

    # --------------------------------------------------------------- chunks

    def _choice_body(self, state: _Choice, delta: dict[str, Any]) -> dict[str, Any]:
        if self.kind == "chat":
            if not state.role_sent:
                delta = {"role": "assistant", **delta}
                state.role_sent = True
            return {"index": state.index, "delta": delta}
        return {"index": state.index, "text": delta.get("content", "")}

    def _chunk(self, body: dict[str, Any]) -> bytes:
        assert self.head is not None
        return sse({**self.head, "choices": [body]})

    def _delta(self, state: _Choice, fields: dict[str, Any]) -> bytes:
        body = self._choice_body(state, fields)
        return self._chunk({**body, "logprobs": None, "finish_reason": None})

    def _content(self, state: _Choice, last: bool = False) -> list[bytes]:
        """The text ready to send for one choice, as one content delta (or nothing)."""
        text, entries = state.take()
        if not text and not (last and entries):
            state.out_entries = entries  # empty tokens wait for text to go with
            return []
        logprobs = None
        if self.call.client_logprobs:
            logprobs = state.logprobs(entries, self.call.client_top_k)
        body = self._choice_body(state, {"content": text})
        return [self._chunk({**body, "logprobs": logprobs, "finish_reason": None})]

    def _finish_chunk(self, state: _Choice, reason: str) -> bytes:
        body = self._choice_body(state, {})
        if self.kind == "completions":
            body["text"] = ""
        return self._chunk({**body, "logprobs": None, "finish_reason": reason})


async def _next_chunk(chunks: AsyncIterator[dict[str, Any]]) -> dict[str, Any] | None:
    """The next chunk, or None at the end (a task cannot carry StopAsyncIteration)."""
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        return None


async def _close(
    upstream: UpstreamStream | None,
    opening: asyncio.Future[UpstreamStream] | None,
    pending: asyncio.Future[dict[str, Any] | None] | None,
) -> None:
    """Release the upstream, in a task of its own: when the stream is cancelled (the client
    went away) every await here may be cancelled again, and the close must still happen."""
    task = _close_in_background(upstream, opening, pending)
    await asyncio.shield(task)


def _close_in_background(
    upstream: UpstreamStream | None,
    opening: asyncio.Future[UpstreamStream] | None,
    pending: asyncio.Future[dict[str, Any] | None] | None,
) -> asyncio.Task[None]:
    task = asyncio.ensure_future(_release(upstream, opening, pending))
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)
    return task


async def _release(
    upstream: UpstreamStream | None,
    opening: asyncio.Future[UpstreamStream] | None,
    pending: asyncio.Future[dict[str, Any] | None] | None,
) -> None:
    for task in (opening, pending):
        if task is not None and not task.done():
            # A cancelled read closes the upstream response on its way out; the stream
            # cannot be closed while that read is still running.
            task.cancel()
            await asyncio.wait({task})
    opened = opening is not None and opening.done() and not opening.cancelled()
    if upstream is None and opening is not None and opened and opening.exception() is None:
        upstream = opening.result()
    if upstream is not None:
        await upstream.aclose()
