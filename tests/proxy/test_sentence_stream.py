"""``streaming: sentence``: each sentence judged as soon as it is complete, then sent.

The upstream is the fake of ``tests/fakes.py`` with a scripted answer (``x_tokens``: the
tokens and their logprobs, one stream chunk per token), so which sentences are sure is
known in advance. Most tests read the whole SSE body through the test client; those about
*when* things happen (a sentence sent before the stream ended, keep-alives, the upstream
closed at a stop, a client that goes away) run the app in a real server in the test's
event loop, with an upstream that stops at gates the test opens. They check the order of
events, never a duration: a gate the proxy never lets the test open fails the test
after a bounded wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.settings import Settings
from tests.fakes import FakeUpstream, stream_chunks

SURE, UNSURE = math.log(0.95), math.log(0.1)
Tokens = list[tuple[str, float]]

#: "Paris is the capital of France." (sure) "It has 37 bridges." (unsure of "37")
PARIS: Tokens = [
    ("Paris", SURE), (" is", SURE), (" the", SURE), (" capital", SURE), (" of", SURE),
    (" France", SURE), (".", SURE), (" It", SURE), (" has", SURE), (" 3", UNSURE), ("7", SURE),
    (" bridges", SURE), (".", SURE),
]  # fmt: skip
FIRST = "Paris is the capital of France."
MARKER = "(not sure about this part)"
#: the index of the chunk (token) that completes the first sentence: " It" follows it
AFTER_FIRST = 7
CHAT = [{"role": "user", "content": "Tell me about Paris."}]

POLICY = """
upstreams:
  fake: {base_url: "http://upstream.test/v1"}
models:
  s: {upstream: fake, streaming: sentence}
  s-stop: {upstream: fake, upstream_model: s, streaming: sentence, stop_on_withheld: true}
  s-hedge: {upstream: fake, upstream_model: s, streaming: sentence, action: hedge}
  s-quick: {upstream: fake, upstream_model: s, streaming: sentence, keepalive_seconds: 0.05}
  s-quick-stop: {upstream: fake, upstream_model: s, streaming: sentence, stop_on_withheld: true}
