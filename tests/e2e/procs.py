"""Start and stop real server processes for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from proxy.local_model import stop

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"process exited with {proc.returncode}:\n{out}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@contextlib.contextmanager
def running(
    args: list[str], ready_url: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(ready_url, proc)
        yield proc
    finally:
        stop(proc)


@contextlib.contextmanager
def fake_upstream() -> Iterator[str]:
    port = free_port()
    with running(
        ["-m", "tests.fake_server", "--port", str(port)], f"http://127.0.0.1:{port}/v1/models"
    ):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def proxy(
    policy: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    args = ["-m", "proxy.cli", "serve", "--policy", str(policy), "--port", str(port)]
    with running(args, f"http://127.0.0.1:{port}/readyz", env) as proc:
        yield f"http://127.0.0.1:{port}", proc
