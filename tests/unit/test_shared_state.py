"""The shared-state pieces with fakes: the in-memory feedback memory, the Redis guard
(deadline, back-off, counting, rate-limited logging, recovery) and the limiter fallback."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.limits import Refusal
from proxy.metrics import Metrics
from proxy.policy.loading import parse_policy
from proxy.policy.rules import Rule
from proxy.settings import Settings
from proxy.shared_state import InMemoryFeedbackMemory, SharedStateUnavailable
from proxy.shared_state.redis_limiter import RedisLimiter
from proxy.shared_state.redis_memory import RedisFeedbackMemory
from proxy.shared_state.redis_state import RedisState


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- the in-memory feedback memory --------------------------------------------------------


def test_claims_are_new_then_duplicate_or_conflict() -> None:
    memory = InMemoryFeedbackMemory(10)
    memory.remember("r", "t", "m", [0.9, 0.2])
    assert run(memory.claim_feedback("t", "r", 0, True)) == "new"
    assert run(memory.claim_feedback("t", "r", 0, True)) == "duplicate"
    assert run(memory.claim_feedback("t", "r", 0, False)) == "conflict"
    assert run(memory.claim_feedback("t", "r", 1, False)) == "new"
    assert run(memory.claim_feedback("other", "r", 1, False)) == "unknown"
    assert run(memory.claim_feedback("t", "gone", 0, True)) == "unknown"
    seen = run(memory.lookup("t", "r"))
    assert seen.confidences == (0.9, 0.2) and seen.feedback == {0: True, 1: False}


def test_lookup_is_tenant_scoped_and_the_memory_bounded() -> None:
    memory = InMemoryFeedbackMemory(2)
    for rid in ("a", "b", "c"):
        memory.remember(rid, "t", "m", [0.5])
    assert run(memory.lookup("t", "a")) is None
    assert run(memory.lookup("t", "c")) is not None
    assert run(memory.lookup("u", "c")) is None


def test_the_unavailable_error_is_openai_shaped_503_with_retry_after() -> None:
    exc = SharedStateUnavailable("Redis is down.", retry_after=0.2)
    assert exc.status == 503
    assert exc.body()["error"]["code"] == "shared_state_unavailable"
    assert exc.headers() == {"retry-after": "1"}


# --- the guard around every Redis call ----------------------------------------------------


class FakeRedis:
    """Answers after ``delay`` seconds, or raises ``error``; counts the calls."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.error: Exception | None = None
        self.calls = 0

    async def answer(self, value: Any = "ok") -> Any:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return value

    async def aclose(self) -> None:
        pass


def guarded(**kw: Any) -> tuple[RedisState, FakeRedis, Metrics]:
    fake = FakeRedis()
    metrics = Metrics(CollectorRegistry())
    options = {"timeout": 0.02, "retry_seconds": 0.1, **kw}
    state = RedisState("redis://unused", metrics=metrics, client_factory=lambda: fake, **options)
    return state, fake, metrics


def count(metrics: Metrics, operation: str) -> float:
    return (
        metrics.registry.get_sample_value(
            "abstain_shared_state_errors_total", {"operation": operation}
        )
        or 0.0
    )


def test_a_slow_redis_call_is_cut_at_the_deadline_and_counted() -> None:
    async def main() -> None:
        state, fake, metrics = guarded()
        await state.start()
        assert await state.run("op", lambda c: c.answer()) == "ok"
        assert metrics.registry.get_sample_value("abstain_shared_state_up") == 1
        fake.delay = 1.0
        t0 = time.perf_counter()
        with pytest.raises(SharedStateUnavailable):
            await state.run("op", lambda c: c.answer())
        assert time.perf_counter() - t0 < 0.2
        assert count(metrics, "op") == 1
        assert metrics.registry.get_sample_value("abstain_shared_state_up") == 0

    run(main())


