"""The real proxy process, spoken to with the official ``openai`` SDK.

A fake OpenAI-compatible server plays the upstream (``tests/fake_server.py``); the proxy
runs as ``abstain serve`` in its own process, exactly as a user starts it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.procs import fake_upstream, free_port, proxy
from tests.fakes import ANSWER, TOKENS

pytestmark = pytest.mark.e2e

KEY = "e2e-tenant-key"
STREAM_KEY = "e2e-stream-key"


def policy_text(upstream: str, threshold: float = 0.5) -> str:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    return f"""
upstreams:
  fake: {{base_url: "{upstream}/v1"}}
  dead: {{base_url: "{dead}"}}
  via-litellm:
    litellm_model: openai
    api_key_env: E2E_LITELLM_KEY
    litellm_params: {{api_base: "{upstream}/v1"}}
models:
  sure: {{upstream: fake}}
  unsure: {{upstream: fake}}
  gone: {{upstream: dead, upstream_model: sure}}
  sure-litellm: {{upstream: via-litellm, upstream_model: sure}}
  unsure-litellm: {{upstream: via-litellm, upstream_model: unsure}}
defaults: {{threshold: {threshold}, action: abstain}}
tenants:
  app:
    api_key_sha256: ["{hashlib.sha256(KEY.encode()).hexdigest()}"]
  streamer:
    api_key_sha256: ["{hashlib.sha256(STREAM_KEY.encode()).hexdigest()}"]
    streaming: passthrough
"""


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with fake_upstream() as url:
        yield url


@pytest.fixture(scope="module")
def server(
    upstream: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, int]]:
    path = tmp_path_factory.mktemp("e2e") / "policy.yaml"
    path.write_text(policy_text(upstream))
    # No file polling: reloads in these tests must come from SIGHUP alone.
    env = {"E2E_LITELLM_KEY": "sk-litellm-test", "ABSTAIN_RELOAD_INTERVAL_SECONDS": "0"}
    with proxy(path, env=env) as (url, proc):
        yield url, path, proc.pid


@pytest.fixture
def client(server: tuple[str, Path, int]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def test_sync_chat_answer_and_abstention(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Capital of France?"}]
    sure = client.chat.completions.create(model="sure", messages=msgs)
    assert sure.choices[0].message.content == ANSWER
    assert sure.model_extra["abstention"]["decision"] == "answer"
    unsure = client.chat.completions.create(model="unsure", messages=msgs)
    assert unsure.choices[0].message.content == "I don't know."
    assert unsure.model_extra["abstention"]["decision"] == "abstain"


def test_verdict_headers_reach_the_sdk(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(
        model="unsure", prompt="Q: x\nA:", max_tokens=4
    )
    assert raw.headers["x-abstention-decision"] == "abstain"
    assert 0 <= float(raw.headers["x-abstention-confidence"]) < 0.5
    assert raw.parse().choices[0].text == "I don't know."


def test_sync_streaming_buffer_mode(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="unsure", messages=[{"role": "user", "content": "q"}], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "I don't know."
    assert chunks[-1].model_extra["abstention"]["decision"] == "abstain"


async def test_async_client_streaming_passthrough(server: tuple[str, Path, int]) -> None:
    client = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key=STREAM_KEY, max_retries=0)
    stream = await client.completions.create(model="unsure", prompt="Q: x\nA:", stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "".join(TOKENS)
    assert chunks[-1].model_extra["abstention"]["decision"] == "annotate"
    await client.close()


async def test_async_client_non_streaming(server: tuple[str, Path, int]) -> None:
    client = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)
    r = await client.chat.completions.create(
        model="sure", messages=[{"role": "user", "content": "q"}], n=2
    )
    assert [c.model_extra["abstention"]["decision"] for c in r.choices] == ["answer", "answer"]
    await client.close()


def test_litellm_routed_upstream(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Capital of France?"}]
    sure = client.chat.completions.create(model="sure-litellm", messages=msgs)
    assert sure.choices[0].message.content == ANSWER
    assert sure.model_extra["abstention"]["decision"] == "answer"
    unsure = client.chat.completions.create(model="unsure-litellm", messages=msgs)
    assert unsure.model_extra["abstention"]["decision"] == "abstain"


def test_litellm_routed_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="sure-litellm", messages=[{"role": "user", "content": "q"}], stream=True
    )
    chunks = list(stream)
    assert chunks[-1].model_extra["abstention"]["decision"] == "answer"


def test_sdk_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "q"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="sure", messages=[])
    bad = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_dead_upstream_is_502_not_504(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="gone", messages=[{"role": "user", "content": "q"}])
    assert err.value.status_code == 502


def test_models_list(client: openai.OpenAI) -> None:
    assert {m.id for m in client.models.list()} >= {"sure", "unsure", "sure-litellm"}


def test_client_disconnect_cancels_the_upstream_stream(
    server: tuple[str, Path, int], upstream: str
) -> None:
    before = httpx.get(f"{upstream}/stats").json()["streams_cut"]
    with httpx.stream(
        "POST",
        server[0] + "/v1/chat/completions",
        headers={"authorization": f"Bearer {STREAM_KEY}"},
        json={
            "model": "sure",
            "messages": [{"role": "user", "content": "q"}],
            "stream": True,
            "x_token_delay": 0.5,
        },
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # first token arrived; hang up
    deadline = time.monotonic() + 10
    while (
        httpx.get(f"{upstream}/stats").json()["streams_cut"] == before
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert httpx.get(f"{upstream}/stats").json()["streams_cut"] == before + 1


def test_sighup_reloads_the_policy(
    server: tuple[str, Path, int], client: openai.OpenAI, upstream: str
) -> None:
    url, path, pid = server
    path.write_text(policy_text(upstream, threshold=0.8))
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    threshold = None
    while time.monotonic() < deadline:
        r = client.chat.completions.create(
            model="sure", messages=[{"role": "user", "content": "q"}]
        )
        threshold = r.model_extra["abstention"]["threshold"]
        if threshold == 0.8:
            break
        time.sleep(0.1)
    assert threshold == 0.8
    # A broken file is refused; the proxy keeps serving the last good policy.
    path.write_text("upstreams: [")
    os.kill(pid, signal.SIGHUP)
    failure = 'abstain_policy_reloads_total{result="failure"} 1.0'
    deadline = time.monotonic() + 10
    while failure not in httpx.get(url + "/metrics").text and time.monotonic() < deadline:
        time.sleep(0.1)
    assert failure in httpx.get(url + "/metrics").text
    r = client.chat.completions.create(model="sure", messages=[{"role": "user", "content": "q"}])
    assert r.model_extra["abstention"]["threshold"] == 0.8
