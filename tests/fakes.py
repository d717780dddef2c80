"""A fake OpenAI-compatible upstream whose behaviour follows the model name.

``sure``      every token at logprob -0.01 (the proxy should answer)
``unsure``    every token at logprob -3.0 (the proxy should abstain)
``error-500`` the upstream fails with HTTP 500
``garbage``   the upstream answers something that is not JSON
``nochoices`` a JSON object without choices
``slow``      sleeps ``x_sleep`` seconds (default ``SLOW_SECONDS``) before answering
``tool``      answers with a tool call
``refuse-400`` the upstream rejects the request with HTTP 400
``split``     the main answer is ANSWER; samples (temperature 1.0) cycle through SPLIT
``fail-samples`` the main answer is fine; every sample request fails with HTTP 500

Any other model answers ANSWER everywhere, so its samples agree.

A request may script the answer instead: ``x_tokens`` (``[text, logprob]`` pairs, the
answer of every choice) or ``x_tokens_n`` (one such list per choice). Streamed, each token
is a chunk of its own (choices interleaved), with its logprob, written as UTF-8 (not
as JSON escapes); ``x_error_after: k`` sends an error event after the first k tokens, and
``x_byte_chunks: k`` (the mock transport only) delivers the stream k bytes at a time;
``x_id`` sets a scripted answer's response id.

Every answer echoes the request it got under ``x_echo`` (so tests can check what the
proxy sent upstream) and carries an unknown field ``x_upstream_extra`` (so tests can
check unknown response fields survive the proxy).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

SLOW_SECONDS = 2.0
ANSWER = "Paris is the capital"
SAMPLE_TEMPERATURE = 1.0
SPLIT = ["Lyon", "Lyon", "Nice", "Lyon"]
TOKENS = ["Paris", " is", " the", " capital"]


def _logprob(model: str) -> float:
    return -3.0 if model.startswith("unsure") else -0.01


def _chat_logprobs(model: str, top: int) -> dict[str, Any]:
    lp = _logprob(model)
    return {
        "content": [
            {
                "token": t,
                "logprob": lp,
                "bytes": None,
                "top_logprobs": [{"token": t, "logprob": lp}]
                + [{"token": f"alt{i}", "logprob": lp - 1 - i} for i in range(max(0, top - 1))],
            }
            for t in TOKENS
        ]
    }


def _completion_logprobs(model: str, top: int) -> dict[str, Any]:
    lp = _logprob(model)
    return {
        "tokens": TOKENS,
        "token_logprobs": [lp] * len(TOKENS),
        "top_logprobs": [
            {t: lp, **{f"alt{i}": lp - 1 - i for i in range(max(0, top - 1))}} for t in TOKENS
        ],
        "text_offset": [0, 5, 8, 12],
    }


def scripted(body: dict[str, Any]) -> list[list[tuple[str, float]]] | None:
    """The answers the request scripted (``x_tokens`` or ``x_tokens_n``), one per choice."""
    n = body.get("n") or 1
    if "x_tokens_n" in body:
        return [[(t, float(lp)) for t, lp in tokens] for tokens in body["x_tokens_n"]][:n]
    if "x_tokens" in body:
        return [[(t, float(lp)) for t, lp in body["x_tokens"]]] * n
    return None


def _scripted_entry(token: str, lp: float, top: int) -> dict[str, Any]:
    alts = [{"token": f"alt{i}", "logprob": lp - 1 - i} for i in range(max(0, top - 1))]
    return {"token": token, "logprob": lp, "bytes": list(token.encode()),
            "top_logprobs": [{"token": token, "logprob": lp}, *alts]}  # fmt: skip


def scripted_logprobs(
    kind: str, body: dict[str, Any], tokens: list[tuple[str, float]], at: int = 0
) -> dict[str, Any] | None:
    """The logprobs of scripted tokens in the request's shape (None when it asked none);
    ``at``: where the first token starts in the answer (completions' ``text_offset``)."""
    if kind == "chat":
        if not body.get("logprobs"):
            return None
        top = body.get("top_logprobs") or 0
        return {"content": [_scripted_entry(t, lp, top) for t, lp in tokens]}
    k = body.get("logprobs")
    if k is None:
        return None
    offsets = []
    for t, _ in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": [t for t, _ in tokens],
        "token_logprobs": [lp for _, lp in tokens],
        "top_logprobs": [{t: lp, **{f"alt{i}": lp - 1 - i for i in range(max(0, k - 1))}}
                         for t, lp in tokens],
        "text_offset": offsets,
    }  # fmt: skip


