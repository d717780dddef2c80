"""What a rule's ``drift_psi`` does to the promise on traffic the calibration never saw.

    .venv/bin/python benchmarks/drift_action.py [--model-url URL] [--seeds 20]

The judged sets of ``shift_eval.py`` (facts-extra through the shipped prompt, as chat
requests, through another few-shot wording; NQ-open), scored by the shipped calibration
``policies/calibration/gemma-3-270m.json`` before any feedback label, are streamed in
``--seeds`` random orders through the proxy's own drift monitor
(:class:`proxy.drift_monitor.DriftMonitor`: a window of the last 500 answers; it may act
from 30 on, when an input reads PSI ≥ ``drift_psi`` 0.25 and differs from the reference
at ``--alpha``). Each answer is judged as the pipeline judges it: at the rule's
threshold t, or at its ``ood_threshold`` while
:meth:`~proxy.drift_monitor.DriftMonitor.drifted` says so, and then counted into the
window.

Per set: in how many orders the window ever read drifted, the median answer of the first
alarm, and the share of answers judged drifted; the same in the set's own file order
(facts-extra's questions come grouped by kind there, as a batch of one kind would);
per (t, ood_threshold): wrong among answered (answers), coverage and the score at t's
price, without and with ``drift_psi``, pooled over the random orders. The calibration's
reference is its own 548 facts-dev answers, so facts-extra is an independent in-domain
sample: its alarms in random orders are false ones. Prints markdown; ``--out
benchmarks/results/drift_action.md`` writes the shipped report (``--seeds 100`` for the
false-alarm counts in ``proxy/drift_monitor.py``).
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
from proxy.drift_monitor import DEFAULT_ALPHA, DriftMonitor
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
    alpha: float = DEFAULT_ALPHA,
) -> np.ndarray:
    """Whether each answer, arriving in ``order``, finds the window drifted (and so is
    judged at ``ood_threshold``), as the pipeline asks before judging it."""
    monitor = DriftMonitor(None, alpha=alpha)
    drifted = np.zeros(p.size, dtype=bool)
    for i in order:
        drifted[i] = monitor.drifted("tenant", "model", DRIFT_PSI) is not None
        verdict = Verdict(decision="answer", confidence=float(p[i]), threshold=0.5, score=None,
                          score_name="", method="logprobs", calibrated=True, tenant="tenant",
                          scores=scores[i])  # fmt: skip
        monitor.observe("tenant", "model", cal, verdict)
    return drifted


def run(
    judged: Mapping[str, Labelled], cal: Calibration, seeds: int, alpha: float = DEFAULT_ALPHA
) -> list[dict[str, Any]]:
    rows = []
    for label, data in judged.items():
        scores, p, y = _scores(data, cal)
        orders = [np.random.default_rng(s).permutation(p.size) for s in range(seeds)]
        drifted = [stream(scores, p, cal, order, alpha) for order in orders]
        # When the first alarm came: its position in the order (None: never).
        first = [
            int(np.argmax(d[o])) if d.any() else None for d, o in zip(drifted, orders, strict=True)
        ]
        # The set's own order: questions grouped by kind, as a batch of them would come.
        in_file = stream(scores, p, cal, np.arange(p.size), alpha)
        alarms = {
            "file_first": int(np.argmax(in_file)) if in_file.any() else None,
            "file_share": float(np.mean(in_file)),
            "orders": sum(f is not None for f in first),
            "first_median": float(np.median([f for f in first if f is not None]))
            if any(f is not None for f in first)
            else None,
            "share": float(np.mean(drifted)),
        }
        ys = np.tile(y, seeds)
        for t, ood in SETTINGS:
            with_drift = np.concatenate([p > np.where(d, max(t, ood), t) for d in drifted])
            rows.append({
                "set": label, "n": int(y.size), "t": t, "ood_threshold": ood, "alarms": alarms,
                "without": shift_eval.outcome(np.tile(p > t, seeds), ys, t),
                "with": shift_eval.outcome(with_drift, ys, t),
                "with_in_file_order": shift_eval.outcome(
                    p > np.where(in_file, max(t, ood), t), y, t),
            })  # fmt: skip
    return rows


def _risk(c: Mapping[str, Any]) -> str:
    risk = "–" if c["risk"] is None else f"{c['risk']:.1%}"
    return f"{risk} ({c['answered']})"


def report(rows: Sequence[Mapping[str, Any]], seeds: int, alpha: float) -> list[str]:
    lines = [
        f"drift_psi {DRIFT_PSI}, alpha {alpha:g}, the shipped calibration, no feedback; "
        f"{seeds} random orders of each set, counts pooled (answers). Score at t's price "
        "(right +1, wrong −t/(1−t)).",
        "",
        "| judged on | n | orders with an alarm | first alarm, median answer | answers judged "
        "drifted | in the file's order: first alarm, answers judged drifted | t "
        "| ood_threshold | without drift_psi: wrong among answered (answers) | coverage "
        "| score | with: wrong among answered (answers) | coverage | score | with, in the "
        "file's order: wrong among answered (answers) | coverage | score |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b, c, al = r["without"], r["with"], r["with_in_file_order"], r["alarms"]
        first = "–" if al["first_median"] is None else f"{al['first_median']:.0f}"
        in_file = "–" if al["file_first"] is None else str(al["file_first"])
        lines.append(
            f"| {r['set']} | {r['n']} | {al['orders']}/{seeds} | {first} | {al['share']:.1%} | "
            f"{in_file}, {al['file_share']:.1%} | "
            f"{r['t']} | {r['ood_threshold']} | {_risk(a)} | {a['coverage']:.1%} | "
            f"{a['score']:+.3f} | {_risk(b)} | {b['coverage']:.1%} | {b['score']:+.3f} | "
            f"{_risk(c)} | {c['coverage']:.1%} | {c['score']:+.3f} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-url", help="a running reference model (default: start one)")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="%(default)s")
    parser.add_argument("--out", type=Path, help="write the report here (default: print)")
    args = parser.parse_args(argv)
    _, judged = shift_eval.ask_sets(args.model_url)
    cal = load_calibration(calibration_eval.SHIPPED)
    rows = run(judged, cal, args.seeds, args.alpha)
    lines = report(rows, args.seeds, args.alpha)
    print("\n".join(lines))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
