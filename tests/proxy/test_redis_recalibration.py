"""The Redis recalibration store against a real redis-server on loopback.

Each store has its own :class:`RedisState` (client, metrics), like two pods: labels
shared and bounded, a compare-and-swap that one pod wins, a map swapped on one pod
served by the other after a poll, a new process that loads the map before serving,
labels kept while Redis is down, and a Redis that restarted empty getting its maps back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import redis
from prometheus_client import CollectorRegistry

from proxy.confidence.recalibration import Recalibration, RecalibrationRule
from proxy.feedback_risk import FeedbackRisk, choose_from_feedback
from proxy.metrics import Metrics
from proxy.policy.loading import parse_policy
from proxy.recalibration_store import Label
from proxy.shared_state.memory import SharedStateUnavailable
from proxy.shared_state.redis_recalibration import RedisRecalibrationStore
from proxy.shared_state.redis_recalibration_scripts import RESTORE
from proxy.shared_state.redis_state import RedisState
from tests.deploy.redis_server import RedisServer, redis_server
from tests.unit.test_feedback_risk import FROM_CALIBRATION, POLICY

MAP_1 = Recalibration(0.5, -2.0, version=1, n=20, fitted_at="2026-12-01T10:00:00Z")


@contextlib.asynccontextmanager
async def pod(url: str, **options: Any) -> AsyncIterator[RedisRecalibrationStore]:
    """One process's store: its own client and metrics, started like the app starts it."""
    metrics = Metrics(CollectorRegistry())
    # A generous deadline: these tests are about what is shared, not about latency.
    state = RedisState(url, metrics=metrics, timeout=1.0, retry_seconds=0.05)
    await state.start()
    store = RedisRecalibrationStore(state, **options)
    await store.start()
    try:
        yield store
    finally:
        await store.aclose()
        await state.close()


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def errors(store: RedisRecalibrationStore, operation: str) -> float:
    registry = store.state.metrics.registry
    found = registry.get_sample_value("abstain_shared_state_errors_total", {"operation": operation})
    return found or 0.0


def info(store: RedisRecalibrationStore, version: str) -> float | None:
    registry = store.state.metrics.registry
    labels = {"tenant": "t", "model": "m", "version": version}
    return registry.get_sample_value("abstain_recalibration_info", labels)


def test_labels_from_both_pods_are_one_bounded_list_with_one_count(tmp_path: Path) -> None:
    async def main(url: str) -> None:
        async with pod(url, max_labels=4) as a, pod(url, max_labels=4) as b:
            counts = []
            for i in range(6):
                store = (a, b)[i % 2]
                counts.append(await store.add_label("t", "m", Label(i / 10, i % 2 == 0)))
            assert counts == [1, 2, 3, 4, 5, 6]  # one count over both pods
            for store in (a, b):  # the newest 4, oldest first, whoever stored them
                found = await store.labels("t", "m")
                assert [x.base for x in found] == [0.2, 0.3, 0.4, 0.5]
                assert [x.correct for x in found] == [True, False, True, False]
            assert [x.base for x in await a.labels("t", "m", limit=2)] == [0.4, 0.5]
            assert await a.labels("t", "other") == []
            assert a.count("t", "m") == 5 and b.count("t", "m") == 6
            assert ("t", "m") in a.known()

    with redis_server(tmp_path) as server:
        asyncio.run(main(server.url))
        client = redis.Redis.from_url(server.url)
        assert client.llen("abstain:recal:labels:t:m") == 4
        assert client.get("abstain:recal:count:t:m") == b"6"
        assert client.ttl("abstain:recal:labels:t:m") == -1  # never evicted (volatile-ttl)
        client.close()


def test_names_with_colons_get_their_own_keys(tmp_path: Path) -> None:
    async def main(url: str) -> None:
        async with pod(url) as a:
            await a.add_label("a:b", "c", Label(0.1, True))
            await a.add_label("a", "b:c", Label(0.9, False))
            assert [x.base for x in await a.labels("a:b", "c")] == [0.1]
            assert [x.base for x in await a.labels("a", "b:c")] == [0.9]
            assert await a.swap("a:b", "c", MAP_1)
        async with pod(url) as b:
            assert b.current("a:b", "c") == MAP_1
            assert b.current("a", "b:c") is None

    with redis_server(tmp_path) as server:
        asyncio.run(main(server.url))


