"""Two real proxy processes (``abstain serve``) sharing one real redis-server on loopback."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.deploy.procs import abstain_command, http_get, running, sample_total
from tests.deploy.redis_server import RedisServer
from tests.e2e.procs import free_port


def _policy(directory: Path, upstream_url: str) -> Path:
    path = directory / "policy.yaml"
    path.write_text(
        f"""
upstreams:
  fake: {{base_url: {upstream_url}, timeouts: {{connect: 2, read: 10, total: 20}}}}
models:
  sure: {{upstream: fake}}
auth: {{unknown_keys: default, default_tenant: t}}
tenants:
  t: {{rate_limit_per_second: 0.001, rate_limit_burst: 6}}
""",
        encoding="utf-8",
    )
    return path


def post(base: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": "Bearer any"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def ask(base: str) -> tuple[int, dict[str, Any]]:
    return post(base, "/v1/chat/completions",
                {"model": "sure", "messages": [{"role": "user", "content": "Capital?"}]})  # fmt: skip


@contextlib.contextmanager
def proxy(
    policy: Path, redis_url: str, log: Path, extra: dict[str, str] | None = None
) -> Iterator[str]:
    port = free_port()
    env = {
        "ABSTAIN_POLICY": str(policy),
        "ABSTAIN_HOST": "127.0.0.1",
        "ABSTAIN_PORT": str(port),
        "ABSTAIN_LOG_LEVEL": "warning",
        "ABSTAIN_REDIS_URL": redis_url,
        "ABSTAIN_REDIS_RETRY_SECONDS": "0.2",
        **(extra or {}),
    }
    base = f"http://127.0.0.1:{port}"
    with running([*abstain_command(), "serve"], log, f"{base}/readyz", env):
        yield base


def scrape(base: str, name: str, **labels: str) -> float:
    return sample_total(http_get(f"{base}/metrics")[1], name, **labels)


def test_two_processes_share_feedback_and_limits_and_survive_a_redis_restart(
    tmp_path: Path, upstream_url: str
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    policy = _policy(tmp_path, upstream_url)
    try:
        with (
            proxy(policy, server.url, tmp_path / "a.log") as a,
            proxy(policy, server.url, tmp_path / "b.log") as b,
        ):
            status, body = ask(a)
            assert status == 200
            time.sleep(0.05)  # the response is remembered in the background
            status, first = post(b, "/v1/feedback", {"id": body["id"], "correct": True})
            assert status == 200 and first["recorded"] is True, first
            status, again = post(a, "/v1/feedback", {"id": body["id"], "correct": True})
            assert status == 200 and again["duplicate"] is True
            fed = sum(scrape(base, "abstain_feedback_total") for base in (a, b))
            assert fed == 1

            # A burst of 6 with (almost) no refill, one was spent above: 5 more in all.
            statuses = [ask((a, b)[i % 2])[0] for i in range(10)]
            assert statuses.count(200) == 5 and statuses.count(429) == 5, statuses

            server.stop()
            status, served = ask(a)  # limits are local now: a fresh bucket per process
            assert status == 200
            status, refused = post(b, "/v1/feedback", {"id": served["id"], "correct": True})
            assert status == 503
            assert refused["error"]["code"] == "shared_state_unavailable"
            assert scrape(a, "abstain_shared_state_errors_total") >= 1
            assert scrape(b, "abstain_shared_state_errors_total", operation="feedback_lookup") == 1
            assert scrape(a, "abstain_shared_state_up") == 0

            server.start()  # empty: the buckets are full again
            time.sleep(0.3)
            status, body = ask(b)
            assert status == 200
            time.sleep(0.05)
            status, recorded = post(a, "/v1/feedback", {"id": body["id"], "correct": False})
            assert status == 200 and recorded["recorded"] is True
            assert scrape(a, "abstain_shared_state_up") == 1
    finally:
        server.stop()
