"""Policy reload: a good new file takes effect, a broken one is rejected and counted."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from proxy.app import _watch_step, create_app
from proxy.policy import loading
from proxy.policy.loading import MAX_POLICY_BYTES, PolicyStore
from proxy.policy.rules import Policy
from proxy.settings import Settings
from tests.conftest import POLICY, auth
from tests.fakes import FakeUpstream

CHAT = {"messages": [{"role": "user", "content": "q"}]}


def threshold_of(client: TestClient) -> float:
    r = client.post("/v1/chat/completions", json={"model": "sure", **CHAT}, headers=auth("chat"))
    return float(r.json()["abstention"]["threshold"])


def reload_count(client: TestClient, result: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'abstain_policy_reloads_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_broken_new_policy_is_rejected_and_the_old_one_keeps_serving(
    client: TestClient, policy_path: Path
) -> None:
    store: PolicyStore = client.app.state.store
    policy_path.write_text(POLICY + "\nunexpected_key: 1\n")
    assert store.reload() is False
    assert "unexpected_key" in (store.last_error or "")
    assert threshold_of(client) == 0.5
    assert reload_count(client, "failure") == 1
    assert "abstain_policy_last_reload_success 0.0" in client.get("/metrics").text


def test_good_new_policy_takes_effect(client: TestClient, policy_path: Path) -> None:
    policy_path.write_text(POLICY.replace("threshold: 0.5", "threshold: 0.6"))
    assert client.app.state.store.reload() is True
    assert threshold_of(client) == 0.6
    assert reload_count(client, "success") == 1


def test_changed_file_is_picked_up_by_the_watcher(make_client, policy_path: Path) -> None:
    client = make_client(reload_interval_seconds=0.05)
    assert threshold_of(client) == 0.5
    policy_path.write_text(POLICY.replace("threshold: 0.5", "threshold: 0.7"))
    deadline = time.monotonic() + 5
    while threshold_of(client) != 0.7 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threshold_of(client) == 0.7


def last_reload_success(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("abstain_policy_last_reload_success "):
            return float(line.split()[-1])
    raise AssertionError("abstain_policy_last_reload_success not exported")


def wait_for(condition: Callable[[], bool], seconds: float = 2.0) -> bool:
    """Poll ``condition``; the watcher runs every 0.02 s, so this is normally instant."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def step(client: TestClient) -> None:
    """One watcher poll, on the app's own event loop."""
    portal = client.portal
    assert portal is not None
    portal.call(_watch_step, client.app.state.store)


def test_invalid_utf8_then_a_valid_edit_is_picked_up_by_the_watcher(
    make_client: Callable[..., TestClient], policy_path: Path
) -> None:
    client = make_client(reload_interval_seconds=0.02)
    policy_path.write_bytes(POLICY.encode() + b"\n# caf\xe9\n")
    assert wait_for(lambda: reload_count(client, "failure") == 1)
    assert last_reload_success(client) == 0
    assert threshold_of(client) == 0.5  # the old policy keeps serving
    assert "UTF-8" in (client.app.state.store.last_error or "")
    policy_path.write_text(POLICY.replace("threshold: 0.5", "threshold: 0.7"))
    assert wait_for(lambda: threshold_of(client) == 0.7)
    assert reload_count(client, "success") == 1
    assert last_reload_success(client) == 1


def test_an_alias_bomb_is_rejected_and_the_old_policy_keeps_serving(
    client: TestClient, policy_path: Path
) -> None:
    bomb = ['      l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    bomb += [f"      l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    policy_path.write_text(
        POLICY.replace(
            "  fake-no-n:\n",
            "  bomb:\n    litellm_model: openai/x\n    litellm_params:\n"
            + "\n".join(bomb)
            + "\n  fake-no-n:\n",
        )
    )
    step(client)
    store: PolicyStore = client.app.state.store
    assert "once aliases are expanded" in (store.last_error or "")
    assert reload_count(client, "failure") == 1
    assert threshold_of(client) == 0.5
    assert "last_reload_error" in client.get("/readyz").json()


def test_a_deep_or_oversized_file_is_rejected_and_counted(
    client: TestClient, policy_path: Path
) -> None:
    policy_path.write_text(POLICY + "extra: " + "[" * 100_000 + "]" * 100_000 + "\n")
    step(client)
    assert "levels deep" in (client.app.state.store.last_error or "")
    policy_path.write_text(POLICY + "#" * (MAX_POLICY_BYTES + 1))
    step(client)
    assert "larger than the limit" in (client.app.state.store.last_error or "")
    assert reload_count(client, "failure") == 2
    assert threshold_of(client) == 0.5


def test_the_watcher_step_survives_an_unexpected_error(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    store: PolicyStore = client.app.state.store

    def broken() -> bool:
        raise RuntimeError("stat exploded")

    monkeypatch.setattr(store, "changed", broken)
    step(client)  # logged, not raised
    assert threshold_of(client) == 0.5


def test_sighup_reloads_in_a_worker_thread(
    policy_path: Path, fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    real = loading.load_policy

    def spy(path: str | Path) -> Policy:
        threads.append(threading.get_ident())
        return real(path)

    app = create_app(
        Settings(policy=policy_path, handle_signals=True, reload_interval_seconds=0),
        transport=fake.transport(),
        registry=CollectorRegistry(),
        env={"FAKE_UPSTREAM_KEY": "k"},
    )
    store: PolicyStore = app.state.store
    monkeypatch.setattr(loading, "load_policy", spy)

    async def main() -> float:
        async with app.router.lifespan_context(app):
            policy_path.write_text(POLICY.replace("threshold: 0.5", "threshold: 0.8"))
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(200):  # at most 2 s; normally a few milliseconds
                if (
                    threads
                    and store.last_error is None
                    and store.current.rule("chat", "sure").threshold == 0.8
                ):
                    break
                await asyncio.sleep(0.01)
            return store.current.rule("chat", "sure").threshold

    assert asyncio.run(main()) == 0.8
    assert threads and threads[0] != threading.get_ident()
