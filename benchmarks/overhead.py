"""What the proxy adds on the request path, measured side by side.

Starts the fake OpenAI-compatible upstream (tests/fake_server.py, run as a process from
the checkout) and ``abstain serve`` in front of it (logprob confidence on), then
measures, interleaving direct and proxied requests so that machine drift hits both alike:

* added latency at concurrency 1 (p50 / p99 of proxied minus direct),
* requests per second at concurrency 32 through the proxy (and direct, for scale),
* added time to first byte for ``stream: true`` in pass-through mode,
* the proxy's resident memory when idle, and from process start to first answer.

``--floor`` also measures ``benchmarks/floor_proxy.py``: a bare ASGI app under the same
server that only forwards, asking the upstream for the same logprobs; what it adds is
what no proxy on this stack can go below on the machine at hand.

``--redis`` also starts a loopback ``redis-server`` and measures, beside the in-memory
proxy, one with ``ABSTAIN_REDIS_URL`` set (both with generous tenant limits, so that the
shared limiter decides every request and the feedback memory writes each response to
Redis); with ``--baseline``, the baseline with Redis too.

Run:  .venv/bin/python benchmarks/overhead.py [--rounds 5] [--requests 400] [--redis] [--floor]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from proxy.local_model import wait_ready

#: The checkout: the processes run from it (``-m tests.fake_server`` needs it as cwd).
ROOT = Path(__file__).resolve().parents[1]

BODY = {
    "model": "sure",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 8,
}
POLICY = """
upstreams:
  fake: {{base_url: "http://127.0.0.1:{port}/v1"}}
models:
  sure: {{upstream: fake}}
defaults: {{threshold: 0.5, method: logprobs, score: min_logprob, streaming: passthrough{limits}}}
auth: {{unknown_keys: default, default_tenant: bench}}
tenants: {{bench: {{}}}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def timed(session: aiohttp.ClientSession, url: str, body: dict) -> float:
    t0 = time.perf_counter()
    async with session.post(url, json=body) as r:
        await r.read()
        assert r.status == 200, await r.text()
    return time.perf_counter() - t0


async def first_byte(session: aiohttp.ClientSession, url: str) -> float:
    t0 = time.perf_counter()
    async with session.post(url, json={**BODY, "stream": True}) as r:
        await r.content.readany()
        elapsed = time.perf_counter() - t0
        await r.read()
    return elapsed


async def latency(urls: list[str], n: int) -> list[list[float]]:
    """``n`` sequential requests to each URL in turn (interleaved), per URL."""
    out: list[list[float]] = [[] for _ in urls]
    async with aiohttp.ClientSession() as s:
        for _ in range(20):  # warm every connection pool
            for url in urls:
                await timed(s, url, BODY)
        for _ in range(n):
            for i, url in enumerate(urls):
                out[i].append(await timed(s, url, BODY))
    return out


async def ttfb(urls: list[str], n: int) -> list[list[float]]:
    out: list[list[float]] = [[] for _ in urls]
    async with aiohttp.ClientSession() as s:
        for _ in range(10):
            for url in urls:
                await first_byte(s, url)
        for _ in range(n):
            for i, url in enumerate(urls):
                out[i].append(await first_byte(s, url))
    return out


async def throughput(url: str, concurrency: int, seconds: float) -> float:
    done = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as s:
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await timed(s, url, BODY)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0)


#: Limits no run reaches, so that --redis exercises the shared limiter on every request.
LIMITS = ", max_concurrent_requests: 100000, rate_limit_per_second: 1000000"