def test_the_swap_is_a_compare_and_swap_that_one_pod_wins(tmp_path: Path) -> None:
    async def main(url: str) -> None:
        # No polling here: what each pod knows comes from its own swaps' replies only.
        async with pod(url, refresh_seconds=3600) as a, pod(url, refresh_seconds=3600) as b:
            assert await a.swap("t", "m", MAP_1)
            assert a.current("t", "m") == MAP_1
            # b refitted from the shipped map too: its version 1 loses, and it serves a's.
            mine = Recalibration(0.9, 0.1, version=1, n=20)
            assert not await b.swap("t", "m", mine)
            assert b.current("t", "m") == MAP_1
            # An older or a skipped version never replaces the map in service.
            assert not await b.swap("t", "m", Recalibration(0.8, 0.0, version=3))
            assert not await a.swap("t", "m", Recalibration(0.8, 0.0, version=1))
            # Both refit from version 1 at once: exactly one version 2 wins.
            two_a = Recalibration(0.7, -1.0, version=2, n=30)
            two_b = Recalibration(0.6, -1.5, version=2, n=31)
            won = await asyncio.gather(a.swap("t", "m", two_a), b.swap("t", "m", two_b))
            assert sorted(won) == [False, True]
            winner = two_a if won[0] else two_b
            assert a.current("t", "m") == b.current("t", "m") == winner

    with redis_server(tmp_path) as server:
        asyncio.run(main(server.url))
        stored = redis.Redis.from_url(server.url).hget("abstain:recal:maps", "t:m")
        assert stored is not None
        data = orjson.loads(stored)
        assert data["version"] == 2 and data["tenant"] == "t" and data["model"] == "m"


def test_a_map_swapped_on_one_pod_reaches_the_other_by_polling(tmp_path: Path) -> None:
    async def main(url: str) -> None:
        async with pod(url) as a, pod(url, refresh_seconds=0.05) as b:
            assert b.current("t", "m") is None
            assert await a.swap("t", "m", MAP_1)

            async def b_has_it() -> bool:
                return b.current("t", "m") == MAP_1

            await eventually(b_has_it)
            assert info(b, "1") == 1  # b's metrics say which version it serves
            two = Recalibration(0.6, -1.0, version=2, n=30)
            assert await a.swap("t", "m", two)

            async def b_has_two() -> bool:
                return b.current("t", "m") == two

            await eventually(b_has_two)
            assert (info(b, "1"), info(b, "2")) == (0, 1)

    with redis_server(tmp_path) as server:
        asyncio.run(main(server.url))


def test_a_new_process_loads_the_map_before_it_serves(tmp_path: Path) -> None:
    async def main(url: str) -> None:
        async with pod(url) as a:
            assert await a.swap("t", "m", MAP_1)
        async with pod(url, refresh_seconds=3600) as restarted:  # no poll: start() loaded it
            assert restarted.current("t", "m") == MAP_1
            assert info(restarted, "1") == 1

    with redis_server(tmp_path) as server:
        asyncio.run(main(server.url))


def test_while_redis_is_down_maps_serve_labels_wait_and_then_reach_redis(
    tmp_path: Path,
) -> None:
    async def main(server: RedisServer) -> None:
        async with pod(server.url, refresh_seconds=0.05) as a:
            assert await a.swap("t", "m", MAP_1)
            assert await a.add_label("t", "m", Label(0.5, True)) == 1
            server.stop()
            # The feedback that made this label is claimed already: it must not be lost.
            assert await a.add_label("t", "m", Label(0.6, False)) == 1  # not counted yet
            assert a.pending == 1
            assert errors(a, "recalibration_label") == 1
            assert a.current("t", "m") == MAP_1  # the last map keeps serving
            try:
                await a.labels("t", "m")
                raise AssertionError("labels() must fail while Redis is down")
            except SharedStateUnavailable:
                pass

            async def refresh_failed() -> bool:
                return errors(a, "recalibration_refresh") + errors(a, "recalibration_label") > 1

            await eventually(refresh_failed)  # the poller keeps trying, and counting
            assert a.current("t", "m") == MAP_1
            server.start()  # empty: no persistence

            async def recovered() -> bool:
                return a.pending == 0 and a.count("t", "m") == 1

            await eventually(recovered)  # the waiting label went first after recovery
            assert [x.base for x in await a.labels("t", "m")] == [0.6]
            assert await a.add_label("t", "m", Label(0.7, True)) == 2

    with redis_server(tmp_path) as server:
        asyncio.run(main(server))