def test_after_a_failure_redis_is_left_alone_then_tried_again() -> None:
    async def main() -> None:
        state, fake, metrics = guarded()
        await state.start()
        fake.error = ConnectionError("refused")
        with pytest.raises(SharedStateUnavailable):
            await state.run("op", lambda c: c.answer())
        assert not state.available
        with pytest.raises(SharedStateUnavailable):  # backing off: not even tried
            await state.run("op", lambda c: c.answer())
        assert fake.calls == 1 and count(metrics, "op") == 2  # skipped ones count too
        # Work off the request path may try during the back-off.
        with pytest.raises(SharedStateUnavailable):
            await state.run("release", lambda c: c.answer(), during_backoff=True)
        assert fake.calls == 2
        fake.error = None
        await asyncio.sleep(0.12)
        assert state.available
        assert await state.run("op", lambda c: c.answer()) == "ok"
        assert metrics.registry.get_sample_value("abstain_shared_state_up") == 1

    run(main())


def test_failures_are_logged_at_most_once_a_minute_and_recovery_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        state, fake, _ = guarded(retry_seconds=0)
        await state.start()
        fake.error = ConnectionError("refused")
        for _ in range(5):
            with pytest.raises(SharedStateUnavailable):
                await state.run("op", lambda c: c.answer())
        fake.error = None
        await state.run("op", lambda c: c.answer())
        await state.run("op", lambda c: c.answer())

    with caplog.at_level(logging.WARNING, logger="abstain.shared_state"):
        run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "failed" in messages[0] and "answers again" in messages[1]
    assert "redis://" not in " ".join(messages)  # the URL (and its password) never logged


def test_background_work_is_awaited_by_settle_and_its_failure_swallowed() -> None:
    async def main() -> None:
        state, fake, metrics = guarded()
        await state.start()
        fake.error = ConnectionError("refused")
        state.background(state.run("bg", lambda c: c.answer()))
        await state.settle()
        assert count(metrics, "bg") == 1

    run(main())


def test_a_shared_memory_that_cannot_remember_counts_and_never_raises() -> None:
    async def main() -> None:
        state, fake, metrics = guarded()
        await state.start()
        fake.error = ConnectionError("refused")
        memory = RedisFeedbackMemory(state)

        class Failing:
            def pipeline(self, **_kw: Any) -> Any:
                raise ConnectionError("refused")

            async def hgetall(self, _key: str) -> Any:
                raise ConnectionError("refused")

        state.client = Failing()
        memory.remember("r", "t", "m", [0.5])  # returns at once; fails in the background
        await state.settle()
        assert count(metrics, "feedback_remember") == 1
        with pytest.raises(SharedStateUnavailable):
            await memory.lookup("t", "r")

    run(main())


# --- the limiter's fallback ---------------------------------------------------------------

POLICY = """
upstreams: {up: {base_url: "http://127.0.0.1:9/v1"}}
models: {plain: {upstream: up}}
defaults: {max_concurrent_requests: 2, rate_limit_per_second: 0.001, rate_limit_burst: 1}
"""


def rule(**changes: Any) -> Rule:
    return dataclasses.replace(parse_policy(POLICY).rule(None, "plain"), **changes)


def test_the_limiter_decides_locally_while_redis_is_down() -> None:
    async def main() -> None:
        state, fake, metrics = guarded()
        await state.start()
        fake.error = ConnectionError("refused")
        limiter = RedisLimiter(state)
        first = await limiter.acquire_async("t", rule(), time.monotonic())
        assert not isinstance(first, Refusal)
        assert limiter.in_flight("t") == 1  # a local lease
        second = await limiter.acquire_async("t", rule(), time.monotonic())
        assert isinstance(second, Refusal) and second.limit == "rate_limit_per_second"
        first.release()
        assert limiter.in_flight("t") == 0
        # The first one failed (the fake has no scripts); the second did not even try.
        assert count(metrics, "limit_acquire") == 2
        assert not state.available

    run(main())


