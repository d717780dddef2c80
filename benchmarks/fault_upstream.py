"""A fault-injecting OpenAI-compatible upstream for the soak benchmark.

What it does follows the request's model name (a ``-pt`` suffix is ignored, so one
behaviour can be routed under two proxy models):

* ``good``: a valid answer with token logprobs; with ``stream: true`` a valid SSE stream
  ending in ``data: [DONE]``;
* ``slow``: the same, after about 2 s;
* ``error-500``: status 500; ``error-503``: status 503 with ``Retry-After: 0``;
* ``malformed``: logprobs as a string instead of an object;
* ``huge``: a 40 MiB JSON answer (a 40 MiB SSE line when streaming), over the proxy's
  default response cap (8 MiB);
* ``trickle``: one byte every 0.2 s with no newline (for at most 30 s);
* ``reset``: part of an answer, then the connection is aborted.

Anything else is answered 404. Listens on 127.0.0.1 only.

Run:  .venv/bin/python benchmarks/fault_upstream.py --port 8090
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from typing import Any

from aiohttp import web

TOKENS = ["The", " capital", " is", " Paris", "."]
LOGPROBS = [-0.05, -0.2, -0.01, -0.3, -0.02]
HUGE_BYTES = 40 * 1024 * 1024
#: A trickle stops by itself after this many bytes (30 s), even if no one hangs up.
TRICKLE_MAX_BYTES = 150
TRICKLE_INTERVAL = 0.2
SLOW_SECONDS = 2.0


def _huge_body() -> bytes:
    head = b'{"id":"huge","object":"chat.completion","model":"huge","choices":[{"index":0,'
    head += b'"finish_reason":"stop","message":{"role":"assistant","content":"'
    tail = b'"}}]}'
    return head + b"x" * (HUGE_BYTES - len(head) - len(tail)) + tail


def _top(k: int, i: int, lp: float) -> list[tuple[str, float]]:
    alts = [(TOKENS[i], lp)] + [(f" alt{j}", lp - 1.0 - j) for j in range(max(0, k - 1))]
    return alts[:k]


def _chat_logprobs(k: int) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": tok,
                "logprob": lp,
                "top_logprobs": [{"token": t, "logprob": v} for t, v in _top(k, i, lp)],
            }
            for i, (tok, lp) in enumerate(zip(TOKENS, LOGPROBS, strict=True))
        ]
    }


def _completion_logprobs(k: int) -> dict[str, Any]:
    return {
        "tokens": list(TOKENS),
        "token_logprobs": list(LOGPROBS),
        "top_logprobs": [dict(_top(k, i, lp)) for i, lp in enumerate(LOGPROBS)],
    }


def _k(kind: str, body: dict[str, Any]) -> int:
    if kind == "chat":
        return int(body.get("top_logprobs") or 0)
    lp = body.get("logprobs")
    return int(lp) if isinstance(lp, int) and not isinstance(lp, bool) else 0


def _wants_logprobs(kind: str, body: dict[str, Any]) -> bool:
    return bool(body.get("logprobs")) if kind == "chat" else body.get("logprobs") is not None


def answer(kind: str, body: dict[str, Any], model: str, malformed: bool) -> dict[str, Any]:
    n = body.get("n") or 1
    k = _k(kind, body)
    choices = []
    for i in range(n):
        lp: Any = None
        if _wants_logprobs(kind, body):
            lp = _chat_logprobs(k) if kind == "chat" else _completion_logprobs(k)
        if malformed:
            lp = "these are not logprobs"
        if kind == "chat":
            message = {"role": "assistant", "content": "".join(TOKENS)}
            choice = {"index": i, "message": message, "finish_reason": "stop", "logprobs": lp}
        else:
            choice = {"index": i, "text": "".join(TOKENS), "finish_reason": "stop", "logprobs": lp}
        choices.append(choice)
    return {
        "id": f"cmpl-{model}",
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": 1700000000,
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": 5, "completion_tokens": 5 * n, "total_tokens": 5 + 5 * n},
    }


def chunks(kind: str, body: dict[str, Any], model: str, malformed: bool) -> list[dict[str, Any]]:
    k = _k(kind, body)
    wants = _wants_logprobs(kind, body)
    out = []
    for i, tok in enumerate(TOKENS):
        lp: Any = None
        if kind == "chat":
            if wants:
                lp = {"content": [_chat_logprobs(k)["content"][i]]}
            delta: dict[str, Any] = {"content": tok}
            if i == 0:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
        else:
            if wants:
                full = _completion_logprobs(k)
                lp = {key: [full[key][i]] for key in ("tokens", "token_logprobs", "top_logprobs")}
            choice = {"index": 0, "text": tok, "finish_reason": None}
        choice["logprobs"] = "not logprobs" if malformed else lp
        out.append(choice)
    end: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
    end.update({"delta": {}} if kind == "chat" else {"text": ""})
    out.append(end)
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return [
        {"id": f"cmpl-{model}", "object": obj, "created": 1, "model": model, "choices": [c]}
        for c in out
    ]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "server_error"}}
    return web.json_response(body, status=status, headers=headers)


async def _sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    return resp


async def _abort(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    if request.transport is not None:
        request.transport.abort()
    return resp


def make_handler(kind: str, huge: bytes):
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "invalid JSON")
        if not isinstance(body, dict):
            return _error(400, "not an object")
        model = str(body.get("model", ""))
        behaviour = model.removesuffix("-pt")
        stream = bool(body.get("stream"))
        return await _behave(request, kind, body, behaviour, stream, huge)

    return handler


async def _behave(
    request: web.Request,
    kind: str,
    body: dict[str, Any],
    behaviour: str,
    stream: bool,
    huge: bytes,
) -> web.StreamResponse:
    if behaviour == "slow":
        await asyncio.sleep(SLOW_SECONDS)
    if behaviour in ("good", "slow", "malformed"):
        malformed = behaviour == "malformed"
        if not stream:
            return web.json_response(answer(kind, body, behaviour, malformed))
        resp = await _sse(request)
        for chunk in chunks(kind, body, behaviour, malformed):
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    if behaviour == "error-500":
        return _error(500, "injected failure")
    if behaviour == "error-503":
        return _error(503, "injected overload", {"Retry-After": "0"})
    if behaviour == "huge":
        if stream:
            resp = await _sse(request)
            await resp.write(b"data: ")
        else:
            resp = web.StreamResponse(headers={"content-type": "application/json"})
            resp.content_length = len(huge)
            await resp.prepare(request)
        step = 1024 * 1024
        for i in range(0, len(huge), step):
            await resp.write(huge[i : i + step])
        if stream:
            await resp.write(b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp
    if behaviour == "trickle":
        if stream:
            resp = await _sse(request)
        else:
            resp = web.StreamResponse(headers={"content-type": "application/json"})
            await resp.prepare(request)
        for _ in range(TRICKLE_MAX_BYTES):
            await resp.write(b"x")
            await asyncio.sleep(TRICKLE_INTERVAL)
        await resp.write_eof()
        return resp
    if behaviour == "reset":
        if stream:
            resp = await _sse(request)
            first = chunks(kind, body, behaviour, False)[0]
            await resp.write(b"data: " + json.dumps(first).encode() + b"\n\n")
        else:
            raw = json.dumps(answer(kind, body, behaviour, False)).encode()
            resp = web.StreamResponse(headers={"content-type": "application/json"})
            resp.content_length = len(raw)
            await resp.prepare(request)
            await resp.write(raw[: len(raw) // 2])
        await asyncio.sleep(0.05)
        return await _abort(request, resp)
    return _error(404, f"no model {behaviour!r}")


async def models(_request: web.Request) -> web.Response:
    names = ["good", "slow", "error-500", "error-503", "malformed", "huge", "trickle", "reset"]
    return web.json_response(
        {"object": "list", "data": [{"id": m, "object": "model"} for m in names]}
    )


def make_app() -> web.Application:
    huge = _huge_body()
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", make_handler("chat", huge))
    app.router.add_post("/v1/completions", make_handler("completions", huge))
    return app


def _not_a_hang_up(record: logging.LogRecord) -> bool:
    """Drop aiohttp's traceback when the proxy hung up mid-answer: that is the exercise."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, ConnectionError)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_not_a_hang_up)
    web.run_app(make_app(), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
