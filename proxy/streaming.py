"""Server-sent events for ``stream: true``, in the policy's two modes.

``buffer``: the complete answer is fetched and judged first, then streamed (or replaced
by the abstention). SSE comment keep-alives flow while the client waits, so idle
timeouts between client and proxy do not cut the connection. If the answer is ready
within the first keep-alive interval, the verdict is in the response headers too.

``passthrough``: upstream chunks are relayed as they arrive; token logprobs are
collected on the way and the verdict arrives in one last chunk before ``[DONE]``.
It can annotate, but not retract, so a below-threshold answer is reported as
``annotate`` whatever the rule's action.

Either way, a client that disconnects cancels the upstream request: Starlette cancels
the body iterator, and the ``finally`` blocks close the upstream stream or task.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.confidence.logprobs import scores_from_tokens, token_logprobs
from proxy.errors import ProxyError, UpstreamError
from proxy.judge import Verdict
from proxy.pipeline import Call, Pipeline, ensure_id, verdict_headers
from proxy.protocol import SSE_DONE, SSE_KEEPALIVE, Kind, choices_of, is_tool_call, sse
from proxy.sampled import SamplingSession

#: Called once when a stream ends: (verdicts, status, seconds to first byte).
OnFinish = Callable[[list[Verdict], int, float | None], None]


@dataclass
class Stream:
    """What the route layer turns into a StreamingResponse."""

    body: AsyncIterator[bytes]
    headers: dict[str, str] = field(default_factory=dict)


def completion_chunks(
    kind: Kind, response: dict[str, Any], client_logprobs: bool
) -> list[dict[str, Any]]:
    """Re-express a complete (judged) response as the chunks a stream would carry."""
    base = {
        "id": response.get("id"),
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": response.get("created", int(time.time())),
        "model": response.get("model"),
    }
    if "system_fingerprint" in response:
        base["system_fingerprint"] = response["system_fingerprint"]
    chunks: list[dict[str, Any]] = []
    for choice in choices_of(response):
        index = choice.get("index", 0)
        logprobs = choice.get("logprobs") if client_logprobs else None
        if kind == "chat":
            message = dict(choice.get("message") or {})
            delta: dict[str, Any] = {"role": message.pop("role", "assistant")}
            delta.update(message)
            for i, call in enumerate(delta.get("tool_calls") or []):
                if isinstance(call, dict):
                    call.setdefault("index", i)
            body = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}
            chunks.append({**base, "choices": [body]})
            end = {"index": index, "delta": {}, "logprobs": None,
                   "finish_reason": choice.get("finish_reason")}  # fmt: skip
            chunks.append({**base, "choices": [end]})
        else:
            body = {"index": index, "text": choice.get("text", ""), "logprobs": logprobs,
                    "finish_reason": choice.get("finish_reason")}  # fmt: skip
            chunks.append({**base, "choices": [body]})
    final: dict[str, Any] = {**base, "choices": []}
    if "abstention" in response:
        final["abstention"] = response["abstention"]
        final["abstentions"] = [c.get("abstention") for c in choices_of(response)]
    if "usage" in response:
        final["usage"] = response["usage"]
    chunks.append(final)
    return chunks


async def buffered(pipeline: Pipeline, call: Call, on_finish: OnFinish) -> Stream:
    """Judge first, then stream. Errors before the first keep-alive keep their status."""
    task = asyncio.ensure_future(pipeline.complete(call))
    done, _ = await asyncio.wait({task}, timeout=call.rule.keepalive_seconds)
    if done:
        # Raises ProxyError here, so the client gets a proper status code.
        response, verdicts = task.result()
        return Stream(_replay(call, response, verdicts, on_finish), verdict_headers(verdicts))
    return Stream(_wait_then_replay(call, task, on_finish))


async def _replay(
    call: Call, response: dict[str, Any], verdicts: list[Verdict], on_finish: OnFinish
) -> AsyncIterator[bytes]:
    ttfb = time.perf_counter() - call.started
    wants_usage = bool((call.body.get("stream_options") or {}).get("include_usage"))
    if not wants_usage:
        response.pop("usage", None)
    for chunk in completion_chunks(call.kind, response, call.client_logprobs):
        yield sse(chunk)
    yield SSE_DONE
    on_finish(verdicts, 200, ttfb)


async def _wait_then_replay(
    call: Call, task: asyncio.Future[tuple[dict[str, Any], list[Verdict]]], on_finish: OnFinish
) -> AsyncIterator[bytes]:
    ttfb: float | None = None
    try:
        while not task.done():
            if ttfb is None:
                ttfb = time.perf_counter() - call.started
            yield SSE_KEEPALIVE
            await asyncio.wait({task}, timeout=call.rule.keepalive_seconds)
        try:
            response, verdicts = task.result()
        except ProxyError as exc:
            yield sse(exc.body())
            yield SSE_DONE
            on_finish([], exc.status, ttfb)
            return
        async for piece in _replay(
            call, response, verdicts, lambda v, s, _t: on_finish(v, s, ttfb)
        ):
            yield piece
    finally:
        task.cancel()


class _Collector:
    """Token logprobs and tool-call flags per choice index, gathered from stream chunks."""

    def __init__(self) -> None:
        self.lps: dict[int, list[float]] = {}
        self.tops: dict[int, list[Any]] = {}
        self.tools: set[int] = set()
        self.texts: dict[int, list[str]] | None = None

    def add(self, kind: Kind, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        if self.texts is not None:
            piece = (
                choice.get("text")
                if kind == "completions"
                else (choice.get("delta") or {}).get("content")
            )
            if isinstance(piece, str):
                self.texts.setdefault(index, []).append(piece)
        lps, tops = token_logprobs(choice.get("logprobs"))
        self.lps.setdefault(index, []).extend(lps)
        self.tops.setdefault(index, []).extend(tops)
        if is_tool_call(kind, choice):
            self.tools.add(index)

    def text(self, index: int) -> str | None:
        """The streamed text of one choice, when texts are collected."""
        return None if self.texts is None else "".join(self.texts.get(index, []))


async def passthrough(pipeline: Pipeline, call: Call, on_finish: OnFinish) -> Stream:
    """Relay the upstream stream; append the verdict before ``[DONE]``."""
    upstream, body = pipeline.upstream_request(call)
    session = pipeline.start_sampling(call, upstream, body)
    chunks = upstream.stream(call.kind, body).__aiter__()
    t0 = time.perf_counter()
    try:
        first: dict[str, Any] | None = await chunks.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException as exc:
        if session is not None:
            session.cancel()
        if isinstance(exc, UpstreamError):
            pipeline.upstream_failed(upstream, exc)
        raise
    finally:
        call.upstream_seconds += time.perf_counter() - t0
    return Stream(_relay(pipeline, call, first, chunks, session, on_finish))


async def _relay(
    pipeline: Pipeline,
    call: Call,
    first: dict[str, Any] | None,
    chunks: AsyncIterator[dict[str, Any]],
    session: SamplingSession | None,
    on_finish: OnFinish,
) -> AsyncIterator[bytes]:
    collector = _Collector()
    if call.rule.log_text or session is not None:
        collector.texts = {}
    keep_logprobs = call.client_logprobs
    ttfb: float | None = None
    last: dict[str, Any] = {}  # the latest chunk: its id and model go in the verdict chunk
    upstream = pipeline.upstreams.get(call.route.upstream)
    try:
        chunk = first
        while chunk is not None:
            for choice in chunk.get("choices") or ():
                if isinstance(choice, dict):
                    collector.add(call.kind, choice)
                    if not keep_logprobs and choice.get("logprobs") is not None:
                        choice["logprobs"] = None
            last = chunk
            yield sse(chunk)
            if ttfb is None:
                ttfb = time.perf_counter() - call.started
            t0 = time.perf_counter()
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                chunk = None
            finally:
                call.upstream_seconds += time.perf_counter() - t0
        pipeline.metrics.upstream_latency.labels(upstream.name, call.route.model).observe(
            call.upstream_seconds
        )
        verdicts = await _stream_verdicts(pipeline, call, collector, session)
    except UpstreamError as exc:
        pipeline.upstream_failed(upstream, exc)
        yield sse(exc.body())
        yield SSE_DONE
        on_finish([], exc.status, ttfb)
        return
    finally:
        # Done, failed, or the client went away (cancellation): release the upstream.
        if session is not None:
            session.cancel()
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    pipeline.observe_verdicts(call, verdicts)
    call.response_id = ensure_id(last)
    if collector.texts is not None and call.rule.log_text:
        call.answers = [collector.text(i) for i in range(len(verdicts))]
    shown = [v.to_dict() for v in verdicts]
    final = {
        "id": last.get("id"),
        "object": last.get("object", "chat.completion.chunk"),
        "created": last.get("created", int(time.time())),
        "model": last.get("model"),
        "choices": [],
        "abstention": shown[0] if shown else None,
        "abstentions": shown,
    }
    yield sse(final)
    yield SSE_DONE
    on_finish(verdicts, 200, ttfb)


async def _stream_verdicts(
    pipeline: Pipeline, call: Call, collector: _Collector, session: SamplingSession | None
) -> list[Verdict]:
    indexes = sorted(collector.lps.keys() | collector.tools)
    scores = {
        i: scores_from_tokens(collector.lps.get(i, []), collector.tops.get(i, [])) for i in indexes
    }
    samples = None
    if session is not None and indexes:
        first = indexes[0]
        samples = await pipeline.sample(call, session, collector.text(first), scores[first])
    verdicts = []
    for index in indexes:
        verdict, _shown = pipeline.judge_choice(
            call,
            text=collector.text(index),
            logprob_scores=scores[index],
            tool_call=index in collector.tools,
            session=session,
            samples=samples,
        )
        if verdict.decision in ("abstain", "hedge"):
            # The text has already gone out: all that is left is to say so.
            verdict.decision = "annotate"
        verdicts.append(verdict)
    return verdicts
