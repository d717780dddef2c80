"""The ``abstain eval`` workflow: graded answers (and the proxy's verdicts) in, a report out.

Each answer is graded; behind a proxy, its ``abstention`` object gives P(correct) and the
proxy's own decision. The table applies the proxy's rule (answer iff P(correct) > t) at
every threshold, and the decision the proxy actually took at its configured threshold
is checked against that rule (``rule_mismatches`` should be 0). A missing confidence
abstains at every threshold, like the proxy's default ``on_missing_score: abstain``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from proxy.confidence import selective
from proxy.confidence.features import LOGPROB_SCORES
from proxy.evaluation.datasets import Question
from proxy.evaluation.grading import Grader
from proxy.evaluation.reports import EvalReport, table_rows
from proxy.evaluation.runner import Generation


def _confidence(gen: Generation) -> float:
    a = gen.abstention or {}
    c = a.get("confidence")
    return float(c) if isinstance(c, int | float) and not isinstance(c, bool) else np.nan


def _mismatch(gen: Generation) -> bool:
    """Whether the proxy's decision at its own threshold broke 'answer iff p > t'."""
    a = gen.abstention or {}
    t, decision = a.get("threshold"), a.get("decision")
    if not isinstance(t, int | float) or decision in (None, "unjudged"):
        return False
    answered = bool(selective.answered_at([_confidence(gen)], float(t))[0])
    return bool(answered != (decision == "answer"))


def evaluate(
    questions: Sequence[Question],
    generations: Sequence[Generation],
    grader: Grader,
    *,
    mode: str,
    model: str,
    dataset: str,
    thresholds: Sequence[float],
    target_error: float = 0.25,
    ece_bins: int = 10,
    meta: Mapping[str, Any] | None = None,
) -> tuple[EvalReport, dict[str, np.ndarray]]:
    """The report, and the arrays (confidence, correct) the charts are drawn from."""
    gold = {q.id: q.answers for q in questions}
    ok = [g for g in generations if g.error is None]
    correct = np.array([1.0 if grader(g.text, gold[g.id]) else 0.0 for g in ok])
    metrics: dict[str, float | int | None] = {
        "questions": len(generations),
        "failed requests": len(generations) - len(ok),
        "accuracy (always answer)": float(np.mean(correct)) if ok else None,
    }
    for name in LOGPROB_SCORES:
        raw = np.array([g.scores.get(name, np.nan) for g in ok])
        if not np.isnan(raw).all():
            metrics[f"AUROC of raw {name}"] = selective.auroc(raw, correct)
    arrays = {"correct": correct}
    confidence = None
    withheld = None
    if mode != "direct":
        if not any(g.abstention for g in ok):
            raise ValueError(
                "no response carried an 'abstention' object: is the base URL a proxy? "
                "(use --direct to evaluate a model on its own)"
            )
        confidence = np.array([_confidence(g) for g in ok])
        # An abstaining proxy replaced the answer text: it cannot be graded.
        withheld = np.array([(g.abstention or {}).get("decision") == "abstain" for g in ok])
        arrays["confidence"] = confidence
        known = ~np.isnan(confidence)
        metrics.update(confidence_metrics(confidence, correct, ece_bins, target_error))
        metrics.update(
            {
                "answers without a confidence": int(np.sum(~known)),
                "calibrated answers": sum(bool((g.abstention or {}).get("calibrated")) for g in ok),
                "rule mismatches": sum(_mismatch(g) for g in ok),
                "withheld answers": int(np.sum(withheld)),
            }
        )
    alone, proxy = table_rows(correct, thresholds, confidence, withheld)
    report = EvalReport(
        dataset=dataset,
        model=model,
        mode=mode,
        n=len(ok),
        thresholds=tuple(thresholds),
        alone=alone,
        proxy=proxy,
        metrics=metrics,
        meta=dict(meta or {}),
    )
    return report, arrays


def answer_records(
    questions: Sequence[Question], generations: Sequence[Generation], grader: Grader
) -> list[dict[str, Any]]:
    """One line per question for ``answers.jsonl``: what was said, and how it was judged."""
    by_id = {q.id: q for q in questions}
    out = []
    for g in generations:
        q = by_id[g.id]
        a = g.abstention or {}
        out.append(
            {
                "id": g.id,
                "question": q.question,
                "gold": list(q.answers),
                "answer": g.text,
                "correct": None if g.error else grader(g.text, q.answers),
                "confidence": a.get("confidence"),
                "decision": a.get("decision"),
                "scores": {k: round(v, 4) for k, v in g.scores.items()},
                "error": g.error,
            }
        )
    return out


def draw_charts(
    arrays: Mapping[str, np.ndarray],
    out_dir: Path,
    *,
    thresholds: Sequence[float],
    ece_bins: int,
    title: str,
) -> list[Path]:
    """The reliability diagram and risk–coverage curve (nothing without a confidence)."""
    if "confidence" not in arrays:
        return []
    from proxy.evaluation import plots

    conf, correct = arrays["confidence"], arrays["correct"]
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        plots.reliability_diagram(
            conf,
            correct,
            out_dir / "reliability.png",
            bins=ece_bins,
            thresholds=thresholds,
            title=f"Reliability: {title}",
        ),
        plots.risk_coverage_chart(
            conf,
            correct,
            out_dir / "risk_coverage.png",
            thresholds=thresholds,
            title=f"Risk–coverage: {title}",
        ),
    ]


def confidence_metrics(
    confidence: np.ndarray, correct: np.ndarray, ece_bins: int, target_error: float
) -> dict[str, float | int | None]:
    """How well ``confidence`` ranks and is calibrated against ``correct``: the rows every
    evaluation report has (answers or sentences alike)."""
    rel = selective.reliability_bins(confidence, correct, ece_bins)
    curve = selective.risk_coverage(confidence, correct)
    return {
        "AUROC": selective.auroc(confidence, correct),
        f"ECE ({ece_bins} equal-mass bins, {rel.bins_used} used)": rel.ece,
        "ECE a perfectly calibrated model would show here": selective.ece_noise_floor(
            confidence, ece_bins
        ),
        "Brier": selective.brier(confidence, correct),
        "AURC (area under risk-coverage)": curve.area,
        f"coverage at ≤{target_error:g} wrong of answered": selective.coverage_at_risk(
            confidence, correct, target_error
        ),
    }
