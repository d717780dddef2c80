"""Two real proxy processes (``abstain serve``) learning one recalibration through one
real redis-server: feedback split across both, the map swapped in once and served by
both, kept by a restarted process, served through a Redis outage and written back to the
Redis that restarted empty."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import redis

from tests.deploy.procs import wait_for
from tests.deploy.redis_server import RedisServer
from tests.deploy.test_shared_redis import ask, post, proxy, scrape
from tests.proxy.test_recalibration import CALIBRATION

#: The fake's ``sure`` answers with every token at logprob -0.01: under CALIBRATION the
#: shipped P(correct) is sigmoid(-0.01 + 3) ≈ 0.952, and the feedback says it is wrong.
SHIPPED = 0.952

#: A deadline the processes' own Redis calls never meet on a busy machine: what is
#: tested here is what is shared, not latency (and a stopped Redis refuses at once).
ENV = {"ABSTAIN_REDIS_TIMEOUT_SECONDS": "0.5"}

MAP_FIELD = "t:sure"


def _policy(directory: Path, upstream_url: str) -> Path:
    (directory / "cal.json").write_text(json.dumps(CALIBRATION), encoding="utf-8")
    path = directory / "policy.yaml"
    path.write_text(
        f"""
upstreams:
  fake: {{base_url: {upstream_url}, timeouts: {{connect: 2, read: 10, total: 20}}}}
models:
  sure: {{upstream: fake, calibration: cal.json}}
defaults:
  threshold: 0.5
  recalibrate: true
  recalibrate_min_labels: 20
  recalibrate_every: 10
auth: {{unknown_keys: default, default_tenant: t}}
tenants:
  t: {{}}
""",
        encoding="utf-8",
    )
    return path


def verdict(base: str) -> dict[str, Any]:
    status, body = ask(base)
    assert status == 200, body
    found: dict[str, Any] = body["choices"][0]["abstention"]
    return found


def label(served: str, via: str, correct: bool) -> None:
    """A response from ``served``, its feedback through ``via``."""
    # The fake upstream gives every answer the same id unless told one (unknown fields
    # reach it untouched); feedback needs one id per answer.
    question = {"model": "sure", "messages": [{"role": "user", "content": "Capital?"}]}
    status, body = post(served, "/v1/chat/completions", {**question, "x_id": uuid.uuid4().hex})
    assert status == 200, body
    feedback = {"id": body["id"], "correct": correct}
    # The response is remembered in Redis in the background, just after the answer.
    status, got = wait_for(lambda: post(via, "/v1/feedback", feedback), lambda r: r[0] != 404)
    assert status == 200 and got["recorded"] is True, got


def stored_map(url: str) -> dict[str, Any] | None:
    client = redis.Redis.from_url(url)
    try:
        raw = client.hget("abstain:recal:maps", MAP_FIELD)
    finally:
        client.close()
    return None if raw is None else dict(json.loads(raw))


def test_both_processes_answer_with_the_map_learnt_from_feedback_to_both(
    tmp_path: Path, upstream_url: str
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    policy = _policy(tmp_path, upstream_url)
    try:
        with proxy(policy, server.url, tmp_path / "a.log", ENV) as a:
            with proxy(policy, server.url, tmp_path / "b.log", ENV) as b:
                for base in (a, b):
                    before = verdict(base)
                    assert before["calibration_source"] == "shipped"
                    assert abs(before["confidence"] - SHIPPED) < 1e-3
                    assert before["decision"] == "answer"
                # 20 labels, 10 through each process, each for the other one's response;
                # wrong 9 times in 10.
                for i in range(20):
                    label((a, b)[i % 2], (b, a)[i % 2], correct=i % 10 == 0)
                assert scrape(a, "abstain_recalibration_labels", model="sure") == 20

                def learnt(base: str) -> dict[str, Any]:
                    return wait_for(
                        lambda: verdict(base),
                        lambda v: v["calibration_source"] != "shipped",
                        every=0.05,
                    )

                on_a, on_b = learnt(a), learnt(b)
                assert on_a["calibration_source"] == on_b["calibration_source"] == "recalibrated:1"
                assert on_a["confidence"] == on_b["confidence"]
                assert on_a["confidence"] < 0.5
                assert on_a["decision"] == on_b["decision"] == "abstain"
                # Fitted and swapped once, wherever; both processes say version 1 serves.
                swaps = [scrape(x, "abstain_recalibration_swaps_total") for x in (a, b)]
                assert sum(swaps) == 1, swaps
                for base in (a, b):
                    assert scrape(base, "abstain_recalibration_info", version="1") == 1
                mapped = stored_map(server.url)
                assert mapped is not None and mapped["version"] == 1 and mapped["n"] == 20

            # b restarts: it answers with the shared map from its first request.
            with proxy(policy, server.url, tmp_path / "b2.log", ENV) as b2:
                again = verdict(b2)
                assert again["calibration_source"] == "recalibrated:1"
                assert again["confidence"] == on_a["confidence"]

                # Redis stops: both still answer with the last map they know.
                server.stop()
                for base in (a, b2):
                    during = verdict(base)
                    assert during["calibration_source"] == "recalibrated:1"
                    assert during["confidence"] == on_a["confidence"]
                status, refused = post(b2, "/v1/feedback", {"id": "chatcmpl-x", "correct": True})
                assert status == 503, refused
                for base in (a, b2):  # the map refresh keeps trying, and counting
                    failed = wait_for(
                        lambda base=base: scrape(
                            base, "abstain_shared_state_errors_total",
                            operation="recalibration_refresh",
                        ),
                        lambda n: n >= 1,
                    )  # fmt: skip
                    assert failed >= 1
                    assert scrape(base, "abstain_shared_state_up") == 0

                # Redis comes back empty (no persistence): the processes write the map back.
                server.start()
                assert wait_for(lambda: stored_map(server.url), lambda m: m is not None) == mapped
                for base in (a, b2):
                    up = wait_for(lambda base=base: scrape(base, "abstain_shared_state_up"),
                                  lambda v: v == 1)  # fmt: skip
                    assert up == 1
                    assert verdict(base)["calibration_source"] == "recalibrated:1"
                # A process started now learns it from Redis, and labels flow again.
                with proxy(policy, server.url, tmp_path / "c.log", ENV) as c:
                    fresh = verdict(c)
                    assert fresh["calibration_source"] == "recalibrated:1"
                    assert fresh["confidence"] == on_a["confidence"]
                    label(c, a, correct=False)
                client = redis.Redis.from_url(server.url)
                assert client.llen("abstain:recal:labels:t:sure") == 1  # the old ones are lost
                client.close()
    finally:
        server.stop()
