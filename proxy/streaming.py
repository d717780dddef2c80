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

This module only turns what the pipeline produced into chunks: the verdicts themselves
come from :mod:`proxy.judge`, through :class:`~proxy.pipeline.Pipeline`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from proxy.call import Call
from proxy.errors import ProxyError, UpstreamError
from proxy.evidence import StreamEvidence
from proxy.pipeline import Pipeline, UpstreamStream, ensure_id, keeps_tokens
from proxy.protocol import SSE_DONE, SSE_KEEPALIVE, Kind, choices_of, sse, trim_top_logprobs
from proxy.rewrite import verdict_headers
from proxy.verdict import Verdict


@dataclass
class Stream:
    """What the route layer turns into a StreamingResponse."""

    body: AsyncIterator[bytes]
    headers: dict[str, str] = field(default_factory=dict)


def chunk_head(kind: Kind, source: dict[str, Any]) -> dict[str, Any]:
    """The fields every chunk of a stream repeats, taken from a response or a chunk."""
    head = {
        "id": source.get("id"),
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": source.get("created", int(time.time())),
        "model": source.get("model"),
    }
    if "system_fingerprint" in source:
        head["system_fingerprint"] = source["system_fingerprint"]
    return head


def verdict_chunk(
    head: dict[str, Any], verdicts: list[dict[str, Any]], usage: Any = None
) -> dict[str, Any]:
    """The last chunk before ``[DONE]``: no choices, the verdicts (and usage, if any)."""
    final: dict[str, Any] = {
        **head,
        "choices": [],
        "abstention": verdicts[0] if verdicts else None,
        "abstentions": verdicts,
    }
    if usage is not None:
        final["usage"] = usage
    return final


def completion_chunks(
    kind: Kind, response: dict[str, Any], client_logprobs: bool
) -> list[dict[str, Any]]:
    """Re-express a complete (judged) response as the chunks a stream would carry."""
    base = chunk_head(kind, response)
    chunks: list[dict[str, Any]] = []
    choices = choices_of(response)
    for choice in choices:
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
    verdicts = [c["abstention"] for c in choices if "abstention" in c]
    chunks.append(verdict_chunk(base, verdicts, response.get("usage")))
    return chunks


async def buffered(pipeline: Pipeline, call: Call) -> Stream:
    """Judge first, then stream. Errors before the first keep-alive keep their status."""
    task = asyncio.ensure_future(pipeline.complete(call))
    try:
        done, _ = await asyncio.wait({task}, timeout=call.rule.keepalive_seconds)
    except BaseException:
        task.cancel()  # the client went away before the first keep-alive
        raise
    if done:
        # Raises ProxyError here, so the client gets a proper status code.
        response, verdicts = task.result()
        return Stream(_replay(pipeline, call, response, verdicts), verdict_headers(verdicts))
    return Stream(_wait_then_replay(pipeline, call, task))


async def _replay(
    pipeline: Pipeline,
    call: Call,
    response: dict[str, Any],
    verdicts: list[Verdict],
    ttfb: float | None = None,
) -> AsyncIterator[bytes]:
    if ttfb is None:
        ttfb = time.perf_counter() - call.started
    options = call.body.get("stream_options")
    wants_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    if not wants_usage:
        response.pop("usage", None)
    for chunk in completion_chunks(call.kind, response, call.client_logprobs):
        yield sse(chunk)
    yield SSE_DONE
    pipeline.finish(call, verdicts, 200, ttfb)


async def _wait_then_replay(
    pipeline: Pipeline,
    call: Call,
    task: asyncio.Future[tuple[dict[str, Any], list[Verdict]]],
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
            pipeline.finish(call, [], exc.status, ttfb)
            return
        async for piece in _replay(pipeline, call, response, verdicts, ttfb):
            yield piece
    finally:
        task.cancel()


async def passthrough(pipeline: Pipeline, call: Call) -> Stream:
    """Relay the upstream stream; append the verdict before ``[DONE]``."""
    upstream = await pipeline.open_stream(call)
    return Stream(_relay(pipeline, call, upstream))


async def _relay(pipeline: Pipeline, call: Call, upstream: UpstreamStream) -> AsyncIterator[bytes]:
    evidence = StreamEvidence(
        call.kind, keep_texts=call.rule.log_text or upstream.samples, keep_tokens=keeps_tokens(call)
    )
    keep_logprobs, top_k = call.client_logprobs, call.client_top_k
    ttfb: float | None = None
    last: dict[str, Any] = {}  # the latest chunk: its id and model go in the verdict chunk
    try:
        async for chunk in upstream.chunks():
            for choice in chunk.get("choices") or ():
                if isinstance(choice, dict):
                    evidence.add(choice)
                    if not keep_logprobs and choice.get("logprobs") is not None:
                        choice["logprobs"] = None
                    elif top_k is not None:
                        trim_top_logprobs(choice.get("logprobs"), top_k)
            last = chunk
            yield sse(chunk)
            if ttfb is None:
                ttfb = time.perf_counter() - call.started
        verdicts = await upstream.verdicts(evidence.evidence(json_mode=call.json_mode))
    except UpstreamError as exc:
        yield sse(exc.body())
        yield SSE_DONE
        pipeline.finish(call, [], exc.status, ttfb)
        return
    finally:
        await upstream.aclose()
    call.response_id = ensure_id(last)
    yield sse(verdict_chunk(chunk_head(call.kind, last), [v.to_dict() for v in verdicts]))
    yield SSE_DONE
    pipeline.finish(call, verdicts, 200, ttfb)