def test_a_redis_that_restarted_empty_gets_the_maps_back(tmp_path: Path) -> None:
    async def main(server: RedisServer) -> None:
        async with pod(server.url, refresh_seconds=0.05) as a:
            assert await a.swap("t", "m", MAP_1)
            server.restart()  # empty
            client = redis.Redis.from_url(server.url)

            def rewritten() -> Any:
                return client.hget("abstain:recal:maps", "t:m")

            async def back() -> bool:
                return rewritten() is not None

            await eventually(back)
            assert orjson.loads(rewritten())["version"] == 1
            client.close()
            assert a.current("t", "m") == MAP_1
        async with pod(server.url, refresh_seconds=3600) as fresh:
            assert fresh.current("t", "m") == MAP_1
            # ... and the compare-and-swap goes on from the version written back.
            assert not await fresh.swap("t", "m", Recalibration(0.5, 0.0, version=1))
            assert await fresh.swap("t", "m", Recalibration(0.5, 0.0, version=2))

    with redis_server(tmp_path) as server:
        asyncio.run(main(server))


async def until_it_answers(call: Callable[[], Awaitable[None]], seconds: float = 10.0) -> None:
    """Call until it does not raise: the first call after a restart meets a dead connection."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            await call()
            return
        except SharedStateUnavailable:
            assert time.monotonic() < deadline, "Redis never answered"
            await asyncio.sleep(0.06)  # past the back-off


def test_after_an_empty_restart_the_highest_version_wins(tmp_path: Path) -> None:
    async def main(server: RedisServer) -> None:
        url = server.url
        async with pod(url, refresh_seconds=3600) as old, pod(url, refresh_seconds=3600) as new:
            assert await old.swap("t", "m", MAP_1)
            await new.refresh()
            two = Recalibration(0.6, -1.0, version=2, n=30)
            assert await new.swap("t", "m", two)
            assert old.current("t", "m") == MAP_1  # it has not polled since
            server.restart()  # empty
            await until_it_answers(old.refresh)  # writes its version 1 back first
            await until_it_answers(new.refresh)  # version 2 is newer: written over it
            await old.refresh()  # and the stale pod serves it
            assert old.current("t", "m") == new.current("t", "m") == two
        client = redis.Redis.from_url(url)
        assert orjson.loads(client.hget("abstain:recal:maps", "t:m"))["version"] == 2
        client.close()

    with redis_server(tmp_path) as server:
        asyncio.run(main(server))


def test_writing_a_map_back_never_replaces_a_newer_one(tmp_path: Path) -> None:
    # The race the refresh cannot rule out by itself: it read the hash (version 1 there,
    # or nothing), another pod then stored version 2, and only then does it write back.
    def stored(version: int) -> bytes:
        return orjson.dumps(Recalibration(0.5, 0.0, version=version).to_dict())

    with redis_server(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        restore = client.register_script(RESTORE)
        keys = ["abstain:recal:maps", "abstain:recal:epoch"]
        assert restore(keys=keys, args=["t:m", 2, stored(2), "e1"]) == 1  # absent: written
        assert restore(keys=keys, args=["t:m", 1, stored(1), "e2"]) == 0  # older: kept out
        assert restore(keys=keys, args=["t:m", 2, stored(2), "e3"]) == 0  # same: no write
        assert orjson.loads(client.hget(keys[0], "t:m"))["version"] == 2
        assert client.get(keys[1]) == b"e1"  # the epoch moves only with a write
        assert restore(keys=keys, args=["t:m", 3, stored(3), "e4"]) == 1
        client.hset(keys[0], "t:m", b"not json")  # an unreadable map counts as none
        assert restore(keys=keys, args=["t:m", 1, stored(1), "e5"]) == 1
        client.close()


def test_both_pods_choose_the_same_target_error_threshold_from_the_shared_labels(
    tmp_path: Path,
) -> None:
    rule = dataclasses.replace(
        parse_policy(POLICY).rule(None, "plain"),
        risk=FROM_CALIBRATION,
        recalibrate=RecalibrationRule(min_labels=40, refit_every=10),
    )

    async def main(url: str) -> None:
        async with pod(url) as a, pod(url) as b:
            for i in range(60):  # all through pod a: b learns the count from Redis
                await a.add_label("t", "m", Label(0.9 if i % 3 else 0.2, i % 3 != 0))
            risks = FeedbackRisk(a), FeedbackRisk(b)

            async def chosen(risk: FeedbackRisk) -> bool:
                choice = risk.choice("t", "m", rule)
                await risk.idle()
                return choice is not None and "being chosen" not in choice.source

            for risk in risks:
                await eventually(lambda risk=risk: chosen(risk))
            labels = await b.labels("t", "m")
            expected = choose_from_feedback(labels, 0.2, 0.9, "t", "m")
            assert expected.threshold is not None
            for risk in risks:
                got = risk.choice("t", "m", rule)
                assert got is not None and got.threshold == expected.threshold
                assert got.labels == 60

    with redis_server(tmp_path) as server:
        asyncio.run(main(server.url))
