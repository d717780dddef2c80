"""Every error status, in OpenAI's error shape, with nothing secret in it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from starlette.testclient import TestClient

from tests.conftest import auth

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def assert_openai_error(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code
    assert "Traceback" not in r.text
    assert "sk-upstream-secret" not in r.text
    assert "upstream.test" not in r.text
    return err


def test_bad_json_is_400(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", content=b"{not json", headers=auth())
    assert_openai_error(r, 400, "invalid_request")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": CHAT["messages"]}, "model"),
        ({"model": "sure"}, "messages"),
        ({"model": "sure", "messages": "hi"}, "messages"),
        ({"model": "sure", **CHAT, "n": 0}, "n"),
        ({"model": "sure", **CHAT, "stream": "yes"}, "stream"),
        ({"model": "sure", **CHAT, "logprobs": 3}, "logprobs"),
    ],
)
def test_schema_errors_are_400_and_name_the_param(
    client: TestClient, body: dict, param: str
) -> None:
    r = client.post("/v1/chat/completions", json=body, headers=auth())
    assert assert_openai_error(r, 400)["param"] == param


def test_completions_need_a_prompt(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "sure"}, headers=auth())
    assert assert_openai_error(r, 400)["param"] == "prompt"


def test_json_array_body_is_400(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", content=b"[1, 2]", headers=auth())
    assert_openai_error(r, 400)


def test_unknown_key_is_401(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={"model": "sure", **CHAT},
        headers={"authorization": "Bearer nope"},
    )
    assert_openai_error(r, 401, "invalid_api_key")
    assert "nope" not in r.text


def test_missing_key_is_401(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": "sure", **CHAT})
    assert_openai_error(r, 401)


def test_unknown_model_is_404(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": "gpt-9", **CHAT}, headers=auth())
    assert assert_openai_error(r, 404, "model_not_found")["param"] == "model"


def test_body_over_the_limit_is_413_before_parsing(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_body_bytes=2048)
    big = b"{" + b" " * 4096  # not even valid JSON: the size check must come first
    r = client.post("/v1/chat/completions", content=big, headers=auth())
    assert_openai_error(r, 413, "request_too_large")


def test_chunked_body_over_the_limit_is_413(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_body_bytes=2048)

    def chunks():
        for _ in range(10):
            yield b" " * 512

    r = client.post("/v1/chat/completions", content=chunks(), headers=auth())
    assert_openai_error(r, 413)


def test_upstream_failure_is_502(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": "error-500", **CHAT}, headers=auth())
    assert_openai_error(r, 502, "upstream_error")


@pytest.mark.parametrize("model", ["garbage", "nochoices"])
def test_malformed_upstream_answer_is_502(client: TestClient, model: str) -> None:
    r = client.post("/v1/chat/completions", json={"model": model, **CHAT}, headers=auth())
    assert_openai_error(r, 502)


def test_upstream_timeout_is_504(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": "slow", **CHAT}, headers=auth())
    assert_openai_error(r, 504, "upstream_timeout")


def test_upstream_rejection_keeps_its_400(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": "refuse-400", **CHAT}, headers=auth())
    err = assert_openai_error(r, 400)
    assert "context too long" in err["message"]


def test_proxy_keeps_serving_after_errors(client: TestClient) -> None:
    for model in ("error-500", "garbage", "gpt-9"):
        client.post("/v1/chat/completions", json={"model": model, **CHAT}, headers=auth())
    r = client.post("/v1/chat/completions", json={"model": "sure", **CHAT}, headers=auth())
    assert r.status_code == 200


def test_an_upstream_without_its_key_fails_alone(make_client, policy_path) -> None:
    text = policy_path.read_text().replace(
        "models:\n",
        "  keyless:\n    base_url: http://other.test/v1\n    api_key_env: NOT_SET_ANYWHERE\n"
        "models:\n  needs-key: {upstream: keyless}\n",
        1,
    )
    policy_path.write_text(text)
    client = make_client()  # starts although a key is missing
    assert client.get("/readyz").status_code == 200
    r = client.post("/v1/chat/completions", json={"model": "needs-key", **CHAT}, headers=auth())
    err = assert_openai_error(r, 502)
    assert "NOT_SET_ANYWHERE" in err["message"]
    ok = client.post("/v1/chat/completions", json={"model": "sure", **CHAT}, headers=auth())
    assert ok.status_code == 200
