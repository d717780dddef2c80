"""The sampler: rounds, ``n`` or concurrent requests, early stopping, failures, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest

from proxy.confidence.embedding import EmbeddingMatcher
from proxy.confidence.stopping import StoppingRule
from proxy.errors import UpstreamError
from proxy.protocol import Kind
from proxy.sampling.draw import SamplingParams, draw_samples, sample_body

COMPLETION = {"model": "m", "prompt": "Q: capital of France?\nA:", "temperature": 0}
T50 = StoppingRule(threshold=0.5, risk=0.05)


class SampleUpstream:
    """A fake upstream whose samples agree or split on command.

    ``answers`` is cycled through, one entry per returned choice. Calls listed in
    ``fail`` raise an upstream error, calls in ``hang`` never answer, and every call
    first sleeps ``delay`` seconds. It records bodies, concurrency and cancellations.
    """

    name = "fake"

    def __init__(
        self,
        answers: Iterable[str | None],
        *,
        supports_n: bool = True,
        honour_n: bool = True,
        fail: Iterable[int] = (),
        hang: Iterable[int] = (),
        delay: float = 0.0,
    ) -> None:
        self.answers = list(answers)
        self.supports_n = supports_n
        self.honour_n = honour_n
        self.fail, self.hang, self.delay = set(fail), set(hang), delay
        self.bodies: list[dict[str, Any]] = []
        self.served = 0
        self.in_flight = self.max_in_flight = self.cancelled = 0

    def _choice(self, kind: Kind) -> dict[str, Any]:
        text = self.answers[self.served % len(self.answers)]
        self.served += 1
        if kind == "chat":
            return {"index": 0, "message": {"role": "assistant", "content": text}}
        return {"index": 0, "text": text}

    async def complete(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        call = len(self.bodies)
        self.bodies.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(3600 if call in self.hang else self.delay)
            if call in self.fail:
                raise UpstreamError("boom", kind="status_500")
            n = int(body.get("n", 1)) if self.honour_n else 1
            return {
                "choices": [self._choice(kind) for _ in range(n)],
                "usage": {"completion_tokens": 3 * n},
            }
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1

    async def stream(self, kind: Kind, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        raise NotImplementedError
        yield {}


async def test_unanimous_samples_stop_early_with_n() -> None:
    upstream = SampleUpstream(["Paris"])
    params = SamplingParams(samples=8, round_size=2, min_samples=2, temperature=0.7)
    result = await draw_samples(
        upstream, "completions", COMPLETION, params, reference="Paris", stopping=T50
    )
    assert result.early_stopped and result.last_check is not None
    assert result.last_check.reason == "above"
    assert result.used == 4 and result.samples == ("Paris",) * 4
    assert result.upstream_requests == 2 and [b["n"] for b in upstream.bodies] == [2, 2]
    assert result.completion_tokens == 12
    assert all(b["temperature"] == 0.7 for b in upstream.bodies)
    assert result.ok and result.failures == 0


async def test_unanimous_samples_stop_early_without_n() -> None:
    upstream = SampleUpstream(["Paris"], supports_n=False)
    params = SamplingParams(samples=8, round_size=2, min_samples=2)
    result = await draw_samples(
        upstream, "completions", COMPLETION, params, reference="Paris", stopping=T50
    )
    assert result.early_stopped and result.used == 4
    assert result.upstream_requests == 4
    assert all("n" not in b for b in upstream.bodies)


async def test_disagreeing_samples_stop_early_below() -> None:
    upstream = SampleUpstream(["Lyon", "Nice"])
    params = SamplingParams(samples=8, round_size=2)
    result = await draw_samples(
        upstream, "completions", COMPLETION, params, reference="Paris", stopping=T50
    )
    # 0 of 2 agree: P(at least 5 of the remaining 6 agree | Beta(1, 3)) = 1/21 < 0.05.
    assert result.early_stopped and result.used == 2
    assert result.last_check is not None and result.last_check.reason == "below"
    assert result.last_check.p_above == pytest.approx(1 / 21)


async def test_split_samples_near_the_threshold_use_the_whole_budget() -> None:
    upstream = SampleUpstream(["Paris", "Lyon"])
    params = SamplingParams(samples=8, round_size=2)
    result = await draw_samples(
        upstream, "completions", COMPLETION, params, reference="Paris", stopping=T50
    )
    assert not result.early_stopped
    assert result.used == 8 and result.samples.count("Paris") == 4


async def test_without_a_stopping_rule_the_budget_is_drawn() -> None:
    upstream = SampleUpstream(["Paris"])
    result = await draw_samples(upstream, "completions", COMPLETION, SamplingParams(samples=5))
    assert result.used == 5 and not result.early_stopped and result.last_check is None


async def test_the_majority_stands_in_for_a_missing_reference() -> None:
    upstream = SampleUpstream(["Paris"])
    params = SamplingParams(samples=8, round_size=2)
    result = await draw_samples(upstream, "completions", COMPLETION, params, stopping=T50)
    assert result.early_stopped and result.used == 4


async def test_concurrency_is_bounded_by_the_semaphore() -> None:
    upstream = SampleUpstream(["Paris"], supports_n=False, delay=0.01)
    params = SamplingParams(samples=6, round_size=6, max_concurrency=2)
    result = await draw_samples(upstream, "completions", COMPLETION, params)
    assert result.used == 6
    assert upstream.max_in_flight == 2


async def test_failed_samples_are_tolerated_above_the_minimum() -> None:
    upstream = SampleUpstream(["Paris"], supports_n=False, fail=[0])
    params = SamplingParams(samples=4, round_size=4, min_samples=2)
    result = await draw_samples(upstream, "completions", COMPLETION, params)
    assert result.used == 3 and result.failures == 1 and result.ok
    assert result.errors == ("status_500",)
    assert result.upstream_requests == 4


async def test_too_few_samples_report_failure() -> None:
    upstream = SampleUpstream(["Paris"], supports_n=False, fail=range(100))
    params = SamplingParams(samples=8, round_size=2, min_samples=2)
    result = await draw_samples(
        upstream, "completions", COMPLETION, params, reference="Paris", stopping=T50
    )
    assert not result.ok and result.used == 0
    # A wholly failed first round ends sampling instead of spending the budget.
    assert result.upstream_requests == 2 and result.failures == 2


async def test_timed_out_samples_are_cancelled_and_counted() -> None:
    upstream = SampleUpstream(["Paris"], supports_n=False, hang=[1])
    params = SamplingParams(samples=3, round_size=3, min_samples=2, timeout=0.2)
    result = await draw_samples(upstream, "completions", COMPLETION, params)
    assert result.used == 2 and result.ok
    assert (result.failures, result.timeouts) == (1, 1)
    assert upstream.cancelled == 1 and upstream.in_flight == 0


async def test_an_upstream_ignoring_n_is_detected() -> None:
    upstream = SampleUpstream(["Paris"], honour_n=False)
    params = SamplingParams(samples=4, round_size=2)
    result = await draw_samples(upstream, "completions", COMPLETION, params)
    assert result.n_ignored and result.used == 4 and result.failures == 0
    assert upstream.bodies[0]["n"] == 2
    assert all("n" not in b for b in upstream.bodies[1:])


async def test_cancellation_cancels_in_flight_samples() -> None:
    upstream = SampleUpstream(["Paris"], supports_n=False, hang=range(100))
    params = SamplingParams(samples=8, round_size=4, max_concurrency=4, timeout=None)
    task = asyncio.create_task(draw_samples(upstream, "completions", COMPLETION, params))
    for _ in range(100):
        if upstream.in_flight == 4:
            break
        await asyncio.sleep(0)
    assert upstream.in_flight == 4
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert upstream.cancelled == 4 and upstream.in_flight == 0


async def test_reference_future_is_awaited_and_never_cancelled() -> None:
    loop = asyncio.get_running_loop()
    reference: asyncio.Future[str | None] = loop.create_future()
    upstream = SampleUpstream(["Paris"])
    params = SamplingParams(samples=8, round_size=2)
    task = asyncio.create_task(
        draw_samples(upstream, "completions", COMPLETION, params, reference=reference, stopping=T50)
    )
    for _ in range(50):  # let the sampler run until it blocks on the reference
        await asyncio.sleep(0)
    assert upstream.served == 2 and not task.done()  # the first check waits for it
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not reference.cancelled()

    reference.set_result("Lyon")
    result = await draw_samples(
        SampleUpstream(["Paris"]),
        "completions",
        COMPLETION,
        params,
        reference=reference,
        stopping=T50,
    )
    assert result.last_check is not None and result.last_check.reason == "below"


async def test_stopping_rule_may_arrive_with_the_main_answer() -> None:
    loop = asyncio.get_running_loop()
    params = SamplingParams(samples=8, round_size=2)
    for rule, used in ((T50, 4), (None, 8)):
        stopping: asyncio.Future[StoppingRule | None] = loop.create_future()
        loop.call_soon(stopping.set_result, rule)
        result = await draw_samples(
            SampleUpstream(["Paris"]),
            "completions",
            COMPLETION,
            params,
            reference="Paris",
            stopping=stopping,
        )
        assert result.used == used and result.early_stopped == (rule is not None)


async def test_chat_samples_and_choices_without_text() -> None:
    upstream = SampleUpstream(["Paris", None])
    params = SamplingParams(samples=4, round_size=4)
    result = await draw_samples(upstream, "chat", {"model": "m", "messages": []}, params)
    assert result.samples == ("Paris", "Paris")
    assert result.failures == 2 and result.errors == ("no_text",)


async def test_model_matchers_run_off_the_event_loop() -> None:
    calls: list[str] = []

    def encode(texts: list[str]) -> list[list[float]]:
        calls.extend(texts)
        return [[1.0, 0.0] for _ in texts]

    upstream = SampleUpstream(["Paris, France"])
    params = SamplingParams(samples=8, round_size=2)
    result = await draw_samples(
        upstream,
        "completions",
        COMPLETION,
        params,
        reference="Paris",
        matcher=EmbeddingMatcher(encode),
        stopping=T50,
    )
    assert result.early_stopped and result.used == 4
    assert calls == ["Paris", "Paris, France"]  # each distinct text encoded once


def test_sample_body_drops_what_samples_must_not_inherit() -> None:
    body = {
        **COMPLETION,
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": 1,
        "logprobs": 5,
        "echo": True,
        "best_of": 3,
        "n": 2,
        "max_tokens": 100,
        "stop": ["\n"],
    }
    out = sample_body("completions", body, SamplingParams(temperature=0.9, max_tokens=16))
    assert out == {**COMPLETION, "temperature": 0.9, "max_tokens": 16, "stop": ["\n"]}
    assert body["seed"] == 1 and body["temperature"] == 0  # the caller's body is untouched
    chat = {"model": "m", "messages": [], "max_completion_tokens": 50, "top_logprobs": 3}
    out = sample_body("chat", chat, SamplingParams(max_tokens=16))
    assert out["max_completion_tokens"] == 16 and "max_tokens" not in out
    assert "top_logprobs" not in out