def _scripted_completion(
    kind: str, body: dict[str, Any], answers: list[list[tuple[str, float]]]
) -> dict[str, Any]:
    choices = []
    for i, tokens in enumerate(answers):
        text = "".join(t for t, _ in tokens)
        choice: dict[str, Any] = {"index": i, "finish_reason": "stop",
                                  "logprobs": scripted_logprobs(kind, body, tokens)}  # fmt: skip
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choices.append(choice)
    generated = sum(len(a) for a in answers)
    return {
        "id": body.get("x_id") or f"cmpl-fake-{body['model']}",
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": 1700000000,
        "model": body["model"],
        "choices": choices,
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": generated,
            "total_tokens": 5 + generated,
        },
    }


def _scripted_chunks(
    kind: str, body: dict[str, Any], answers: list[list[tuple[str, float]]]
) -> list[dict[str, Any]]:
    head = {
        "id": body.get("x_id") or f"cmpl-fake-{body['model']}",
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": 1700000000,
        "model": body["model"],
    }
    chunks: list[dict[str, Any]] = []
    at = [0] * len(answers)
    error_after = body.get("x_error_after")
    for step in range(max((len(a) for a in answers), default=0)):
        for i, tokens in enumerate(answers):
            if step >= len(tokens):
                continue
            if error_after is not None and sum(1 for c in chunks if c["choices"]) >= error_after:
                return [*chunks, {"error": {"message": "the model crashed", "type": "server"}}]
            token, lp = tokens[step]
            logprobs = scripted_logprobs(kind, body, [(token, lp)], at[i])
            at[i] += len(token)
            c: dict[str, Any] = {"index": i, "logprobs": logprobs, "finish_reason": None}
            if kind == "chat":
                c["delta"] = (
                    {"role": "assistant", "content": token} if step == 0 else {"content": token}
                )
            else:
                c["text"] = token
            chunks.append({**head, "choices": [c]})
    for i in range(len(answers)):
        end: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": "stop"}
        end.update({"delta": {}} if kind == "chat" else {"text": ""})
        chunks.append({**head, "choices": [end]})
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        usage = _scripted_completion(kind, body, answers)["usage"]
        chunks.append({**head, "choices": [], "usage": usage})
    return chunks


def completion(kind: str, body: dict[str, Any], texts: list[str] | None = None) -> dict[str, Any]:
    if (answers := scripted(body)) is not None:
        return _scripted_completion(kind, body, answers)
    model = body["model"]
    n = body.get("n") or 1
    choices = []
    for i in range(n):
        text = texts[i] if texts else ANSWER
        if kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if model == "tool":
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "lookup", "arguments": '{"q": "x"}'},
                        }
                    ],
                }
            choice: dict[str, Any] = {"index": i, "message": message, "finish_reason": "stop"}
            if body.get("logprobs"):
                choice["logprobs"] = _chat_logprobs(model, body.get("top_logprobs") or 0)
            else:
                choice["logprobs"] = None
        else:
            choice = {"index": i, "text": " " + text, "finish_reason": "stop"}
            lp = body.get("logprobs")
            choice["logprobs"] = None if lp is None else _completion_logprobs(model, lp)
        choices.append(choice)
    return {
        "id": f"cmpl-fake-{model}",
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": 1700000000,
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": 5, "completion_tokens": 4 * n, "total_tokens": 5 + 4 * n},
        "x_upstream_extra": {"kept": True},
        "x_echo": body,
    }


