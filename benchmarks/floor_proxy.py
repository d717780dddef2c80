"""The least a Python proxy for confidence can do, as a yardstick for ``overhead.py --floor``.

A bare ASGI app under the same server as ``abstain serve`` (uvicorn, uvloop, httptools)
with an aiohttp client: it parses the client's JSON, asks the upstream for the same
logprobs the proxy asks for (``logprobs: true, top_logprobs: 5`` in chat), and relays the
upstream's bytes unread, streamed or not. No policy, no scores, no metrics, no limits, no
error handling: what it adds over the direct path is what the server, one JSON round
trip and the second HTTP hop cost on the machine at hand, which no proxy written on this
stack can go below.

Run by ``benchmarks/overhead.py --floor`` (``FLOOR_UPSTREAM`` is the upstream's base URL).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import orjson

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_session: aiohttp.ClientSession | None = None


async def _lifespan(receive: Receive, send: Send) -> None:
    global _session
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            _session = aiohttp.ClientSession(auto_decompress=False)
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if _session is not None:
                await _session.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Message, receive: Receive, send: Send) -> None:
    """Forward ``POST /v1/chat/completions`` to ``FLOOR_UPSTREAM`` with logprobs on."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    assert _session is not None
    raw = b""
    more = True
    while more:
        message = await receive()
        raw += message.get("body", b"")
        more = message.get("more_body", False)
    body = orjson.loads(raw)
    body.update(logprobs=True, top_logprobs=5)
    url = os.environ["FLOOR_UPSTREAM"] + "/chat/completions"
    headers = {"content-type": "application/json"}
    async with _session.post(url, data=orjson.dumps(body), headers=headers) as r:
        kind = r.headers.get("content-type", "application/json").encode()
        await send({"type": "http.response.start", "status": r.status,
                    "headers": [(b"content-type", kind)]})  # fmt: skip
        async for chunk in r.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