def test_a_tenant_without_limits_never_calls_redis() -> None:
    async def main() -> None:
        state, fake, _ = guarded()
        await state.start()
        limiter = RedisLimiter(state)
        free = rule(max_concurrent_requests=None, rate_limit_per_second=None)
        lease = await limiter.acquire_async("t", free, time.monotonic())
        assert not isinstance(lease, Refusal)
        lease.release()
        assert fake.calls == 0

    run(main())


def test_redis_settings_default_to_off_and_keep_the_password_secret() -> None:
    assert Settings().redis_url is None
    settings = Settings(redis_url="redis://:hunter2@127.0.0.1:6379/0")
    assert "hunter2" not in repr(settings)
    assert settings.redis_timeout_seconds == 0.05
    assert settings.feedback_ttl_seconds == 86_400


def test_background_commands_queued_together_go_in_one_round_trip() -> None:
    class Pipe:
        def __init__(self, log: list[list[str]]) -> None:
            self.log, self.commands = log, []

        async def __aenter__(self) -> Pipe:
            return self

        async def __aexit__(self, *_exc: object) -> None:
            pass

        def zrem(self, key: str, member: str) -> None:
            self.commands.append(f"zrem {key} {member}")

        async def execute(self) -> None:
            self.log.append(self.commands)

    class Client:
        def __init__(self) -> None:
            self.sent: list[list[str]] = []

        def pipeline(self, **_kw: Any) -> Pipe:
            return Pipe(self.sent)

        async def aclose(self) -> None:
            pass

    async def main() -> list[list[str]]:
        client = Client()
        metrics = Metrics(CollectorRegistry())
        state = RedisState("redis://unused", metrics=metrics, client_factory=lambda: client)
        await state.start()
        for i in range(3):
            state.enqueue("limit_release", lambda pipe, i=i: pipe.zrem("k", str(i)))
        await state.settle()
        state.enqueue("limit_release", lambda pipe: pipe.zrem("k", "3"))
        await state.close()
        return client.sent

    assert run(main()) == [["zrem k 0", "zrem k 1", "zrem k 2"], ["zrem k 3"]]


def test_a_sentence_is_claimed_apart_from_its_answer_and_the_parts_are_kept() -> None:
    memory = InMemoryFeedbackMemory(10)
    parts = ((0.9, 0.8), (None, None), (0.2, 0.3))
    memory.remember("r", "t", "m", [0.2], bases=[0.3], sentences=[parts])
    seen = run(memory.lookup("t", "r"))
    assert seen.base(0) == 0.3 and seen.parts(0) == parts
    assert run(memory.claim_feedback("t", "r", 0, True, sentence=2)) == "new"
    assert run(memory.claim_feedback("t", "r", 0, True, sentence=2)) == "duplicate"
    assert run(memory.claim_feedback("t", "r", 0, False, sentence=2)) == "conflict"
    assert run(memory.claim_feedback("t", "r", 0, False, sentence=0)) == "new"
    assert run(memory.claim_feedback("t", "r", 0, True)) == "new"  # the whole answer
    assert seen.feedback == {0: True}
    assert seen.sentence_feedback == {(0, 2): True, (0, 0): False}
    # Without a recalibration the base is the confidence itself.
    memory.remember("s", "t", "m", [0.7])
    plain = run(memory.lookup("t", "s"))
    assert plain.base(0) == 0.7 and plain.parts(0) is None


def test_only_the_first_sentences_of_a_choice_are_remembered() -> None:
    from proxy.shared_state.memory import MAX_SENTENCES

    memory = InMemoryFeedbackMemory(10)
    many = tuple((0.5, 0.4) for _ in range(MAX_SENTENCES + 100))
    memory.remember("r", "t", "m", [0.5], sentences=[many])
    seen = run(memory.lookup("t", "r"))
    assert seen.parts(0) == many[:MAX_SENTENCES]
