"""What a hostile client can send: each gets a clear OpenAI-shaped error, nothing leaks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import auth

CHAT = {"model": "sure", "messages": [{"role": "user", "content": "hi"}]}


def assert_openai_error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


def test_a_trailing_slash_is_not_redirected_to_the_clients_host(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions/",
        json=CHAT,
        headers={**auth(), "host": "evil.example"},
        follow_redirects=False,
    )
    assert "location" not in r.headers
    assert_openai_error(r, 404)


def test_unknown_paths_and_methods_are_openai_shaped(client: TestClient) -> None:
    assert assert_openai_error(client.get("/v1/nothing-here"), 404)["code"] == "not_found"
    error = assert_openai_error(client.get("/v1/chat/completions"), 405)
    assert error["code"] == "method_not_allowed"


def test_a_huge_model_name_is_not_echoed_whole(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "model": "m" * 1_000_000}, headers=auth())
    error = assert_openai_error(r, 404)
    assert len(error["message"]) < 300


def test_stream_options_must_be_an_object(client: TestClient) -> None:
    for bad in ("yes", True, [1]):
        body = {**CHAT, "stream": True, "stream_options": bad}
        r = client.post("/v1/chat/completions", json=body, headers=auth())
        assert assert_openai_error(r, 400)["param"] == "stream_options"


def test_json_too_deep_to_forward_is_a_400_not_a_500(client: TestClient) -> None:
    deep: Any = 1
    for _ in range(300):  # orjson reads this, but writes at most 255 levels
        deep = [deep]
    r = client.post("/v1/chat/completions", json={**CHAT, "metadata": deep}, headers=auth())
    assert_openai_error(r, 400)
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth()).status_code == 200


def test_metrics_are_open_by_default(client: TestClient) -> None:
    assert client.get("/metrics").status_code == 200


def test_metrics_can_require_a_token(make_client: Callable[..., TestClient]) -> None:
    client = make_client(metrics_token="scrape-token-123")
    assert_openai_error(client.get("/metrics"), 401)
    wrong = client.get("/metrics", headers={"authorization": "Bearer nope"})
    assert_openai_error(wrong, 401)
    ok = client.get("/metrics", headers={"authorization": "Bearer scrape-token-123"})
    assert ok.status_code == 200 and "abstain_requests" in ok.text


def test_the_api_key_header_works_like_a_bearer_token(client: TestClient) -> None:
    key = auth()["authorization"].removeprefix("Bearer ")
    r = client.post("/v1/chat/completions", json=CHAT, headers={"api-key": key})
    assert r.status_code == 200, r.text
