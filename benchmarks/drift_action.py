"""What a rule's ``drift_psi`` does to the promise on traffic the calibration never saw.

    .venv/bin/python benchmarks/drift_action.py [--model-url URL] [--seeds 20]

The judged sets of ``shift_eval.py`` (facts-extra through the shipped prompt, as chat
requests, through another few-shot wording; NQ-open), scored by the shipped calibration
``policies/calibration/gemma-3-270m.json`` before any feedback label, are streamed in
``--seeds`` random orders through the proxy's own drift monitor
(:class:`proxy.drift_monitor.DriftMonitor`: a window of the last 500 answers, acting from
200 on). Each answer is judged as the pipeline judges it: at the rule's threshold t, or
at its ``ood_threshold`` while :meth:`~proxy.drift_monitor.DriftMonitor.drifted` reads
the window at ``drift_psi`` 0.25 or more, and then counted into the window.

Per set and (t, ood_threshold): wrong among answered (answers), coverage and the score
at t's price, without and with ``drift_psi``, pooled over the orders, and the share of
answers judged drifted. The calibration's reference is its own 548 facts-dev answers, so
facts-extra is an independent in-domain sample. Prints markdown and writes
``benchmarks/results/drift_action.md``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import calibration_eval, shift_eval
from proxy.confidence.calibration import Calibration, load_calibration
from proxy.drift_monitor import DriftMonitor
from proxy.evaluation.calibrate import Labelled
from proxy.verdict import Verdict

DRIFT_PSI = 0.25
#: (t, ood_threshold) pairs measured
SETTINGS = ((0.5, 0.75), (0.5, 0.9), (0.75, 0.9))


def _scores(
    data: Labelled, cal: Calibration
) -> tuple[list[dict[str, float]], np.ndarray, np.ndarray]:
    """Every answer's calibration inputs, its shipped P(correct), and its label."""
    names = cal.inputs
    X = np.column_stack([data.features[n] for n in names])
    keep = ~np.isnan(X).any(axis=1)
    scores = [dict(zip(names, map(float, row), strict=True)) for row in X[keep]]
    p = np.array([cal(s) for s in scores], dtype=np.float64)
    return scores, p, data.correct[keep]


def stream(
    scores: Sequence[Mapping[str, float]],
    p: np.ndarray,
    cal: Calibration,
    order: np.ndarray,
    t: float,
    ood: float,
) -> np.ndarray:
    """The threshold each answer is judged at, in ``order``, as the pipeline would."""
    monitor = DriftMonitor(None)
    judged_at = np.empty(p.size)
    for i in order:
        drifted = monitor.drifted("tenant", "model", DRIFT_PSI) is not None
        judged_at[i] = max(t, ood) if drifted else t
        verdict = Verdict(decision="answer", confidence=float(p[i]), threshold=t, score=None,
                          score_name="", method="logprobs", calibrated=True, tenant="tenant",
                          scores=scores[i])  # fmt: skip
        monitor.observe("tenant", "model", cal, verdict)
    return judged_at


def run(judged: Mapping[str, Labelled], cal: Calibration, seeds: int) -> list[dict[str, Any]]:
    rows = []
    for label, data in judged.items():
        scores, p, y = _scores(data, cal)
        for t, ood in SETTINGS:
            at = [stream(scores, p, cal, np.random.default_rng(s).permutation(p.size), t, ood)
                  for s in range(seeds)]  # fmt: skip
            ys = np.tile(y, seeds)
            with_drift = np.concatenate([p > a for a in at])
            rows.append({
                "set": label, "n": int(y.size), "t": t, "ood_threshold": ood,
                "without": shift_eval.outcome(np.tile(p > t, seeds), ys, t),
                "with": shift_eval.outcome(with_drift, ys, t),
                "drifted_share": float(np.mean(np.concatenate(at) > t)),
            })  # fmt: skip
    return rows


def _risk(c: Mapping[str, Any]) -> str:
    risk = "–" if c["risk"] is None else f"{c['risk']:.1%}"
    return f"{risk} ({c['answered']})"


def report(rows: Sequence[Mapping[str, Any]], seeds: int) -> list[str]:
    lines = [
        f"drift_psi {DRIFT_PSI}, the shipped calibration, no feedback; {seeds} random orders "
        "of each set, counts pooled (answers). Score at t's price (right +1, wrong "
        "−t/(1−t)).",
        "",
        "| judged on | n | t | ood_threshold | answers judged drifted | without drift_psi: "
        "wrong among answered (answers) | coverage | score | with: wrong among answered "
        "(answers) | coverage | score |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["without"], r["with"]
        lines.append(
            f"| {r['set']} | {r['n']} | {r['t']} | {r['ood_threshold']} | "
            f"{r['drifted_share']:.1%} | {_risk(a)} | {a['coverage']:.1%} | "
            f"{a['score']:+.3f} | {_risk(b)} | {b['coverage']:.1%} | {b['score']:+.3f} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-url", help="a running reference model (default: start one)")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=shift_eval.RESULTS)
    args = parser.parse_args(argv)
    _, judged = shift_eval.ask_sets(args.model_url)
    cal = load_calibration(calibration_eval.SHIPPED)
    rows = run(judged, cal, args.seeds)
    lines = report(rows, args.seeds)
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drift_action.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