defaults: {threshold: 0.5, action: abstain, score: min_logprob}
auth: {unknown_keys: default, default_tenant: t}
tenants: {t: {}}
"""


@pytest.fixture
def policy_path(tmp_path: Path) -> Path:
    """Overrides the shared fixture: the ``make_client``/``client`` fixtures use this policy."""
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def parse(body: str) -> list[Any]:
    """The SSE body as events: JSON payloads, ``"[DONE]"``, and ``"keep-alive"`` comments."""
    out: list[Any] = []
    for block in body.split("\n\n"):
        block = block.strip()
        if block == ": keep-alive":
            out.append("keep-alive")
        elif block.startswith("data: "):
            payload = block[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def pieces(evs: list[Any], index: int = 0) -> list[str]:
    """The content deltas of one choice, in order (chat or completions)."""
    out = []
    for e in evs:
        if not isinstance(e, dict):
            continue
        for c in e.get("choices") or ():
            if c["index"] != index:
                continue
            text = c["text"] if "text" in c else (c.get("delta") or {}).get("content")
            if text:
                out.append(text)
    return out


def post(
    client: TestClient, tokens: Tokens, model: str = "s", kind: str = "chat", **extra: Any
) -> tuple[httpx.Response, list[Any]]:
    body: dict[str, Any] = {"model": model, "x_tokens": tokens, "stream": True, **extra}
    if kind == "chat":
        body["messages"] = CHAT
    else:
        body["prompt"] = "Tell me about Paris.\n"
    route = "chat/completions" if kind == "chat" else "completions"
    r = client.post(f"/v1/{route}", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return r, parse(r.text)


def not_streamed(
    client: TestClient, tokens: Tokens, model: str = "s", kind: str = "chat"
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "x_tokens": tokens}
    if kind == "chat":
        body["messages"] = CHAT
    else:
        body["prompt"] = "Tell me about Paris.\n"
    route = "chat/completions" if kind == "chat" else "completions"
    r = client.post(f"/v1/{route}", json=body)
    assert r.status_code == 200, r.text
    choice: dict[str, Any] = r.json()["choices"][0]
    return choice


def verdict_of(evs: list[Any]) -> dict[str, Any]:
    """The verdict chunk: the last event before [DONE]."""
    assert evs[-1] == "[DONE]"
    last = evs[-2]
    assert last["choices"] == []
    verdict: dict[str, Any] = last["abstention"]
    return verdict


def sample(client: TestClient, name: str, labels: dict[str, str]) -> float:
    registry = client.app.state.metrics.registry  # type: ignore[attr-defined]
    return registry.get_sample_value(name, labels) or 0.0


# ------------------------------------------------------------------ what is sent


def test_the_sure_sentence_is_sent_and_the_unsure_one_replaced(client: TestClient) -> None:
    _, evs = post(client, PARIS)
    assert pieces(evs) == [FIRST, " " + MARKER]
    first = next(e for e in evs if isinstance(e, dict) and e["choices"])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": FIRST}
    verdict = verdict_of(evs)
    assert verdict["decision"] == "partial"
    text = "".join(pieces(evs))
    spans = [(p["start"], p["end"], p["decision"]) for p in verdict["sentences"]]
    assert [(text[s:e], d) for s, e, d in spans] == [(FIRST, "answer"), (MARKER, "abstain")]
    # No byte of the withheld sentence reached the client.
    assert "37" not in repr(evs) and "bridges" not in repr(evs)
    finishes = [c["finish_reason"] for e in evs[:-2] if isinstance(e, dict) for c in e["choices"]]
    assert [f for f in finishes if f] == ["stop"]


@pytest.mark.parametrize("kind", ["chat", "completions"])
@pytest.mark.parametrize(
    "tokens",
    [
        PARIS,
        # A run of withheld sentences in one line shares one marker; a new line does not.
        [("One", SURE), (".", SURE), (" Two", UNSURE), (".", SURE), (" Three", UNSURE),
         (".", SURE), ("\n", SURE), ("Four", UNSURE), (".", SURE), (" Five", SURE), (".", SURE)],
        # List lines keep their marker; the white space (and a leading space) is verbatim.
        [(" Facts", SURE), (":", SURE), ("\n\n", SURE), ("-", SURE), (" Lima", SURE), ("\n", SURE),
         ("-", SURE), (" pes", UNSURE), ("eta", SURE), ("\n", SURE), ("-", SURE), (" Andes", SURE),
         ("  ", SURE)],
        # Code passes unjudged, even when its tokens are unsure.
        [("Run", SURE), (" it", SURE), (":", SURE), ("\n```", UNSURE), ("\nx", UNSURE),
         ("\n```", SURE), ("\n", SURE), ("Done", SURE), (".", SURE)],
        # Withheld first: the marker is held back, then sent in front of the kept one.
        [("Two", UNSURE), (".", SURE), (" Paris", SURE), (" is", SURE), (" big", SURE), (".", SURE)],
    ],
    ids=["sure-unsure", "runs", "list", "code", "withheld-first"],
)  # fmt: skip
def test_the_client_gets_what_the_same_answer_gets_without_streaming(
    client: TestClient, tokens: Tokens, kind: str
) -> None:
    _, evs = post(client, tokens, kind=kind)
    whole = not_streamed(client, tokens, kind=kind)
    expected = whole["text"] if kind == "completions" else whole["message"]["content"]
    assert "".join(pieces(evs)) == expected
    assert verdict_of(evs) == whole["abstention"]


def test_hedged_sentences_are_kept_behind_the_hedge(client: TestClient) -> None:
    _, evs = post(client, PARIS, model="s-hedge")
    assert pieces(evs) == [FIRST, " (not sure) It has 37 bridges."]
    assert verdict_of(evs)["decision"] == "hedge"


def test_a_withheld_first_sentence_is_held_until_one_is_kept(client: TestClient) -> None:
    tokens = [("Two", UNSURE), (".", SURE), (" Paris", SURE), (" is", SURE), (" big", SURE),
              (".", SURE), (" Three", UNSURE), (".", SURE)]  # fmt: skip
    _, evs = post(client, tokens)
    # The marker never goes out alone: it waits for the kept sentence and goes with it.
    assert pieces(evs) == [f"{MARKER} Paris is big.", f" {MARKER}"]


def test_a_sentence_past_the_open_limit_is_held_for_the_final_verdict(
    client: TestClient,
) -> None:
    """An upstream that never ends a sentence cannot make every chunk re-read all of it:
    past OPEN_MAX undecided characters the choice holds the rest for the end."""
    from proxy.sentence_choice import OPEN_MAX

    endless = [("a." * 64, SURE)] * (OPEN_MAX // 128 + 2)  # dots, never a space after one
    tokens = [*endless, (" It", SURE), (" is", SURE), (" here", SURE), (".", SURE)]
    _, evs = post(client, tokens)
    # Judged as streamed, " It" would have closed the first sentence and sent it alone.
    assert pieces(evs) == ["".join(t for t, _ in tokens)]
    verdict = verdict_of(evs)
    assert [p["decision"] for p in verdict["sentences"]] == ["answer", "answer"]
    assert verdict == not_streamed(client, tokens)["abstention"]


def test_nothing_kept_is_the_tenants_abstention(client: TestClient) -> None:
    tokens = [("Two", UNSURE), (".", SURE), (" Three", UNSURE), (".", SURE), ("\n", SURE),
              ("Four", UNSURE), (".", SURE)]  # fmt: skip
    _, evs = post(client, tokens)
    assert pieces(evs) == ["I don't know."]
    verdict = verdict_of(evs)
    assert verdict["decision"] == "abstain"
    assert [(p["start"], p["end"]) for p in verdict["sentences"]] == [(None, None)] * 3
    assert verdict == not_streamed(client, tokens)["abstention"]


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_chunk_boundaries_inside_words_and_characters_leave_the_text_exact(
    client: TestClient, kind: str
) -> None:
    # Tokens cut inside words ("Zü|rich", "L|ima") and multi-byte text; the upstream's
    # bytes arrive one at a time, so every UTF-8 character is cut across reads too.
    tokens = [("Zü", SURE), ("rich", SURE), (" liegt", SURE), (" am", SURE), (" Zürichsee", SURE),
              (".", SURE), (" L", SURE), ("ima", SURE), (" est", SURE), (" là", SURE), (" 🙂", SURE),
              ("!", SURE), ("\n", SURE), ("東京", SURE), ("は", SURE), ("首都", SURE), ("。", SURE),
              ("Ça", SURE), (" va", SURE), ("…", SURE)]  # fmt: skip
    _, evs = post(client, tokens, kind=kind, x_byte_chunks=1)
    text = "".join(t for t, _ in tokens)
    assert "".join(pieces(evs)) == text
    verdict = verdict_of(evs)
    assert [text[p["start"] : p["end"]] for p in verdict["sentences"]] == [
        "Zürich liegt am Zürichsee.", "Lima est là 🙂!", "東京は首都。", "Ça va…"
    ]  # fmt: skip
    # Sentences went out one by one as they were completed, not all at the end.
    assert len(pieces(evs)) >= 3


def test_n_choices_each_have_their_own_sentences(client: TestClient) -> None:
    second = [("Lyon", SURE), (" is", SURE), (" far", UNSURE), (".", SURE), (" Nice", SURE),
              (" is", SURE), (" warm", SURE), (".", SURE)]  # fmt: skip
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "s",
            "messages": CHAT,
            "stream": True,
            "n": 2,
            "x_tokens_n": [PARIS, second],
        },
    )
    evs = parse(r.text)
    assert "".join(pieces(evs, 0)) == f"{FIRST} {MARKER}"
    assert "".join(pieces(evs, 1)) == f"{MARKER} Nice is warm."
    verdicts = evs[-2]["abstentions"]
    assert [v["decision"] for v in verdicts] == ["partial", "partial"]
    assert [[p["decision"] for p in v["sentences"]] for v in verdicts] == [
        ["answer", "abstain"], ["abstain", "answer"]
    ]  # fmt: skip
    # Each choice's role is sent once, in its first delta.
    roles = [c["index"] for e in evs if isinstance(e, dict) for c in e["choices"]
             if "role" in c.get("delta", {})]  # fmt: skip
    assert sorted(roles) == [0, 1]


# ----------------------------------------------------------------------- logprobs


def test_client_logprobs_carry_only_the_tokens_sent_as_written(client: TestClient) -> None:
    _, evs = post(client, PARIS, logprobs=True, top_logprobs=2)
    sent = [
        t for e in evs if isinstance(e, dict) for c in e["choices"]
        for t in ((c.get("logprobs") or {}).get("content") or [])
    ]  # fmt: skip
    assert [t["token"] for t in sent] == [t for t, _ in PARIS[:AFTER_FIRST]]
    assert all(len(t["top_logprobs"]) == 2 for t in sent)  # the client's k, not the proxy's


def test_completions_logprobs_offsets_point_into_the_text_the_client_got(
    client: TestClient,
) -> None:
    tokens = [("Two", UNSURE), (".", SURE), (" Paris", SURE), (" is", SURE), (" big", SURE),
              (".", SURE), (" Three", UNSURE), (".", SURE)]  # fmt: skip
    _, evs = post(client, tokens, kind="completions", logprobs=1)
    text = "".join(pieces(evs))
    got: list[tuple[str, int]] = []
    for e in evs:
        for c in (e.get("choices") or []) if isinstance(e, dict) else []:
            lp = c.get("logprobs")
            if lp:
                got += list(zip(lp["tokens"], lp["text_offset"], strict=True))
    assert [t for t, _ in got] == [" Paris", " is", " big", "."]
    assert all(text[at : at + len(t)] == t for t, at in got)


def test_no_logprobs_unless_the_client_asked(client: TestClient) -> None:
    _, evs = post(client, PARIS)
    assert all(c.get("logprobs") is None for e in evs if isinstance(e, dict) for c in e["choices"])


# ---------------------------------------------------------- the end of the stream


def test_usage_goes_in_the_verdict_chunk_when_asked(client: TestClient) -> None:
    _, evs = post(client, PARIS, stream_options={"include_usage": True})
    assert evs[-2]["usage"]["completion_tokens"] == len(PARIS)
    _, evs = post(client, PARIS)
    assert "usage" not in evs[-2]


def test_the_verdicts_are_recorded_once(client: TestClient) -> None:
    post(client, PARIS)
    labels = {"tenant": "t", "model": "s"}
    assert sample(client, "abstain_choices_total", {**labels, "decision": "partial",
                                                    "calibrated": "false"}) == 1  # fmt: skip
    assert sample(client, "abstain_sentences_total", {**labels, "decision": "answer"}) == 1
    assert sample(client, "abstain_sentences_total", {**labels, "decision": "abstain"}) == 1
    assert sample(client, "abstain_requests_total", {**labels, "route": "chat",
                                                     "decision": "partial", "status": "200"}) == 1  # fmt: skip


def test_stop_on_withheld_ends_the_answer_there_and_counts_the_stop(client: TestClient) -> None:
    tokens = [*PARIS, (" Paris", SURE), (" is", SURE), (" old", SURE), (".", SURE)]
    _, evs = post(client, tokens, model="s-stop", max_tokens=50,
                  stream_options={"include_usage": True})  # fmt: skip
    assert "".join(pieces(evs)) == f"{FIRST} {MARKER}"
    verdict = verdict_of(evs)
    # Generated when the stop came: up to " Paris", which completed the withheld sentence.
    generated = len(PARIS) + 1
    assert verdict["generation_stopped"] == {"completion_tokens": generated}
    assert evs[-2]["usage"]["completion_tokens"] == generated
    labels = {"tenant": "t", "model": "s-stop"}
    assert sample(client, "abstain_generation_stops_total", labels) == 1
    assert sample(client, "abstain_generation_stop_tokens_total", labels) == generated
    assert sample(client, "abstain_generation_tokens_saved_bound_total", labels) == 50 - generated


def test_an_upstream_error_mid_stream_is_an_error_event_then_done(client: TestClient) -> None:
    _, evs = post(client, PARIS, x_error_after=AFTER_FIRST + 1)
    assert pieces(evs) == [FIRST]  # judged and sent before the error
    assert evs[-1] == "[DONE]"
    assert evs[-2]["error"] == {"message": "The upstream model failed mid-stream.",
                                "type": "upstream_error", "param": None, "code": "upstream_error"}  # fmt: skip
    assert not any(isinstance(e, dict) and "abstention" in e for e in evs)
    labels = {"tenant": "t", "model": "s", "route": "chat", "decision": "none", "status": "502"}
    assert sample(client, "abstain_requests_total", labels) == 1


# ------------------------------------------------------------ in a real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatedBody(httpx.AsyncByteStream):
    """A scripted SSE stream that stops before some chunks until the test opens their gate;
    it notes how many chunks went out and whether the proxy closed it."""

    def __init__(self, chunks: list[dict[str, Any]], gates: dict[int, asyncio.Event]) -> None:
        self.chunks = chunks
        self.gates = gates
        self.sent = 0
        self.closed = asyncio.Event()
        self.sent_at_close: int | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i, chunk in enumerate(self.chunks):
            if i in self.gates:
                await self.gates[i].wait()
            self.sent = i + 1
            yield b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        if self.sent_at_close is None:
            self.sent_at_close = self.sent
        self.closed.set()


class GatedUpstream:
    """The mock transport's handler: every stream request gets a :class:`GatedBody`."""

    def __init__(self, gates: dict[int, asyncio.Event]) -> None:
        self.gates = gates
        self.bodies: list[GatedBody] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        kind = "chat" if request.url.path.endswith("/chat/completions") else "completions"
        stream = GatedBody(stream_chunks(kind, body), self.gates)
        self.bodies.append(stream)
        return httpx.Response(200, stream=stream, headers={"content-type": "text/event-stream"})