def stream_chunks(kind: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The answer as stream chunks: one per token, then a finish chunk."""
    if (answers := scripted(body)) is not None:
        return _scripted_chunks(kind, body, answers)
    model = body["model"]
    full = completion(kind, {**body, "n": 1})
    lp = full["choices"][0]["logprobs"]
    chunks = []
    for i, tok in enumerate(TOKENS):
        if kind == "chat":
            delta: dict[str, Any] = {"content": tok}
            if i == 0:
                delta["role"] = "assistant"
            c: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
            c["logprobs"] = {"content": [lp["content"][i]]} if lp else None
        else:
            c = {"index": 0, "text": tok, "finish_reason": None}
            c["logprobs"] = (
                {
                    "tokens": [tok],
                    "token_logprobs": [lp["token_logprobs"][i]],
                    "top_logprobs": [lp["top_logprobs"][i]],
                }
                if lp
                else None
            )
        chunks.append(
            {
                "id": f"cmpl-fake-{model}",
                "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                "created": 1700000000,
                "model": model,
                "choices": [c],
            }
        )
    end: dict[str, Any] = (
        {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}
        if kind == "chat"
        else {"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}
    )
    chunks.append({**chunks[0], "choices": [end]})
    return chunks


async def _pieces(payload: bytes, step: int) -> AsyncIterator[bytes]:
    """The payload ``step`` bytes at a time (boundaries inside characters included)."""
    for i in range(0, len(payload), step):
        yield payload[i : i + step]


class FakeUpstream:
    """An ``httpx.MockTransport`` handler; records every request it receives."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[httpx.Headers] = []
        self.split_samples = 0
        #: requests to the "slow" model cancelled while it slept (the proxy gave up)
        self.cancelled = 0

    def samples(self) -> list[dict[str, Any]]:
        """The sample requests received (those at the sampling temperature)."""
        return [r for r in self.requests if r.get("temperature") == SAMPLE_TEMPERATURE]

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append(body)
        self.headers.append(request.headers)
        model = body.get("model", "")
        kind = "chat" if request.url.path.endswith("/chat/completions") else "completions"
        if model == "error-500":
            return httpx.Response(500, json={"error": {"message": "boom"}})
        if model == "refuse-400":
            return httpx.Response(400, json={"error": {"message": "context too long"}})
        if model == "garbage":
            return httpx.Response(200, content=b"<html>not json</html>")
        if model == "nochoices":
            return httpx.Response(200, json={"id": "x", "object": "chat.completion"})
        if model == "slow":
            try:
                await asyncio.sleep(float(body.get("x_sleep", SLOW_SECONDS)))
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        is_sample = body.get("temperature") == SAMPLE_TEMPERATURE
        if model == "fail-samples" and is_sample:
            return httpx.Response(500, json={"error": {"message": "sampler down"}})
        if model == "split" and is_sample:
            texts = []
            for _ in range(body.get("n") or 1):
                texts.append(SPLIT[self.split_samples % len(SPLIT)])
                self.split_samples += 1
            return httpx.Response(200, json=completion(kind, body, texts))
        if body.get("stream"):
            chunks = stream_chunks(kind, body)
            payload = b"".join(
                b"data: " + json.dumps(c, ensure_ascii=False).encode() + b"\n\n" for c in chunks
            )
            if not any("error" in c for c in chunks):  # a stream cut by an error: no [DONE]
                payload += b"data: [DONE]\n\n"
            step = body.get("x_byte_chunks")
            return httpx.Response(
                200,
                content=_pieces(payload, step) if step else payload,
                headers={"content-type": "text/event-stream"},
            )
        return httpx.Response(200, json=completion(kind, body))

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)
