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
they are the decisions each sentence was sent under; ``SentenceChoice.settle`` checks that, and in
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
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from proxy import streaming
from proxy.call import Call
from proxy.errors import ProxyError, UpstreamError
from proxy.evidence import CallEvidence, StreamEvidence
from proxy.judge import skip_reason
from proxy.pipeline import Pipeline, UpstreamStream, by_sentence, ensure_id
from proxy.protocol import SSE_DONE, SSE_KEEPALIVE, sse
from proxy.sentence_choice import SentenceChoice
from proxy.streaming import Stream, chunk_head, verdict_chunk
from proxy.verdict import Verdict

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


class _SentenceStream:
    """One ``streaming: sentence`` response: reads the upstream, writes the SSE body."""

    def __init__(self, pipeline: Pipeline, call: Call) -> None:
        self.pipeline = pipeline
        self.call = call
        self.rule = call.rule
        self.kind = call.kind
        self.evidence = StreamEvidence(call.kind, keep_texts=call.rule.log_text, keep_tokens=True)
        self.choices: dict[int, SentenceChoice] = {}
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
        grown: list[SentenceChoice] = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            self.evidence.add(choice)  # checks the choice (502 when malformed)
            index = choice.get("index", 0)
            state = self.choices.get(index)
            if state is None:
                state = self.choices[index] = SentenceChoice(
                    index, self.kind, self.call.client_logprobs, self.rule, self.call.recalibration
                )
            others = state.others(choice)
            if others is not None and state.stop_at is None:
                out.append(self._delta(state, others))
            if state.read(choice) and state not in grown:
                grown.append(state)
        for state in grown:
            state.advance(partial(self.evidence.live_tokens, state.index))
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
            state.settle(verdict, tokens)
            if state.stop_at is not None:
                verdict.generation_stopped = state.generated

    def _ending(self, verdicts: list[Verdict]) -> list[bytes]:
        """The rest of every choice, its finish, and the verdict chunk."""
        out: list[bytes] = []
        for verdict, index in zip(verdicts, self.final_indexes, strict=True):
            state = self.choices.get(index)
            if state is None:
                continue
            state.finish(verdict)
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

    def _choice_body(self, state: SentenceChoice, delta: dict[str, Any]) -> dict[str, Any]:
        if self.kind == "chat":
            if not state.role_sent:
                delta = {"role": "assistant", **delta}
                state.role_sent = True
            return {"index": state.index, "delta": delta}
        return {"index": state.index, "text": delta.get("content", "")}

    def _chunk(self, body: dict[str, Any]) -> bytes:
        assert self.head is not None
        return sse({**self.head, "choices": [body]})

    def _delta(self, state: SentenceChoice, fields: dict[str, Any]) -> bytes:
        body = self._choice_body(state, fields)
        return self._chunk({**body, "logprobs": None, "finish_reason": None})

    def _content(self, state: SentenceChoice, last: bool = False) -> list[bytes]:
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

    def _finish_chunk(self, state: SentenceChoice, reason: str) -> bytes:
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
