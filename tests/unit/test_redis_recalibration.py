"""The Redis recalibration store and its wiring, with a fake client: what reaches Redis
and when (never from ``current``; not while backing off), what a failure leaves behind
(labels kept and bounded, the map still served, errors counted), and how the app and
:class:`OnlineRecalibration` use a shared store."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from proxy.app import create_app
from proxy.confidence.recalibration import Recalibration, RecalibrationRule
from proxy.metrics import Metrics
from proxy.online_recalibration import OnlineRecalibration
from proxy.recalibration_store import FileStore, Label, MemoryStore, store_for
from proxy.settings import Settings
from proxy.shared_state.memory import SharedStateUnavailable
from proxy.shared_state.redis_recalibration import RedisRecalibrationStore
from proxy.shared_state.redis_state import RedisState

MAP_1 = Recalibration(0.5, -2.0, version=1, n=20)


class FakeClient:
    """Records every command; raises ConnectionError for all of them while ``down``."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.down = False
        self.script_reply: Any = [1, b""]
        self.counts: dict[str, int] = {}
        self.index: set[bytes] = set()

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.down:
            raise ConnectionError("Connection refused")

    def register_script(self, _source: str) -> Callable[..., Awaitable[Any]]:
        async def run(keys: list[str], args: list[Any], client: Any) -> Any:
            self._call("evalsha")
            return self.script_reply

        return run

    async def get(self, _key: str) -> bytes | None:
        self._call("get")
        return None

    async def hgetall(self, _key: str) -> dict[bytes, bytes]:
        self._call("hgetall")
        return {}

    async def smembers(self, _key: str) -> set[bytes]:
        self._call("smembers")
        return set(self.index)

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        self._call("mget")
        return [str(self.counts[k]).encode() if k in self.counts else None for k in keys]

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)

    async def aclose(self) -> None:
        pass


class FakePipeline:
    def __init__(self, client: FakeClient) -> None:
        self.client = client
        self.replies: list[Any] = []

    async def __aenter__(self) -> FakePipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    def lpush(self, _key: str, *values: bytes) -> None:
        self.replies.append(len(values))

    def ltrim(self, _key: str, _start: int, _stop: int) -> None:
        self.replies.append(True)

    def incrby(self, key: str, n: int) -> None:
        self.replies.append((key, n))

    def sadd(self, _key: str, member: str) -> None:
        self.client.index.add(member.encode())
        self.replies.append(1)

    async def execute(self) -> list[Any]:
        self.client._call("exec")  # all or nothing, like MULTI/EXEC
        counts = self.client.counts
        for i, reply in enumerate(self.replies):
            if isinstance(reply, tuple):
                key, n = reply
                counts[key] = counts.get(key, 0) + n
                self.replies[i] = counts[key]
        return self.replies


def fake_store(**options: Any) -> tuple[RedisRecalibrationStore, FakeClient, Metrics]:
    fake = FakeClient()
    metrics = Metrics(CollectorRegistry())
    retry = options.pop("retry_seconds", 30.0)
    state = RedisState(
        "redis://unused", metrics=metrics, retry_seconds=retry, client_factory=lambda: fake
    )
    return RedisRecalibrationStore(state, **options), fake, metrics


def errors(metrics: Metrics, operation: str) -> float:
    labels = {"operation": operation}
    return metrics.registry.get_sample_value("abstain_shared_state_errors_total", labels) or 0.0


def test_current_never_calls_redis_and_serves_the_last_map_while_it_is_down() -> None:
    async def main() -> None:
        store, fake, metrics = fake_store()
        await store.state.start()
        await store.start()
        assert await store.swap("t", "m", MAP_1)
        made = len(fake.calls)
        fake.down = True
        for _ in range(1000):
            assert store.current("t", "m") == MAP_1
        assert store.current("t", "other") is None
        assert len(fake.calls) == made  # the hot path made no call
        with pytest.raises(SharedStateUnavailable):
            await store.swap("t", "m", Recalibration(0.4, -1.0, version=2))
        assert errors(metrics, "recalibration_swap") == 1
        assert store.current("t", "m") == MAP_1
        await store.aclose()

    asyncio.run(main())


def test_a_swap_that_loses_serves_the_winners_map() -> None:
    async def main() -> None:
        store, fake, _ = fake_store()
        await store.state.start()
        winner = Recalibration(0.7, -0.5, version=1, n=25)
        stored = {"tenant": "t", "model": "m", **winner.to_dict()}
        fake.script_reply = [0, orjson.dumps(stored)]
        assert not await store.swap("t", "m", MAP_1)
        assert store.current("t", "m") == winner

    asyncio.run(main())


def test_labels_redis_cannot_take_wait_in_the_process_bounded_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        store, fake, metrics = fake_store(pending_max=3, retry_seconds=0.0)
        await store.state.start()
        assert await store.add_label("t", "m", Label(0.1, True)) == 1
        fake.down = True
        with caplog.at_level(logging.WARNING, logger="abstain.recalibration"):
            for i in range(5):
                # Not counted while pending, so no refit starts on labels it cannot read.
                assert await store.add_label("t", "m", Label(0.2 + i / 10, False)) == 1
        assert store.pending == 3 and store.dropped == 2
        assert errors(metrics, "recalibration_label") == 5  # each failed push
        dropped = [r for r in caplog.records if "dropped" in r.getMessage()]
        assert len(dropped) == 1  # logged once, not per label
        fake.down = False
        await store.refresh()  # the poller's first success sends them, in one MULTI
        assert store.pending == 0
        assert store.count("t", "m") == 4  # 1 before + the 3 kept
        assert fake.calls.count("exec") == 2 + 5

    asyncio.run(main())


