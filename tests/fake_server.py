"""The fake upstream of ``tests/fakes.py`` as a real HTTP server (aiohttp), for
end-to-end tests and benchmarks: ``python -m tests.fake_server --port 9100``.

Streams are sent chunk by chunk with a flush after each, like a real model server.
It also counts how many streams were cut by the client (``GET /stats``), so tests can
check that a disconnect reaches the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from aiohttp import web

from tests.fakes import completion, stream_chunks


class Stats:
    """Counters a test can read back."""

    def __init__(self) -> None:
        self.requests = 0
        self.streams_cut = 0


def make_app(token_delay: float = 0.0) -> web.Application:
    stats = Stats()

    async def handle(request: web.Request) -> web.StreamResponse:
        stats.requests += 1
        body: dict[str, Any] = await request.json()
        kind = "chat" if request.path.endswith("/chat/completions") else "completions"
        model = body.get("model", "")
        if model == "error-500":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if model == "slow":
            await asyncio.sleep(float(body.get("x_sleep", 2.0)))
        if not body.get("stream"):
            answer = completion(kind, body)
            if isinstance(body.get("x_id"), str):  # a test that needs distinct response ids
                answer["id"] = body["x_id"]
            return web.json_response(answer)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        delay = float(body.get("x_token_delay", token_delay))
        try:
            for chunk in stream_chunks(kind, body):
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                if delay:
                    await asyncio.sleep(delay)
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            stats.streams_cut += 1
            raise
        return resp

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "sure", "object": "model"}]})

    async def get_stats(_request: web.Request) -> web.Response:
        return web.json_response({"requests": stats.requests, "streams_cut": stats.streams_cut})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    app.router.add_post("/v1/completions", handle)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", get_stats)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--token-delay", type=float, default=0.0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(
        make_app(args.token_delay), host=args.host, port=args.port, print=None, access_log=None
    )


if __name__ == "__main__":
    main()
