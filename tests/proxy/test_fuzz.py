"""Property-based fuzzing of the HTTP surface: whatever a client sends, no 5xx.

Hypothesis builds request bodies from the fields the proxy reads, with values of every
JSON type, plus arbitrary JSON; the upstream is a well-behaved fake, so any 5xx is the
proxy's own fault. Each answer must also be OpenAI-shaped when it is an error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from proxy.app import create_app
from proxy.settings import Settings

POLICY = """
upstreams:
  up: {base_url: "http://upstream.test/v1"}
models:
  m: {upstream: up}
  relay: {upstream: up, streaming: passthrough}
  agree: {upstream: up, method: consistency, samples: 2, adaptive: false}
auth: {unknown_keys: default, default_tenant: t}
tenants: {t: {}}
"""


async def upstream(request: httpx.Request) -> httpx.Response:
    """Answers anything with one good completion (or stream) in the right wire shape."""
    body = json.loads(request.content)
    chat = request.url.path.endswith("/chat/completions")
    lp = (
        {"content": [{"token": "Paris", "logprob": -0.1, "top_logprobs": []}]}
        if chat
        else {"tokens": ["Paris"], "token_logprobs": [-0.1], "top_logprobs": [{"Paris": -0.1}]}
    )
    if body.get("stream") is True:
        piece = {"delta": {"content": "Paris"}} if chat else {"text": "Paris"}
        chunk = {"id": "c", "choices": [{"index": 0, **piece, "logprobs": lp}]}
        content = b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
        return httpx.Response(200, content=content, headers={"content-type": "text/event-stream"})
    message = {"message": {"role": "assistant", "content": "Paris"}} if chat else {"text": "Paris"}
    return httpx.Response(
        200, json={"id": "c", "choices": [{"index": 0, **message, "logprobs": lp}]}
    )


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    path: Path = tmp_path_factory.mktemp("fuzz") / "policy.yaml"
    path.write_text(POLICY)
    app = create_app(
        Settings(policy=path, handle_signals=False, reload_interval_seconds=0),
        transport=httpx.MockTransport(upstream),
        registry=CollectorRegistry(),
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool"]) | json_values},
    optional={"content": st.text(max_size=30) | json_values, "name": json_values},
)
FIELDS = {
    "model": st.sampled_from(["m", "relay", "agree", "nope"]) | json_values,
    "messages": st.lists(MESSAGE, max_size=3) | json_values,
    "prompt": st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=3) | json_values,
    "n": st.integers(-2, 20) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values})
    | json_values,
    "logprobs": st.booleans() | st.integers(-1, 30) | json_values,
    "top_logprobs": st.integers(-1, 30) | json_values,
    "max_tokens": st.integers(-1, 100) | json_values,
    "temperature": st.floats(-1, 3) | json_values,
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["json_object", "text"])})
    | json_values,
    "tools": json_values,
}
BODIES = st.fixed_dictionaries({}, optional=FIELDS) | json_values

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def assert_no_5xx(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.slow
@FUZZ
@given(body=BODIES, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_completion_endpoints_never_answer_5xx(client: TestClient, body: Any, path: str) -> None:
    assert_no_5xx(client.post(path, content=json.dumps(body).encode()))


@pytest.mark.slow
@FUZZ
@given(raw=st.binary(max_size=200))
def test_any_bytes_get_a_clear_answer(client: TestClient, raw: bytes) -> None:
    assert_no_5xx(client.post("/v1/chat/completions", content=raw))


@pytest.mark.slow
@FUZZ
@given(
    body=st.fixed_dictionaries(
        {},
        optional={
            "id": st.text(max_size=20) | json_values,
            "correct": json_values,
            "choice": st.integers(-2, 5) | json_values,
        },
    )
    | json_values
)
def test_feedback_never_answers_5xx(client: TestClient, body: Any) -> None:
    assert_no_5xx(client.post("/v1/feedback", content=json.dumps(body).encode()))