def test_the_poller_leaves_redis_alone_while_backing_off_then_recovers() -> None:
    async def main() -> None:
        store, fake, metrics = fake_store(refresh_seconds=0.01, retry_seconds=3600.0)
        await store.state.start()
        fake.down = True
        await store.start()  # the first load fails: counted, and the client backs off
        assert errors(metrics, "recalibration_refresh") == 1
        calls = len(fake.calls)
        for _ in range(20):  # twenty poll intervals
            await asyncio.sleep(0.01)
        assert len(fake.calls) == calls  # no call, and no error counted, while backing off
        assert errors(metrics, "recalibration_refresh") == 1
        fake.down = False
        store.state.retry_seconds = 0.0
        store.state._down_until = 0.0  # end the back-off now rather than wait an hour
        deadline = time.monotonic() + 10
        while metrics.registry.get_sample_value("abstain_shared_state_up") != 1:
            assert time.monotonic() < deadline, "the poller never tried again"
            await asyncio.sleep(0.01)
        assert "get" in fake.calls[calls:]
        await store.aclose()

    asyncio.run(main())


def test_with_redis_the_shared_store_is_used_and_no_directory(tmp_path: Path) -> None:
    shared, _, _ = fake_store()
    settings = Settings(redis_url="redis://127.0.0.1:1/0", recalibration_dir=tmp_path / "r")
    assert store_for(settings, shared) is shared
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="ABSTAIN_REDIS_URL"):
        store_for(settings)
    # Without Redis the defaults are unchanged.
    assert type(store_for(Settings())) is MemoryStore
    assert isinstance(store_for(Settings(recalibration_dir=tmp_path / "d")), FileStore)


def test_the_app_with_a_redis_url_uses_the_redis_store(policy_path: Path) -> None:
    settings = Settings(policy=policy_path, redis_url="redis://127.0.0.1:1/0", handle_signals=False)
    app = create_app(settings, registry=CollectorRegistry())
    store = app.state.recalibration.store
    assert isinstance(store, RedisRecalibrationStore)
    assert store.state is app.state.shared_state  # one client, one set of error metrics
    assert store.max_labels == settings.redis_recalibration_labels
    plain = create_app(Settings(policy=policy_path), registry=CollectorRegistry())
    assert type(plain.state.recalibration.store) is MemoryStore


RULE = RecalibrationRule(min_labels=20, refit_every=10, holdout=0.3)


class ScriptedStore(MemoryStore):
    """A MemoryStore whose label counts, swap failures and lifecycle a test sets."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: list[int] = []
        self.swap_error: Exception | None = None
        self.lifecycle: list[str] = []

    async def add_label(self, tenant: str, model: str, label: Label) -> int:
        await super().add_label(tenant, model, label)
        return self.counts.pop(0)

    async def swap(self, tenant: str, model: str, new: Recalibration) -> bool:
        if self.swap_error is not None:
            raise self.swap_error
        return await super().swap(tenant, model, new)

    async def start(self) -> None:
        self.lifecycle.append("start")

    async def aclose(self) -> None:
        self.lifecycle.append("aclose")


def refits(metrics: Metrics, result: str) -> float:
    labels = {"tenant": "t", "model": "m", "result": result}
    return metrics.registry.get_sample_value("abstain_recalibration_refits_total", labels) or 0


def test_a_refit_redis_cannot_swap_fails_quietly_and_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        store = ScriptedStore()
        metrics = Metrics(CollectorRegistry())
        online = OnlineRecalibration(store, metrics)
        store.swap_error = SharedStateUnavailable("down")
        store.counts = list(range(1, 21))
        with caplog.at_level(logging.ERROR, logger="abstain.recalibration"):
            for _ in range(20):  # wrong answers at a shipped P of 0.95: a clear swap
                await online.feedback(RULE, "t", "m", 0.95, False)
            await online.idle()
        assert refits(metrics, "failed") == 1
        assert store.current("t", "m") is None
        assert not [r for r in caplog.records if r.exc_info]  # no traceback: not a bug

    asyncio.run(main())


def test_a_label_count_that_went_back_restarts_the_refit_schedule() -> None:
    async def main() -> None:
        store = ScriptedStore()
        metrics = Metrics(CollectorRegistry())
        online = OnlineRecalibration(store, metrics)
        # 20 labels (a refit), then the store lost them (a Redis restarted empty) and
        # counts from 1 again: the next refit is due at 20, not at 30.
        store.counts = [20, *range(1, 21)]
        for _ in range(21):
            await online.feedback(RULE, "t", "m", 0.95, False)
            await online.idle()
        assert refits(metrics, "swapped") + refits(metrics, "kept") == 2

    asyncio.run(main())


def test_online_recalibration_starts_and_closes_the_store() -> None:
    async def main() -> None:
        store = ScriptedStore()
        online = OnlineRecalibration(store)
        await online.start()
        await online.aclose()
        assert store.lifecycle == ["start", "aclose"]
        await OnlineRecalibration(MemoryStore()).start()  # a store without either: fine

    asyncio.run(main())