@contextlib.asynccontextmanager
async def serving(policy: Path, handler: Callable[..., Any]) -> AsyncIterator[tuple[str, Any]]:
    """The app in a uvicorn server in this event loop: (base URL, app)."""
    app = create_app(
        Settings(policy=policy, handle_signals=False, reload_interval_seconds=0),
        transport=httpx.MockTransport(handler),
        registry=CollectorRegistry(),
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def events(response: httpx.Response) -> AsyncIterator[Any]:
    """The events of a streaming response as they arrive."""
    async for line in response.aiter_lines():
        if line == ": keep-alive":
            yield "keep-alive"
        elif line.startswith("data: "):
            payload = line[len("data: ") :]
            yield payload if payload == "[DONE]" else json.loads(payload)


def content_of(event: Any) -> str:
    if not isinstance(event, dict):
        return ""
    return "".join((c.get("delta") or {}).get("content") or "" for c in event.get("choices", []))


#: How long a test waits for something the proxy must do before it fails (not a timing
#: claim: without the behaviour tested, the wait would never end).
BOUND = 10


async def test_the_first_sentence_is_sent_while_the_upstream_still_holds_the_rest(
    policy_path: Path,
) -> None:
    gate = asyncio.Event()
    upstream = GatedUpstream({AFTER_FIRST + 1: gate})
    async with serving(policy_path, upstream) as (url, _app), httpx.AsyncClient() as http:
        body = {"model": "s", "messages": CHAT, "stream": True, "x_tokens": PARIS}
        order: list[str] = []
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            stream = events(r).__aiter__()

            async def until_content() -> str:
                async for event in stream:
                    if text := content_of(event):
                        return text
                return ""

            first = await asyncio.wait_for(until_content(), BOUND)
            # The upstream is held at the gate: the rest of the answer does not exist yet.
            order.append(f"client got {first!r} with {upstream.bodies[0].sent} chunks sent")
            gate.set()
            rest = [e async for e in stream]
        assert first == FIRST
        assert order == [f"client got {FIRST!r} with {AFTER_FIRST + 1} chunks sent"]
        assert "".join(content_of(e) for e in rest) == " " + MARKER
        assert rest[-1] == "[DONE]" and rest[-2]["abstention"]["decision"] == "partial"


async def test_keepalives_flow_while_the_upstream_pauses(policy_path: Path) -> None:
    # Gates before the first chunk and after the first sentence: the test opens each
    # only once a keep-alive has come through while waiting on it.
    gates = {0: asyncio.Event(), AFTER_FIRST + 1: asyncio.Event()}
    upstream = GatedUpstream(gates)
    async with serving(policy_path, upstream) as (url, _app), httpx.AsyncClient() as http:
        body = {"model": "s-quick", "messages": CHAT, "stream": True, "x_tokens": PARIS}
        seen: list[str] = []

        async def read() -> None:
            async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                async for event in events(r):
                    if event == "keep-alive":
                        if not seen or seen[-1] != "keep-alive":
                            seen.append("keep-alive")
                        for gate in gates.values():
                            if not gate.is_set():
                                gate.set()  # one gate per run of keep-alives
                                break
                    elif text := content_of(event):
                        seen.append(text)
                    elif event == "[DONE]":
                        seen.append("[DONE]")

        await asyncio.wait_for(read(), BOUND)
    assert seen == ["keep-alive", FIRST, "keep-alive", " " + MARKER, "[DONE]"]


async def test_stop_on_withheld_closes_the_upstream_before_its_end(policy_path: Path) -> None:
    tokens = [*PARIS, (" Paris", SURE), (" is", SURE), (" old", SURE), (".", SURE)]
    never = asyncio.Event()  # the rest of the answer is never released
    upstream = GatedUpstream({len(PARIS) + 2: never})
    async with serving(policy_path, upstream) as (url, app), httpx.AsyncClient() as http:
        body = {"model": "s-quick-stop", "messages": CHAT, "stream": True, "x_tokens": tokens}
        r = await asyncio.wait_for(http.post(f"{url}/v1/chat/completions", json=body), BOUND)
        evs = parse(r.text)
        gated = upstream.bodies[0]
        await asyncio.wait_for(gated.closed.wait(), BOUND)
        assert gated.sent_at_close == len(PARIS) + 1  # closed mid-answer, at the gate
        labels = {"tenant": "t", "model": "s-quick-stop"}
        registry = app.state.metrics.registry
        assert registry.get_sample_value("abstain_generation_stops_total", labels) == 1
    assert "".join(content_of(e) for e in evs) == f"{FIRST} {MARKER}"
    assert evs[-1] == "[DONE]"


async def test_a_client_that_goes_away_cancels_the_upstream(policy_path: Path) -> None:
    never = asyncio.Event()
    upstream = GatedUpstream({AFTER_FIRST + 1: never})
    async with serving(policy_path, upstream) as (url, _app):

        async def read_first_sentence_and_leave() -> None:
            async with httpx.AsyncClient() as http:
                body = {"model": "s", "messages": CHAT, "stream": True, "x_tokens": PARIS}
                async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    async for event in events(r):
                        if content_of(event):
                            break  # the client goes away after the first sentence

        await asyncio.wait_for(read_first_sentence_and_leave(), BOUND)
        await asyncio.wait_for(upstream.bodies[0].closed.wait(), BOUND)
        assert upstream.bodies[0].sent_at_close == AFTER_FIRST + 1


@pytest.mark.parametrize("kind", ["chat", "completions"])
async def test_the_openai_sdk_reads_the_stream_unchanged(policy_path: Path, kind: str) -> None:
    async with serving(policy_path, FakeUpstream()) as (url, _app):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        extra = {"x_tokens": PARIS}
        if kind == "chat":
            chat = await client.chat.completions.create(
                model="s", messages=CHAT, stream=True, extra_body=extra,  # type: ignore[arg-type]
                stream_options={"include_usage": True},
            )  # fmt: skip
            chunks = [c async for c in chat]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            roles = [
                c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role
            ]
            assert roles == ["assistant"]
        else:
            completion = await client.completions.create(
                model="s", prompt="Tell me about Paris.\n", stream=True, extra_body=extra,
                stream_options={"include_usage": True},
            )  # fmt: skip
            chunks = [c async for c in completion]
            text = "".join(c.choices[0].text for c in chunks if c.choices)
        await client.close()
    assert text == f"{FIRST} {MARKER}"
    last = chunks[-1]
    assert last.model_extra is not None
    assert last.model_extra["abstention"]["decision"] == "partial"
    assert last.usage is not None and last.usage.completion_tokens == len(PARIS)
