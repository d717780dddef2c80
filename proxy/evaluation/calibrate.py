"""The ``abstain calibrate`` workflow: graded answers in, a calibration file out.

Answers (asked by :mod:`proxy.evaluation.runner`, or read back from the proxy's decision
log) are turned into one array per raw score plus a right/wrong array; every requested
(score, calibrator) pair is judged on held-out folds by :func:`proxy.confidence.fitting.select`;
the best one, refitted on every answer, becomes the file the proxy loads. The file's
``metrics`` are the held-out (out-of-fold) ones, never the in-sample fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy.confidence.calibration import Calibration, Calibrator
from proxy.confidence.fitting import Candidate
from proxy.evaluation.datasets import Question
from proxy.evaluation.grading import Grader
from proxy.evaluation.runner import Generation

Array = npt.NDArray[np.float64]


@dataclass
class Labelled:
    """Raw scores (NaN where an answer lacks one) and 0/1 correctness, row by row."""

    features: dict[str, Array]
    correct: Array
    failed: int = 0  # questions whose request failed (left out)

    @property
    def n(self) -> int:
        return int(self.correct.size)


def label(
    questions: Sequence[Question], generations: Sequence[Generation], grader: Grader
) -> Labelled:
    """Grade every answered question and collect every score the proxy computes."""
    gold = {q.id: q.answers for q in questions}
    ok = [g for g in generations if g.error is None]
    scores = [g.scores for g in ok]
    names = sorted({n for s in scores for n in s})
    features = {n: np.array([s.get(n, np.nan) for s in scores], dtype=np.float64) for n in names}
    correct = np.array([1.0 if grader(g.text, gold[g.id]) else 0.0 for g in ok])
    return Labelled(features, correct, failed=len(generations) - len(ok))


def build_calibration(
    best: Candidate,
    calibrator: Calibrator,
    *,
    method: str,
    model: str | None,
    fitted_on: Mapping[str, Any],
    folds: int,
) -> Calibration:
    """The calibration file's content, with held-out metrics before and after fitting."""
    metrics: dict[str, Any] = {
        **best.after.to_dict(),
        "held_out": True,
        "folds": folds,
        "before": best.before.to_dict(),
    }
    if best.features:
        metrics["features"] = list(best.features)
    return Calibration(
        score=best.score,
        calibrator=calibrator,
        method=method,
        model=model,
        fitted_on={"date": datetime.now(UTC).strftime("%Y-%m-%d"), "n": best.n, **fitted_on},
        metrics=metrics,
    )


def ranking_table(ranked: Sequence[Candidate], criterion: str) -> str:
    """Every candidate's held-out metrics before → after calibration, best first."""
    head = (
        f"{'score':<14} {'calibrator':<10} {'n':>5}  {'AUROC':>13}  {'ECE':>13}  "
        f"{'Brier':>13}  {'log loss':>13}"
    )
    lines = [head, "-" * len(head)]
    for c in ranked:

        def pair(name: str, c: Candidate = c) -> str:
            return f"{getattr(c.before, name):6.3f}→{getattr(c.after, name):6.3f}"

        name = c.score if not c.features else "+".join(c.features)
        lines.append(
            f"{name:<14} {c.kind:<10} {c.n:>5}  {pair('auroc')}  {pair('ece')}  "
            f"{pair('brier')}  {pair('log_loss')}"
        )
    first = ranked[0].after.ece_bins if ranked else 0
    lines.append(
        f"held-out = out-of-fold; before = the proxy's uncalibrated mapping of the raw score; "
        f"ECE over {first} equal-mass bins; ranked by held-out {criterion}."
    )
    return "\n".join(lines)
