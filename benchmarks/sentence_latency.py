"""Time to first byte of a three-sentence answer in ``streaming: sentence`` mode.

Starts the local model (``llama-server`` through :mod:`proxy.local_model`, or uses one
already running with ``--model-url``) and one ``abstain serve`` per streaming mode in
front of it (sentence, buffer, passthrough), then streams the same greedy three-sentence
answer (a few-shot "Tell me about France" prompt; about 20 tokens) through each, the
modes interleaved run by run so that load from elsewhere hits them alike. It prints the
medians of:

* time to first byte (the first byte of answer text, not a keep-alive) per mode;
* the time the first sentence took to generate: in the passthrough runs, when the chunk
  carrying its last character arrived (the target is sentence-mode TTFB within that plus
  50 ms; sentence mode must also see the next token to know the sentence has ended);
* total time per mode.

Then a micro-benchmark of the hot path in µs per answer, on a typical 3-sentence,
60-token answer with top-5 logprobs: the judge's own work (split, per-sentence scores,
per-sentence verdicts and the rewrite), and the sentence stream's per-choice work over
the same answer arriving one token per chunk (evidence, incremental splitting and
judging, placing the text), without the network.

Run:  .venv/bin/python benchmarks/sentence_latency.py [--repeats 7] [--model-url URL]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):
    # Run as a script (python benchmarks/sentence_latency.py): the sibling benchmarks are
    # imported as the ``benchmarks`` package, from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.local_model_speed import serve
from proxy import local_model
from proxy.confidence.spans import segment_scores
from proxy.evidence import StreamEvidence
from proxy.judge import judge_call, judge_sentences, summarize, verdict_on
from proxy.policy.loading import parse_policy
from proxy.rewrite import rewrite_sentences
from proxy.sentence_choice import SentenceChoice
from proxy.sentences import split

ROOT = Path(__file__).resolve().parents[1]
MODEL = local_model.MODEL_ALIAS
CALIBRATION = ROOT / "policies" / "calibration" / "gemma-3-270m-sentence.json"
FEW_SHOT = (
    "Q: Tell me about Italy.\n"
    "A: Italy is a country in Europe. Its capital is Rome. Its currency is the euro.\n"
    "Q: Tell me about Japan.\n"
    "A: Japan is a country in Asia. Its capital is Tokyo. Its currency is the yen.\n"
    "Q: Tell me about Egypt.\n"
    "A: Egypt is a country in Africa. Its capital is Cairo. Its currency is the Egyptian pound.\n"
)
PROMPT = FEW_SHOT + "Q: Tell me about France.\nA:"
MODES = ("sentence", "buffer", "passthrough")
POLICY = """
upstreams:
  local: {{base_url: "{url}", supports_n: false, timeouts: {{connect: 2, read: 300, total: 600}}}}
models:
  {model}: {{upstream: local, calibration: "{calibration}", granularity: sentence}}
defaults: {{threshold: 0.5, action: abstain, streaming: {mode}}}
auth: {{unknown_keys: default, default_tenant: bench}}
tenants: {{bench: {{}}}}
"""


def start_proxy(url: str, mode: str, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    policy = tmp / f"policy-{mode}.yaml"
    policy.write_text(POLICY.format(url=url, model=MODEL, mode=mode, calibration=CALIBRATION))
    return serve(policy)


def streamed(proxy: str) -> dict[str, Any]:
    """One streamed answer: first text byte, total, and each text chunk's arrival."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "stop": ["\n"],
            "temperature": 0, "stream": True}  # fmt: skip
    arrivals: list[tuple[float, str]] = []
    verdict: dict[str, Any] = {}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{proxy}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices") or ():
                if choice.get("text"):
                    arrivals.append((time.perf_counter() - t0, choice["text"]))
            if "abstention" in event:
                verdict = event["abstention"] or {}
    total = time.perf_counter() - t0
    text = "".join(t for _, t in arrivals)
    return {"first": arrivals[0][0] if arrivals else total, "total": total, "text": text,
            "arrivals": arrivals, "verdict": verdict}  # fmt: skip


def first_sentence_time(run: dict[str, Any]) -> float:
    """When the chunk carrying the first sentence's last character arrived."""
    segments = split(run["text"])
    end = segments[0].end if segments else len(run["text"])
    at = 0
    for when, piece in run["arrivals"]:
        at += len(piece)
        if at >= end:
            return float(when)
    return float(run["total"])


# ---------------------------------------------------------------- hot path


#: A typical answer: three sentences, 60 tokens, the third one unsure of its fact.
SENTENCES = [
    " The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
    " It was designed by the engineering company of Gustave Eiffel and built from 1887 to 1889.",
    " It is about 330 metres tall and was the tallest man-made structure in the world until 1930.",
]


#: Words a tokenizer would cut in pieces (a 60-token answer in all).
_PIECES = {"wrought-iron": ["wrought", "-", "iron"], "man-made": ["man", "-", "made"],
           "1887": ["18", "87"], "1889": ["18", "89"],
           "1930": ["19", "30"]}  # fmt: skip


