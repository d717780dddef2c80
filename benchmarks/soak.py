"""A bounded soak: mixed traffic with faults and disconnects, RSS over time, errors by kind.

Starts its own fault-injecting upstream (benchmarks/fault_upstream.py) and ``abstain
serve`` in front of it, then for ``--minutes`` runs ``--concurrency`` clients sending a
weighted mix of models (good, slow, 500, 503, malformed logprobs, a 40 MiB answer, a
trickle, a reset) × chat/completions × stream true/false, under both ``streaming:
buffer`` and ``streaming: passthrough``. A fraction of requests is cancelled by the client
after 0-300 ms, and a few hostile bodies (invalid JSON, unknown model, n=500) are mixed
in. Afterwards ``--huge-rounds`` rounds of ``--huge-burst`` concurrent 40 MiB answers are
requested, to see what the response cap leaves in memory.

Prints the proxy's RSS every 5 s, peak (VmHWM) and final RSS, requests/s and the
outcomes by kind; exits non-zero if the proxy died, /healthz did not answer at the end,
or a request got a 500 from the proxy itself.

Run:  .venv/bin/python benchmarks/soak.py [--minutes 3] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

#: behaviour -> weight in the mix (the slow and trickle ones hold a client for 2-10 s).
BEHAVIOURS = {
    "good": 50,
    "slow": 6,
    "error-500": 6,
    "error-503": 6,
    "malformed": 6,
    "huge": 2,
    "trickle": 1,
    "reset": 6,
}
HOSTILE_SHARE = 0.03
DISCONNECT_SHARE = 0.10
RSS_INTERVAL = 5.0
CLIENT_TIMEOUT = 30.0

POLICY = """
upstreams:
  faults:
    base_url: "http://127.0.0.1:{port}/v1"
    timeouts: {{connect: 2, read: 5, total: 10}}
    retries: {{max_retries: 1, backoff_base_seconds: 0.05, backoff_max_seconds: 0.2}}
    circuit_breaker: {{failure_threshold: 0}}
models:
{models}
defaults: {{threshold: 0.5, method: logprobs, score: min_logprob, streaming: buffer}}
auth: {{unknown_keys: default, default_tenant: bench}}
tenants: {{bench: {{}}}}
"""

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status(pid: int, key: str) -> float:
    """A ``/proc/<pid>/status`` memory field (VmRSS, VmHWM) in MiB; NaN once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def policy_text(up_port: int) -> str:
    lines = []
    for behaviour in BEHAVIOURS:
        lines.append(f"  {behaviour}: {{upstream: faults}}")
        lines.append(
            f"  {behaviour}-pt: {{upstream: faults, upstream_model: {behaviour}-pt, "
            "streaming: passthrough}"
        )
    return POLICY.format(port=up_port, models="\n".join(lines))


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                r.read()
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


class Request:
    """One request of the mix: its label (for the breakdown), path and raw body."""

    def __init__(self, label: str, path: str, data: bytes, stream: bool) -> None:
        self.label, self.path, self.data, self.stream = label, path, data, stream


def pick(rng: random.Random) -> Request:
    if rng.random() < HOSTILE_SHARE:
        which = rng.choice(["invalid-json", "unknown-model", "n=500"])
        body: dict = {"model": "good", "messages": MESSAGES}
        if which == "invalid-json":
            return Request("hostile invalid-json", "/v1/chat/completions", b'{"model": "go', False)
        if which == "unknown-model":
            body["model"] = "no-such-model"
        else:
            body["n"] = 500
        return Request(f"hostile {which}", "/v1/chat/completions", json.dumps(body).encode(), False)
    behaviour = rng.choices(list(BEHAVIOURS), weights=list(BEHAVIOURS.values()))[0]
    mode = rng.choice(["buffer", "passthrough"])
    model = behaviour if mode == "buffer" else behaviour + "-pt"
    kind = rng.choice(["chat", "completions"])
    stream = rng.random() < 0.5
    body = {"model": model, "max_tokens": 8, "stream": stream}
    if kind == "chat":
        body["messages"] = MESSAGES
        path = "/v1/chat/completions"
    else:
        body["prompt"] = "The capital of France is"
        path = "/v1/completions"
    label = f"{behaviour} {kind} {'stream' if stream else 'json'} {mode}"
    return Request(label, path, json.dumps(body).encode(), stream)


