"""Processes and HTTP for the deployment tests: the proxy, Prometheus, bounded waits.

Every wait polls a condition until a deadline and hands back the last value it saw;
the test then asserts on that value, so a slow machine makes a test slower, never
wrong, and a broken build fails with what was actually observed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from proxy.local_model import stop
from tests.e2e.procs import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
INSTALL_HINT = "install Debian's package: apt-get install -y prometheus (make system-deps)"

T = TypeVar("T")


def need_binary(name: str) -> str:
    """The path of ``name`` (promtool, prometheus), or skip the test saying how to get it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found on PATH: {INSTALL_HINT}")
    return path


def abstain_command() -> list[str]:
    """``abstain`` as installed next to this interpreter (the console script)."""
    script = Path(sys.executable).with_name("abstain")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "proxy.cli"]


def write_policy(directory: Path, base_url: str) -> Path:
    """A policy in front of the fake upstream: ``sure`` is answered, ``unsure`` abstained."""
    path = directory / "policy.yaml"
    path.write_text(
        f"""
upstreams:
  fake:
    base_url: {base_url}
    timeouts: {{connect: 2, read: 10, total: 20}}
models:
  sure: {{upstream: fake}}
  unsure: {{upstream: fake}}
  error-500: {{upstream: fake}}
auth: {{unknown_keys: default, default_tenant: t}}
tenants:
  t: {{}}
""",
        encoding="utf-8",
    )
    return path


def wait_for(
    probe: Callable[[], T], done: Callable[[T], bool], timeout: float = 30.0, every: float = 0.2
) -> T:
    """Call ``probe`` until ``done(value)`` or ``timeout`` seconds; return the last value."""
    deadline = time.monotonic() + timeout
    value = probe()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(every)
        value = probe()
    return value


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body); (0, error text) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return 0, str(exc)


def chat(base: str, model: str) -> dict[str, Any]:
    """One chat completion through the proxy on a fresh connection; the parsed response."""
    body = {"model": model, "messages": [{"role": "user", "content": "Capital of France?"}]}
    request = urllib.request.Request(
        f"{base}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": "Bearer any"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            result: dict[str, Any] = json.load(resp)
    except urllib.error.HTTPError as exc:
        result = {"status": exc.code, **json.loads(exc.read() or b"{}")}
    return result


def decision(response: dict[str, Any]) -> str | None:
    abstention = response.get("abstention")
    return abstention.get("decision") if isinstance(abstention, dict) else None


@contextlib.contextmanager
def running(
    command: list[str], log: Path, ready_url: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` until the block ends; fail with its log if ``ready_url`` never answers."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        status, _ = wait_for(
            lambda: http_get(ready_url, timeout=1) if proc.poll() is None else (-1, ""),
            lambda r: r[0] in (200, -1),
        )
        if status != 200:
            pytest.fail(
                f"{command[0]} not ready at {ready_url} (exit code {proc.poll()}):\n"
                + log.read_text(errors="replace")[-4000:]
            )
        yield proc
    finally:
        stop(proc, grace=15.0)


def metric_families(exposition: str) -> dict[str, str]:
    """``{family name: type}`` from the ``# TYPE`` lines of a text exposition."""
    families = {}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            families[name] = kind
    return families


def sample_total(exposition: str, name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@contextlib.contextmanager
def proxy_from_environment(policy: Path, log: Path) -> Iterator[str]:
    """``abstain serve`` with no flags, configured like the container image: ABSTAIN_*.

    Yields the base URL once ``/readyz`` answers.
    """
    port = free_port()
    env = {
        "ABSTAIN_POLICY": str(policy),
        "ABSTAIN_HOST": "127.0.0.1",
        "ABSTAIN_PORT": str(port),
        "ABSTAIN_LOG_LEVEL": "warning",
    }
    base = f"http://127.0.0.1:{port}"
    with running([*abstain_command(), "serve"], log, f"{base}/readyz", env):
        yield base


def prometheus_query(base: str, query: str) -> list[dict[str, Any]]:
    """The result vector of an instant query against Prometheus's HTTP API ([] on error)."""
    status, body = http_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    if status != 200:
        return []
    result: list[dict[str, Any]] = json.loads(body)["data"]["result"]
    return result


def scalar(result: list[dict[str, Any]]) -> float | None:
    """The value of a one-element result vector, else None."""
    return float(result[0]["value"][1]) if len(result) == 1 else None