def typical_answer() -> tuple[list[str], list[float], list[list[float]]]:
    """Tokens (as a completions answer: a leading space), logprobs and top-5 lists."""
    tokens: list[str] = []
    for sentence in SENTENCES:
        for word in sentence.replace(".", " .").replace(",", " ,").split():
            for i, piece in enumerate(_PIECES.get(word, [word])):
                glued = piece in (".", ",", "-") or i > 0 or (tokens and tokens[-1] == "-")
                tokens.append(piece if glued else " " + piece)
    assert len(tokens) == 60 and "".join(tokens) == "".join(SENTENCES), len(tokens)
    lps = [math.log(0.003) if "330" in t else math.log(0.98) for t in tokens]
    tops = [
        [lp, lp - 5, lp - 6, lp - 7, lp - 8] if lp > -1 else [-1.2, lp, -2.5, -3, -3.5]
        for lp in lps
    ]
    return tokens, lps, tops


def micro(iterations: int) -> list[tuple[str, str]]:
    policy = parse_policy(
        f"""
upstreams: {{u: {{base_url: "http://127.0.0.1:9/v1"}}}}
models: {{m: {{upstream: u, granularity: sentence, calibration: "{CALIBRATION}"}}}}
"""
    )
    rule = policy.rule(None, "m")
    tokens, lps, tops = typical_answer()
    text = "".join(tokens)

    def judge() -> None:
        segments = split(text)
        scores = segment_scores(segments, text, tokens, lps, tops)
        assert scores is not None
        parts = judge_sentences(segments, scores, rule, sent=False)
        verdict = summarize(parts, rule, verdict_on({"min_logprob": min(lps)}, rule))
        rewrite_sentences(text, verdict, rule)

    chunks = [
        {"index": 0, "text": t, "finish_reason": None,
         "logprobs": {"content": [{"token": t, "logprob": lp,
                                   "top_logprobs": [{"token": t, "logprob": x} for x in top]}]}}
        for t, lp, top in zip(tokens, lps, tops, strict=True)
    ]  # fmt: skip

    def stream_path() -> None:
        evidence = StreamEvidence("completions", keep_tokens=True)
        choice = SentenceChoice(0, "completions", keep_entries=False, rule=rule)
        for chunk in chunks:
            evidence.add(chunk)
            if choice.read(chunk):
                choice.advance(lambda: evidence.live_tokens(0))
                choice.take()
        final = evidence.evidence(json_mode=False)
        final.already_sent = False
        verdict = judge_call(final, rule)[0]  # what the pipeline judges at the end
        tail = final.choices[0].tokens
        choice.settle(verdict, tail)
        choice.finish(verdict)
        choice.take()

    def best(fn: Any) -> float:
        runs = timeit.repeat(fn, number=iterations, repeat=5)
        return min(runs) / iterations * 1e6

    parts = judge_sentences(
        split(text),
        segment_scores(split(text), text, tokens, lps, tops) or [],
        rule,
        sent=False,
    )
    decisions = ", ".join(p.decision for p in parts)
    return [
        (f"hot path: split + segment_scores + judge_sentences + rewrite ({decisions})",
         f"{best(judge):.0f} µs/answer"),
        ("hot path: the sentence stream's per-choice work, 60 one-token chunks",
         f"{best(stream_path):.0f} µs/answer"),
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-url", help="an already-running model server (…/v1)")
    ap.add_argument("--repeats", type=int, default=7, help="runs per mode (median reported)")
    ap.add_argument("--threads", type=int, help="model threads (default: all cores)")
    ap.add_argument("--micro-iterations", type=int, default=2000)
    args = ap.parse_args()

    rows: list[tuple[str, str]] = []
    tmp = Path(tempfile.mkdtemp())
    with local_model.serving(args.model_url, threads=args.threads) as url:
        procs: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        try:
            for mode in MODES:
                procs[mode] = start_proxy(url, mode, tmp)
            for mode in MODES:
                streamed(procs[mode][1])  # warm up (and fill the model's prompt cache)
            runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
            for _ in range(args.repeats):
                for mode in MODES:
                    runs[mode].append(streamed(procs[mode][1]))
        finally:
            for proc, _ in procs.values():
                local_model.stop(proc)
    sample = runs["sentence"][0]
    rows.append(("answer (sentence mode, as received)", repr(sample["text"])))
    decisions = [p["decision"] for p in sample["verdict"].get("sentences") or []]
    rows.append(("its sentences' decisions", ", ".join(decisions) or "none"))
    first_sentence = statistics.median(first_sentence_time(r) for r in runs["passthrough"])
    rows.append(("first sentence generated (passthrough: its last chunk arrived)",
                 f"{first_sentence * 1000:.0f} ms"))  # fmt: skip
    ttfb = {mode: statistics.median(r["first"] for r in runs[mode]) for mode in MODES}
    for mode in MODES:
        total = statistics.median(r["total"] for r in runs[mode])
        rows.append((f"{mode}: time to first text byte", f"{ttfb[mode] * 1000:.0f} ms"))
        rows.append((f"{mode}: total", f"{total * 1000:.0f} ms"))
    gap = (ttfb["sentence"] - first_sentence) * 1000
    verdict = "met" if gap <= 50 else "missed"
    rows.append(("sentence TTFB - first sentence (target ≤ 50 ms)", f"{gap:+.0f} ms ({verdict})"))
    rows += micro(args.micro_iterations)

    print(f"medians of {args.repeats} runs per mode")
    print("| measure | value |")
    print("| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
