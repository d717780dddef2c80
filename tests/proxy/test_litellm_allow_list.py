"""A client cannot steer litellm: no fallback URL, no retries, no forged answer.

Two real HTTP servers on loopback: the configured upstream (always 500, so litellm
would fall back if it were told how) and an "attacker" that only counts requests.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from proxy.app import create_app
from proxy.settings import Settings

# Not importorskip: importing litellm here, before the proxy sets its offline switch
# (proxy.settings.quiet_litellm), would make it fetch its cost map from the network.
if importlib.util.find_spec("litellm") is None:
    pytest.skip("litellm is not installed", allow_module_level=True)


class Counting(ThreadingHTTPServer):
    hits: int = 0
    authorizations: list[str]


def serve(status: int) -> Counting:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            server = self.server
            assert isinstance(server, Counting)
            server.hits += 1
            server.authorizations.append(self.headers.get("authorization", ""))
            self.rfile.read(int(self.headers.get("content-length") or 0))
            # Like a careless upstream: the 400 repeats the request's Authorization header.
            echoed = f"Invalid key provided: {self.headers.get('authorization', '')}"
            body = json.dumps({"error": {"message": "down" if status != 400 else echoed}}).encode()
            if status == 200:
                body = json.dumps(
                    {
                        "id": "forged",
                        "object": "chat.completion",
                        "model": "x",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "forged"},
                                "finish_reason": "stop",
                            }
                        ],
                    }
                ).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = Counting(("127.0.0.1", 0), Handler)
    server.authorizations = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


KEY = "sk-litellm-secret-abcdef"


def litellm_app(tmp_path: Path, upstream: Counting) -> Any:
    """The proxy with one litellm upstream at ``upstream``, its key in the environment."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"""
upstreams:
  lt:
    litellm_model: openai/x
    api_key_env: LT_KEY
    litellm_params: {{api_base: "http://127.0.0.1:{upstream.server_port}/v1", max_retries: 0}}
models:
  m: {{upstream: lt}}
auth: {{unknown_keys: default, default_tenant: t}}
tenants: {{t: {{}}}}
"""
    )
    return create_app(
        Settings(policy=policy, handle_signals=False, reload_interval_seconds=0),
        registry=CollectorRegistry(),
        env={"LT_KEY": KEY},
    )


@pytest.fixture
def servers() -> Iterator[tuple[Counting, Counting]]:
    primary, attacker = serve(500), serve(200)
    yield primary, attacker
    for s in (primary, attacker):
        s.shutdown()
        s.server_close()


def test_client_fields_cannot_send_the_key_elsewhere(
    tmp_path: Path, servers: tuple[Counting, Counting]
) -> None:
    primary, attacker = servers
    attacker_url = f"http://127.0.0.1:{attacker.server_port}/v1"
    app = litellm_app(tmp_path, primary)
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "fallbacks": [{"model": "openai/x", "api_base": attacker_url}],
        "api_base": attacker_url,
        "base_url": attacker_url,
        "mock_response": "forged",
        "max_retries": 6,
        "num_retries": 6,
    }
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/v1/chat/completions", json=body)
    assert attacker.hits == 0
    assert r.status_code == 502, r.text
    assert "forged" not in r.text
    # The key went only where the policy says, and only as often as the policy allows.
    assert 1 <= primary.hits <= 2
    assert all(a == f"Bearer {KEY}" for a in primary.authorizations)


def test_an_upstream_error_that_echoes_the_key_reveals_nothing_through_litellm(
    tmp_path: Path,
) -> None:
    rejecting = serve(400)
    try:
        app = litellm_app(tmp_path, rejecting)
        with TestClient(app, raise_server_exceptions=False) as client:
            r = client.post(
                "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            )
        assert rejecting.hits >= 1  # the upstream did echo the key back
        assert r.status_code == 400, r.text
        assert "litellm-secret" not in r.text and "sk-litellm" not in r.text
        assert "Invalid key provided" in r.json()["error"]["message"]
        assert "litellm." not in r.json()["error"]["message"]  # no internal exception prefix
    finally:
        rejecting.shutdown()
        rejecting.server_close()
