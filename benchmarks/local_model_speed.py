"""How fast the embedded reference model answers, with the logprobs the proxy needs.

Starts the local model server (``llama-server`` through :mod:`proxy.local_model`, or
measures one already running with ``--model-url``, e.g. the old llama-cpp-python server
for a "before" column) and ``abstain serve`` in front of it, then measures:

* tokens/s of a 60-token completion without logprobs and with ``logprobs: 5`` (direct),
* time to first byte and total time of a 120-token answer streamed through the proxy,
  in ``passthrough`` mode and in ``buffer`` mode (which holds the answer until judged),
* concurrent requests: the same 60-token completion, 1 vs 4 at a time (slots),
* evaluation throughput: ``abstain eval`` on facts questions through the in-process
  proxy with the shipped calibration (``--eval-questions``, 0 to skip).

Run:  .venv/bin/python benchmarks/local_model_speed.py [--repeats 3] [--eval-questions 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from proxy import local_model
from proxy.cli import main as abstain

ROOT = Path(__file__).resolve().parents[1]
MODEL = local_model.MODEL_ALIAS
#: A prompt the model continues at length; a stop string that never occurs keeps it going
#: past line ends (the server's default stop is a newline).
PROMPT = "The history of the Roman Empire is"
NEVER = ["<<never>>"]
POLICY = """
upstreams:
  local: {{base_url: "{url}", supports_n: false, timeouts: {{connect: 2, read: 300, total: 600}}}}
models:
  {model}: {{upstream: local}}
defaults: {{threshold: 0.5, method: logprobs, score: min_logprob, streaming: {mode}}}
auth: {{unknown_keys: default, default_tenant: bench}}
tenants: {{bench: {{}}}}
"""


def completion(base: str, max_tokens: int, logprobs: int | None) -> tuple[float, int]:
    """Seconds and generated tokens for one greedy completion."""
    body: dict[str, Any] = {
        "model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens,
        "temperature": 0, "stop": NEVER,
    }  # fmt: skip
    if logprobs is not None:
        body["logprobs"] = logprobs
    t0 = time.perf_counter()
    r = httpx.post(f"{base}/completions", json=body, timeout=600)
    elapsed = time.perf_counter() - t0
    r.raise_for_status()
    return elapsed, int(r.json()["usage"]["completion_tokens"])


def tokens_per_second(base: str, max_tokens: int, logprobs: int | None, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        seconds, tokens = completion(base, max_tokens, logprobs)
        rates.append(tokens / seconds)
    return statistics.median(rates)


def streamed(proxy: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to the first answer text, total time, text chunks) of one streamed answer."""
    body = {
        "model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
        "stop": NEVER, "stream": True,
    }  # fmt: skip
    t0 = time.perf_counter()
    first: float | None = None
    chunks = 0
    with httpx.stream("POST", f"{proxy}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if any(c.get("text") for c in event.get("choices", [])):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return (first if first is not None else total), total, chunks


def concurrent_rate(base: str, max_tokens: int, parallel: int) -> float:
    """Generated tokens per second over ``parallel`` simultaneous logprob completions."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(lambda _: completion(base, max_tokens, 5), range(parallel)))
    return sum(tokens for _, tokens in results) / (time.perf_counter() - t0)


def start_proxy(url: str, mode: str, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    policy = tmp / f"policy-{mode}.yaml"
    policy.write_text(POLICY.format(url=url, model=MODEL, mode=mode))
    return serve(policy)


def serve(policy: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``abstain serve`` on a free port with ``policy``, once it is ready: (process, URL)."""
    port = local_model._free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--policy", str(policy), "--port",
         str(port), "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the proxy did not start")


def eval_throughput(url: str, questions: int, concurrency: int, tmp: Path) -> float:
    """Questions per second of ``abstain eval`` through the in-process proxy."""
    argv = [
        "eval", "--dataset", "facts-dev", "--model", MODEL, "--limit", str(questions),
        "--policy", str(ROOT / "policies" / "default.yaml"), "--upstream-url", url,
        "--no-cache", "--quiet", "--no-charts", "--concurrency", str(concurrency),
        "--out", str(tmp / "eval"),
    ]  # fmt: skip
    t0 = time.perf_counter()
    if abstain(argv) != 0:
        raise RuntimeError("abstain eval failed")
    return questions / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-url", help="an already-running model server (…/v1)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each timed request")
    ap.add_argument("--threads", type=int, help="model threads (default: all cores)")
    ap.add_argument("--slots", type=int, default=local_model.DEFAULT_SLOTS)
    ap.add_argument("--eval-questions", type=int, default=200)
    ap.add_argument("--eval-concurrency", type=int, default=local_model.DEFAULT_SLOTS)
    args = ap.parse_args()

    rows: list[tuple[str, str]] = []
    tmp = Path(tempfile.mkdtemp())
    with local_model.serving(args.model_url, threads=args.threads, slots=args.slots) as url:
        completion(url, 8, 5)  # warm up
        # Interleaved, so that load from elsewhere on the machine hits both alike.
        plain_runs, lp_runs = [], []
        for _ in range(args.repeats):
            plain_runs.append(tokens_per_second(url, 60, None, 1))
            lp_runs.append(tokens_per_second(url, 60, 5, 1))
        plain, with_lp = statistics.median(plain_runs), statistics.median(lp_runs)
        rows += [
            ("60-token completion, tokens/s without logprobs", f"{plain:.1f}"),
            ("60-token completion, tokens/s with logprobs: 5", f"{with_lp:.1f}"),
            ("ratio with / without", f"{with_lp / plain:.2f}"),
        ]
        for parallel in (1, 4):
            rate = concurrent_rate(url, 60, parallel)
            rows.append(
                (f"{parallel} concurrent logprob completions, total tokens/s", f"{rate:.1f}")
            )
        for mode in ("passthrough", "buffer"):
            proc, proxy = start_proxy(url, mode, tmp)
            try:
                streamed(proxy, 8)  # warm up
                runs = [streamed(proxy, 120) for _ in range(args.repeats)]
            finally:
                local_model.stop(proc)
            first = statistics.median(r[0] for r in runs)
            total = statistics.median(r[1] for r in runs)
            rows += [
                (f"120-token stream via proxy, {mode}: first byte", f"{first:.2f} s"),
                (f"120-token stream via proxy, {mode}: total", f"{total:.2f} s"),
            ]
        if args.eval_questions:
            qps = eval_throughput(url, args.eval_questions, args.eval_concurrency, tmp)
            label = (
                f"abstain eval, {args.eval_questions} facts-dev questions, "
                f"concurrency {args.eval_concurrency}: questions/s"
            )
            rows.append((label, f"{qps:.2f}"))

    print("| measure | value |")
    print("| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