async def read_stream(resp: aiohttp.ClientResponse) -> str:
    """What a 200 stream came to: ok, an error event, or cut short."""
    error = False
    done = False
    buf = b""
    async for line in resp.content:
        buf = line.strip()
        if not buf.startswith(b"data:"):
            continue
        payload = buf[5:].strip()
        if payload == b"[DONE]":
            done = True
            continue
        try:
            chunk = json.loads(payload)
        except ValueError:
            return "200 stream, unreadable chunk"
        if isinstance(chunk, dict) and "error" in chunk:
            error = True
    if error:
        return "200 stream ended with error event"
    return "200 stream ok" if done else "200 stream cut short (no [DONE])"


async def send(session: aiohttp.ClientSession, base: str, req: Request) -> str:
    headers = {"content-type": "application/json"}
    async with session.post(base + req.path, data=req.data, headers=headers) as resp:
        if resp.status == 200 and req.stream:
            if not resp.content_type.startswith("text/event-stream"):
                await resp.read()
                return f"200 stream answered as {resp.content_type}"
            return await read_stream(resp)
        raw = await resp.read()
        if resp.status == 200:
            try:
                data = json.loads(raw)
                assert isinstance(data["choices"], list) and data["choices"]
            except (ValueError, KeyError, TypeError, AssertionError):
                return "200 with an invalid body"
            return "200 ok"
        return f"http {resp.status}"


async def one(
    session: aiohttp.ClientSession, base: str, req: Request, hang_up_after: float | None
) -> str:
    """The request's outcome; with ``hang_up_after`` the client gives up after that long."""
    try:
        if hang_up_after is not None:
            try:
                return await asyncio.wait_for(send(session, base, req), hang_up_after)
            except TimeoutError:
                return "disconnected by us"
        return await asyncio.wait_for(send(session, base, req), CLIENT_TIMEOUT)
    except TimeoutError:
        return "client timeout"
    except aiohttp.ClientError as exc:
        return f"client error ({type(exc).__name__})"


class Stats:
    def __init__(self) -> None:
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.by_label: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.done = 0
        #: requests sent with a disconnect timer (those that finished first count as usual)
        self.armed = 0

    def add(self, label: str, outcome: str) -> None:
        self.outcomes[outcome] += 1
        self.by_label[label][outcome] += 1
        self.done += 1


async def sample_rss(
    pid: int, t0: float, stop: asyncio.Event, rows: list[tuple[float, float, int]], stats: Stats
) -> None:
    while not stop.is_set():
        rows.append((time.monotonic() - t0, proc_status(pid, "VmRSS"), stats.done))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RSS_INTERVAL)


async def soak(base: str, pid: int, args: argparse.Namespace) -> tuple[Stats, list, float, dict]:
    rng = random.Random(args.seed)
    stats = Stats()
    rows: list[tuple[float, float, int]] = []
    connector = aiohttp.TCPConnector(limit=args.concurrency * 2)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.monotonic()
        stop_at = t0 + args.minutes * 60
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(pid, t0, stop, rows, stats))

        async def worker(seed: int) -> None:
            wrng = random.Random(seed)
            # Bounded by time, and by count as a second guard.
            for _ in range(10_000_000):
                if time.monotonic() >= stop_at:
                    return
                req = pick(wrng)
                hang_up = wrng.uniform(0, 0.3) if wrng.random() < DISCONNECT_SHARE else None
                stats.armed += hang_up is not None
                stats.add(req.label, await one(session, base, req, hang_up))

        await asyncio.gather(*(worker(rng.randrange(1 << 30)) for _ in range(args.concurrency)))
        elapsed = time.monotonic() - t0
        stop.set()
        await sampler
        rows.append((time.monotonic() - t0, proc_status(pid, "VmRSS"), stats.done))

        # The response cap, tested all at once: every huge answer is refused. Several
        # rounds tell memory that is kept for reuse (flat after the first) from a leak.
        huge = [
            Request("burst huge", "/v1/chat/completions",
                    json.dumps({"model": "huge", "messages": MESSAGES}).encode(), False),
            Request("burst huge", "/v1/completions",
                    json.dumps({"model": "huge", "prompt": "x"}).encode(), False),
        ]  # fmt: skip
        burst: list[tuple[float, collections.Counter[str]]] = []
        for _ in range(args.huge_rounds):
            results = await asyncio.gather(
                *(one(session, base, huge[i % 2], None) for i in range(args.huge_burst))
            )
            await asyncio.sleep(2)
            burst.append((proc_status(pid, "VmRSS"), collections.Counter(results)))
        await asyncio.sleep(5)
        burst.append((proc_status(pid, "VmRSS"), collections.Counter()))
    return stats, rows, elapsed, burst


