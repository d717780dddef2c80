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

Every answer echoes the request it got under ``x_echo`` (so tests can check what the
proxy sent upstream) and carries an unknown field ``x_upstream_extra`` (so tests can
check unknown response fields survive the proxy).
"""

from __future__ import annotations

import asyncio
import json
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


def completion(kind: str, body: dict[str, Any], texts: list[str] | None = None) -> dict[str, Any]:
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


class FakeUpstream:
    """An ``httpx.MockTransport`` handler; records every request it receives."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[httpx.Headers] = []
        self.split_samples = 0

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
            await asyncio.sleep(float(body.get("x_sleep", SLOW_SECONDS)))
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
            payload = b"".join(
                b"data: " + json.dumps(c).encode() + b"\n\n" for c in stream_chunks(kind, body)
            )
            return httpx.Response(
                200,
                content=payload + b"data: [DONE]\n\n",
                headers={"content-type": "text/event-stream"},
            )
        return httpx.Response(200, json=completion(kind, body))

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)
