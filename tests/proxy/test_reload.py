"""Policy reload: a good new file takes effect, a broken one is rejected and counted."""

from __future__ import annotations

import time
from pathlib import Path

from starlette.testclient import TestClient

from proxy.policy.loading import PolicyStore
from tests.conftest import POLICY, auth

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