def healthz(base: str) -> str:
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
            r.read()
            return f"{r.status}"
    except OSError as exc:
        return f"failed ({exc})"


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    # Output to a file, not a pipe: a pipe nobody reads would block a chatty child.
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--huge-burst", type=int, default=16, help="concurrent huge answers at the end")
    ap.add_argument("--huge-rounds", type=int, default=3, help="rounds of the huge burst")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--breakdown", action="store_true", help="outcomes per request kind too")
    args = ap.parse_args()

    up_port, port = free_port(), free_port()
    tmp = Path(tempfile.mkdtemp())
    upstream = start([str(HERE / "fault_upstream.py"), "--port", str(up_port)], tmp / "up.log")
    policy = tmp / "policy.yaml"
    policy.write_text(policy_text(up_port))
    proxy = start(["-m", "proxy.cli", "serve", "--policy", str(policy), "--port", str(port),
                   "--log-level", "warning"], tmp / "proxy.log")  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"http://127.0.0.1:{up_port}/v1/models", upstream, 30)
        wait_http(base + "/healthz", proxy, 60)
        idle = proc_status(proxy.pid, "VmRSS")
        stats, rows, elapsed, burst = asyncio.run(soak(base, proxy.pid, args))
        health = healthz(base)
        alive = proxy.poll() is None
        peak = proc_status(proxy.pid, "VmHWM")
        final = proc_status(proxy.pid, "VmRSS")
    finally:
        stop(proxy)
        stop(upstream)

    print(f"soak: {args.minutes} min, concurrency {args.concurrency}, seed {args.seed}")
    print(f"requests: {stats.done} in {elapsed:.1f} s = {stats.done / elapsed:.1f} requests/s")
    print()
    print("| t (s) | RSS (MiB) | requests done |")
    print("|---:|---:|---:|")
    for t, rss, done in rows:
        print(f"| {t:.0f} | {rss:.1f} | {done} |")
    print()
    print(f"idle RSS before traffic: {idle:.1f} MiB")
    print(f"RSS at end of mixed traffic: {rows[-1][1]:.1f} MiB")
    print(
        f"huge burst, {args.huge_rounds} rounds of {args.huge_burst} concurrent 40 MiB "
        f"answers; RSS 2 s after each round: "
        + ", ".join(f"{rss:.1f}" for rss, _ in burst[:-1])
        + f" MiB; 5 s later {burst[-1][0]:.1f} MiB; outcomes: "
        + ", ".join(
            f"{k}: {v}" for k, v in sum((c for _, c in burst), collections.Counter()).items()
        )
    )
    print(f"peak RSS (VmHWM): {peak:.1f} MiB, final RSS: {final:.1f} MiB")
    print(f"/healthz at end: {health}; proxy alive: {alive}")
    print(f"disconnect timers armed: {stats.armed} (0-300 ms; the rest finished in time)")
    print()
    print("| outcome | count |")
    print("|---|---:|")
    for outcome, count in stats.outcomes.most_common():
        print(f"| {outcome} | {count} |")
    if args.breakdown:
        print()
        print("| request kind | outcomes |")
        print("|---|---|")
        for label in sorted(stats.by_label):
            cells = ", ".join(f"{o}: {c}" for o, c in stats.by_label[label].most_common())
            print(f"| {label} | {cells} |")
    server_errors = [o for o in stats.outcomes if o == "http 500"]
    up_lines = (tmp / "up.log").read_text("utf-8", "replace").strip().splitlines()
    print(f"fault upstream log ({tmp / 'up.log'}): {len(up_lines)} lines")
    tail = (tmp / "proxy.log").read_text("utf-8", "replace").strip().splitlines()
    if tail:
        print()
        print(f"proxy log ({tmp / 'proxy.log'}): {len(tail)} lines; last ones:")
        for line in tail[-10:]:
            print("  " + line[:300])
    failed = not alive or not health.startswith("200") or bool(server_errors)
    if failed:
        print("FAILED: " + ", ".join(
            what for what, bad in (("the proxy died", not alive),
                                   (f"/healthz {health}", not health.startswith("200")),
                                   ("a request got a 500", bool(server_errors))) if bad
        ))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