def start(
    args: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    # ``-m`` puts the working directory first on sys.path: run from a baseline checkout,
    # its own ``proxy`` package is the one imported.
    return subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})  # fmt: skip


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    """A loopback redis-server without persistence, and its URL."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def first_answer_seconds(
    policy: Path, cwd: Path = ROOT, env: dict[str, str] | None = None, *, floor: bool = False
) -> tuple[float, subprocess.Popen[bytes], int]:
    """Seconds from spawning ``abstain serve`` (or the floor proxy) to its first answer."""
    import urllib.request

    port = free_port()
    t0 = time.perf_counter()
    if floor:
        args = ["-m", "uvicorn", "benchmarks.floor_proxy:app", "--port", str(port),
                "--loop", "uvloop", "--http", "httptools", "--no-access-log",
                "--log-level", "warning"]  # fmt: skip
    else:
        args = ["-m", "proxy.cli", "serve", "--policy", str(policy), "--port", str(port),
                "--log-level", "warning"]  # fmt: skip
    proc = start(args, cwd, env)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    data = __import__("json").dumps(BODY).encode()
    while True:
        try:
            req = urllib.request.Request(url, data, {"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=1) as r:
                r.read()
                return time.perf_counter() - t0, proc, port
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("the proxy exited") from None
            time.sleep(0.01)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each measurement")
    ap.add_argument("--requests", type=int, default=400, help="sequential requests per round")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each throughput run")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. `git worktree add /tmp/before HEAD~1`) whose proxy is "
        "measured in the same run, interleaved, as 'before'",
    )
    ap.add_argument(
        "--redis",
        action="store_true",
        help="also measure this checkout with ABSTAIN_REDIS_URL set (starts a loopback "
        "redis-server), beside the in-memory proxy",
    )
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also measure benchmarks/floor_proxy.py, a bare forwarder on the same server: "
        "the least any proxy on this stack adds here",
    )
    args = ap.parse_args()

    up_port = free_port()
    upstream = start(["-m", "tests.fake_server", "--port", str(up_port)])
    tmp = Path(tempfile.mkdtemp())
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY.format(port=up_port, limits=LIMITS if args.redis else ""))
    # (label, checkout, environment); the current checkout comes after the baseline.
    proxies: list[tuple[str, Path, dict[str, str]]] = []
    if args.floor:
        proxies.append(("floor", ROOT, {"FLOOR_UPSTREAM": f"http://127.0.0.1:{up_port}/v1"}))
    if args.baseline:
        proxies.append(("before", args.baseline.resolve(), {}))
    proxies.append(("this checkout" if args.baseline else "through proxy", ROOT, {}))
    procs: list[subprocess.Popen[bytes]] = []
    if args.redis:
        redis_proc, redis_url = start_redis()
        procs.append(redis_proc)
        redis_env = {"ABSTAIN_REDIS_URL": redis_url}
        if args.baseline:
            # The same Redis: the tenant's keys are shared, as two deployments' would be.
            proxies.append(("before, with Redis", args.baseline.resolve(), redis_env))
        proxies.append(("with Redis", ROOT, redis_env))
    try:
        wait_ready(f"http://127.0.0.1:{up_port}/v1", upstream, timeout=30)
        urls = [f"http://127.0.0.1:{up_port}/v1/chat/completions"]
        startups, idle = [], []
        for label, checkout, env in proxies:
            floor = label == "floor"
            startup, proc, port = first_answer_seconds(policy, checkout, env, floor=floor)
            procs.append(proc)
            startups.append(startup)
            urls.append(f"http://127.0.0.1:{port}/v1/chat/completions")
        time.sleep(1.0)
        proxy_procs = procs[1:] if args.redis else procs
        idle = [rss_mib(p.pid) for p in proxy_procs]

        lat: list[list[float]] = [[] for _ in urls]
        first: list[list[float]] = [[] for _ in urls]
        rps: list[list[float]] = [[] for _ in urls]
        for r in range(args.rounds):
            for i, values in enumerate(asyncio.run(latency(urls, args.requests))):
                lat[i] += values
            for i, values in enumerate(asyncio.run(ttfb(urls, args.requests // 4))):
                first[i] += values
            # Each round starts the throughput runs with another URL, so no one of them
            # always runs first (or last) on a machine that warms up or heats up.
            for k in range(len(urls)):
                i = (k + r) % len(urls)
                rps[i].append(asyncio.run(throughput(urls[i], args.concurrency, args.seconds)))
        busy = [rss_mib(p.pid) for p in proxy_procs]
    finally:
        for proc in (*procs, upstream):
            proc.terminate()
            proc.wait(10)

    ms = 1000.0

    def row(*cells: str) -> None:
        print("| " + " | ".join(cells) + " |")

    print(f"rounds={args.rounds} sequential requests/round={args.requests} "
          f"concurrency={args.concurrency} throughput run={args.seconds}s")  # fmt: skip
    labels = [label for label, _, _ in proxies]
    row("measure", "direct", *labels, *(f"added / ratio, {label}" for label in labels))
    row(*["---"] * (2 + 2 * len(labels)))
    for name, q in (("latency p50 (c=1)", 0.5), ("latency p99 (c=1)", 0.99)):
        d, *ps = (pct(values, q) * ms for values in lat)
        row(name, f"{d:.2f} ms", *(f"{p:.2f} ms" for p in ps), *(f"+{p - d:.2f} ms" for p in ps))
    d, *ps = (pct(values, 0.5) * ms for values in first)
    row("time to first byte p50, passthrough", f"{d:.2f} ms", *(f"{p:.2f} ms" for p in ps),
        *(f"+{p - d:.2f} ms" for p in ps))  # fmt: skip
    d, *ps = (statistics.median(values) for values in rps)
    row(f"requests/s at c={args.concurrency}, median", f"{d:.0f}", *(f"{p:.0f}" for p in ps),
        *(f"{p / d:.2f}x" for p in ps))  # fmt: skip
    memory = (f"{i:.0f} / {b:.0f} MiB" for i, b in zip(idle, busy, strict=True))
    row("proxy resident memory, idle / loaded", "", *memory, *[""] * len(labels))
    row("proxy start to first answer", "", *(f"{s:.2f} s" for s in startups), *[""] * len(labels))


if __name__ == "__main__":
    main()
