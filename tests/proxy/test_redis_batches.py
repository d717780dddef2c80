"""Batches of shared limits (:mod:`proxy.shared_state.allowance`) on a real redis-server.

Two limiters with their own clients share one Redis, like two pods. Far from its limits
a pod asks Redis once per batch, not once per request; the limits hold exactly however
the batches fall (every slot and every token is accounted for in Redis); what a batch
leaves unused goes back, when its time is up and when the app shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.limits import Lease, Refusal
from proxy.metrics import Metrics
from proxy.policy.loading import parse_policy
from proxy.policy.rules import Rule
from proxy.settings import Settings
from proxy.shared_state.redis_limiter import RedisLimiter
from proxy.shared_state.redis_state import RedisState
from tests.conftest import auth
from tests.deploy.redis_server import RedisServer, redis_server
from tests.fakes import FakeUpstream
from tests.proxy.test_limits import _with

POLICY = """
upstreams: {up: {base_url: "http://127.0.0.1:9/v1"}}
models: {plain: {upstream: up}}
"""


def rule(**limits: Any) -> Rule:
    return dataclasses.replace(parse_policy(POLICY).rule(None, "plain"), **limits)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as server:
        yield server


@contextlib.asynccontextmanager
async def pods(url: str, allowance_seconds: float = 1.0) -> AsyncIterator[list[RedisLimiter]]:
    states = [RedisState(url, metrics=Metrics(CollectorRegistry()), timeout=1.0) for _ in "ab"]
    for state in states:
        await state.start()
    try:
        yield [RedisLimiter(s, allowance_seconds=allowance_seconds) for s in states]
    finally:
        for state in states:
            await state.close()


async def take(limiter: RedisLimiter, r: Rule) -> Lease | Refusal:
    """What admission does: the batch held here first, else ask Redis."""
    now = time.monotonic()
    held = limiter.acquire_held("t", r, now)
    return held if held is not None else await limiter.acquire_async("t", r, now)


async def settle(*limiters: RedisLimiter) -> None:
    await asyncio.sleep(0.01)  # let background asks and hand-backs be queued
    for limiter in limiters:
        await limiter.state.settle()


async def take_all(limiters: list[RedisLimiter], r: Rule) -> list[Lease]:
    """Leases from the pods in turn until every pod is refused in the same pass."""
    leases: list[Lease] = []
    while True:
        got = [await take(limiter, r) for limiter in limiters]
        leases += [g for g in got if not isinstance(g, Refusal)]
        if all(isinstance(g, Refusal) for g in got):
            return leases


def asks(client: redis.Redis) -> int:
    """The limiter scripts Redis ran (EVALSHA; hand-backs are sent with EVAL)."""
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def test_far_from_its_limits_a_pod_asks_redis_once_per_batch(server: RedisServer) -> None:
    generous = rule(max_concurrent_requests=1000, rate_limit_per_second=100_000.0)
    direct = redis.Redis.from_url(server.url)

    async def main() -> None:
        async with pods(server.url) as (a, _):
            direct.config_resetstat()
            for _ in range(100):
                lease = await take(a, generous)
                assert not isinstance(lease, Refusal)
                await asyncio.sleep(0.001)  # the request's work: background asks land
                lease.release()
            # One script per request without batches; batches grow with the demand.
            assert asks(direct) <= 10, direct.info("commandstats")

    asyncio.run(main())


def test_a_concurrency_cap_holds_exactly_across_pods_holding_batches(
    server: RedisServer,
) -> None:
    capped = rule(max_concurrent_requests=64, rate_limit_per_second=None)
    direct = redis.Redis.from_url(server.url)

    async def main() -> None:
        async with pods(server.url, allowance_seconds=0.3) as limiters:
            # Warm both pods up, so that they know the headroom and take batches.
            for limiter in limiters:
                warm = await take(limiter, capped)
                assert not isinstance(warm, Refusal)
                warm.release()
            await settle(*limiters)
            leases = await take_all(limiters, capped)
            await settle(*limiters)
            assert len(leases) == 64  # every slot used, by one pod or the other
            assert direct.zcard("abstain:limit:t:leases") == 64
            for lease in leases:
                lease.release()
            await asyncio.sleep(0.35)  # the batches' time is up: idle slots go back
            await settle(*limiters)
            assert direct.zcard("abstain:limit:t:leases") == 0

    asyncio.run(main())


def test_a_rate_limit_gives_out_exactly_its_bucket_across_pods(server: RedisServer) -> None:
    # 640 tokens that (in the test's time) do not refill: batches of up to 40.
    bucket = rule(rate_limit_per_second=0.001, rate_limit_burst=640, max_concurrent_requests=None)

    async def main() -> None:
        async with pods(server.url, allowance_seconds=0.3) as limiters:
            first = await take_all(limiters, bucket)
            assert 0 < len(first) <= 640
            await asyncio.sleep(0.35)  # unused tokens of the batches go back
            await settle(*limiters)
            second = await take_all(limiters, bucket)
            assert len(first) + len(second) == 640, (len(first), len(second))

    asyncio.run(main())


def test_shutdown_hands_the_batches_back(
    server: RedisServer, policy_path: Path, fake: FakeUpstream
) -> None:
    _with(
        policy_path,
        chat="    max_concurrent_requests: 1000\n"
        "    rate_limit_per_second: 0.001\n    rate_limit_burst: 10000\n",
    )
    settings = Settings(
        policy=policy_path,
        handle_signals=False,
        reload_interval_seconds=0,
        redis_url=server.url,
    )
    app = create_app(
        settings,
        transport=fake.transport(),
        registry=CollectorRegistry(),
        env={"FAKE_UPSTREAM_KEY": "sk-upstream-secret"},
    )
    direct = redis.Redis.from_url(server.url)
    with TestClient(app) as client:
        direct.config_resetstat()
        for _ in range(20):
            body = {"model": "sure", "messages": [{"role": "user", "content": "Hi?"}]}
            r = client.post("/v1/chat/completions", json=body, headers=auth("chat"))
            assert r.status_code == 200, r.text
        assert asks(direct) < 20  # some were admitted from a batch
        assert direct.zcard("abstain:limit:chat:leases") > 0  # the batch's idle slots
    # Shut down: the slots are free again and only the 20 admitted tokens are spent.
    assert direct.zcard("abstain:limit:chat:leases") == 0
    left = float(direct.hget("abstain:limit:chat:bucket", "tokens") or 0)
    assert left == pytest.approx(10_000 - 20, abs=0.5)
