"""What the proxy adds on the request path, measured side by side.

Starts the fake OpenAI-compatible upstream (tests/fake_server.py) and ``abstain serve``
in front of it (logprob confidence on), then measures, interleaving direct and proxied
requests so that machine drift hits both alike:

* added latency at concurrency 1 (p50 / p99 of proxied minus direct),
* requests per second at concurrency 32 through the proxy (and direct, for scale),
* added time to first byte for ``stream: true`` in pass-through mode,
* the proxy's resident memory when idle, and from process start to first answer.

Run:  .venv/bin/python benchmarks/overhead.py [--rounds 5] [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.procs import free_port, wait_http  # noqa: E402

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
defaults: {{threshold: 0.5, method: logprobs, score: min_logprob, streaming: passthrough}}
auth: {{unknown_keys: default, default_tenant: bench}}
tenants: {{bench: {{}}}}
"""


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


async def latency(direct: str, proxied: str, n: int) -> tuple[list[float], list[float]]:
    d, p = [], []
    async with aiohttp.ClientSession() as s:
        for _ in range(20):  # warm both connection pools
            await timed(s, direct, BODY)
            await timed(s, proxied, BODY)
        for _ in range(n):
            d.append(await timed(s, direct, BODY))
            p.append(await timed(s, proxied, BODY))
    return d, p


async def ttfb(direct: str, proxied: str, n: int) -> tuple[list[float], list[float]]:
    d, p = [], []
    async with aiohttp.ClientSession() as s:
        for _ in range(10):
            await first_byte(s, direct)
            await first_byte(s, proxied)
        for _ in range(n):
            d.append(await first_byte(s, direct))
            p.append(await first_byte(s, proxied))
    return d, p


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


def start(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)  # fmt: skip


def first_answer_seconds(policy: Path) -> tuple[float, subprocess.Popen[bytes], int]:
    """Seconds from spawning ``abstain serve`` to its first successful completion."""
    import urllib.request

    port = free_port()
    t0 = time.perf_counter()
    proc = start(["-m", "proxy.cli", "serve", "--policy", str(policy), "--port", str(port),
                  "--log-level", "warning"])  # fmt: skip
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
    args = ap.parse_args()

    up_port = free_port()
    upstream = start(["-m", "tests.fake_server", "--port", str(up_port)])
    tmp = Path(tempfile.mkdtemp())
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY.format(port=up_port))
    proxy = None
    try:
        wait_http(f"http://127.0.0.1:{up_port}/v1/models", upstream)
        startup, proxy, port = first_answer_seconds(policy)
        time.sleep(1.0)
        idle_rss = rss_mib(proxy.pid)
        direct = f"http://127.0.0.1:{up_port}/v1/chat/completions"
        proxied = f"http://127.0.0.1:{port}/v1/chat/completions"

        lat_d, lat_p, tt_d, tt_p, rps_d, rps_p = [], [], [], [], [], []
        for _ in range(args.rounds):
            d, p = asyncio.run(latency(direct, proxied, args.requests))
            lat_d += d
            lat_p += p
            d, p = asyncio.run(ttfb(direct, proxied, args.requests // 4))
            tt_d += d
            tt_p += p
            rps_d.append(asyncio.run(throughput(direct, args.concurrency, args.seconds)))
            rps_p.append(asyncio.run(throughput(proxied, args.concurrency, args.seconds)))
        busy_rss = rss_mib(proxy.pid)
    finally:
        for proc in (proxy, upstream):
            if proc is not None:
                proc.terminate()
                proc.wait(10)

    ms = 1000.0

    def row(*cells: str) -> None:
        print("| " + " | ".join(cells) + " |")

    print(f"rounds={args.rounds} sequential requests/round={args.requests} "
          f"concurrency={args.concurrency} throughput run={args.seconds}s")  # fmt: skip
    row("measure", "direct", "through proxy", "added / ratio")
    row("---", "---", "---", "---")
    for name, q in (("latency p50 (c=1)", 0.5), ("latency p99 (c=1)", 0.99)):
        d, p = pct(lat_d, q) * ms, pct(lat_p, q) * ms
        row(name, f"{d:.2f} ms", f"{p:.2f} ms", f"+{p - d:.2f} ms")
    d, p = pct(tt_d, 0.5) * ms, pct(tt_p, 0.5) * ms
    row("time to first byte p50, passthrough", f"{d:.2f} ms", f"{p:.2f} ms", f"+{p - d:.2f} ms")
    d, p = statistics.median(rps_d), statistics.median(rps_p)
    row(f"requests/s at c={args.concurrency}, median", f"{d:.0f}", f"{p:.0f}", f"{p / d:.2f}x")
    row("proxy resident memory, idle / loaded", "", f"{idle_rss:.0f} / {busy_rss:.0f} MiB", "")
    row("proxy start to first answer", "", f"{startup:.2f} s", "")


if __name__ == "__main__":
    main()
