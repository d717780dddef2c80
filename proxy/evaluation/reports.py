"""The abstain / right / wrong table of "Why Language Models Hallucinate", in Markdown and JSON.

For each threshold t the table shows, over all questions, how many the system abstained
on, got right and got wrong, and its penalised score (right +1, wrong −t/(1−t),
abstain 0, averaged): the model alone (it always answers) next to the model behind the
proxy (it answers iff P(correct) > t). A cell is ``n/a`` when the answers needed for it
were withheld (an already-running proxy replaced them with its abstention message).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy.confidence import selective
from proxy.confidence.selective import Outcome


@dataclass(frozen=True)
class EvalReport:
    """Everything ``abstain eval`` measured on one question set."""

    dataset: str
    model: str
    mode: str  # "proxy" (in-process), "external" (a running proxy) or "direct"
    n: int
    thresholds: tuple[float, ...]
    alone: tuple[Outcome | None, ...]
    proxy: tuple[Outcome | None, ...] | None
    metrics: Mapping[str, float | int | None] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    #: what a row of the table is: a question's answer, or one sentence of it
    #: (multi-claim sets, :mod:`proxy.evaluation.claims`)
    unit: str = "questions"


def table_rows(
    correct: npt.ArrayLike,
    thresholds: Sequence[float],
    confidence: npt.ArrayLike | None = None,
    withheld: npt.ArrayLike | None = None,
) -> tuple[tuple[Outcome | None, ...], tuple[Outcome | None, ...] | None]:
    """(model alone, behind the proxy) per threshold; ``None`` cells were not computable."""
    y = np.asarray(correct, dtype=np.float64)
    hidden = np.zeros(y.size, bool) if withheld is None else np.asarray(withheld, bool)
    everyone = np.ones(y.size, bool)
    alone = tuple(None if hidden.any() else selective.outcome(everyone, y, t) for t in thresholds)
    if confidence is None:
        return alone, None
    proxy = []
    for t in thresholds:
        answered = selective.answered_at(confidence, t)
        proxy.append(None if (answered & hidden).any() else selective.outcome(answered, y, t))
    return alone, tuple(proxy)


def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100 * v:.1f}%"


def _cells(row: Outcome | None) -> list[str]:
    if row is None:
        return ["n/a"] * 5
    return [
        _pct(row.abstention_rate),
        _pct(row.accuracy),
        _pct(row.error_rate),
        _pct(row.risk),
        f"{row.score:+.3f}",
    ]


def _cost(t: float) -> str:
    return f"{selective.penalty(t):.3g}"


def _number(v: float | int | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return str(v) if isinstance(v, int) else f"{v:.{digits}f}"


def to_markdown(report: EvalReport) -> str:
    """The table and the metrics as Markdown."""
    heads = ["abstain", "right", "wrong", "wrong of answered", "score"]
    lines = [
        f"## {report.model} on {report.dataset} ({report.n} {report.unit}, {report.mode})",
        "",
    ]
    cols = ["t", "wrong costs"] + [f"alone: {h}" for h in heads]
    if report.proxy is not None:
        cols += [f"proxy: {h}" for h in heads]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for i, t in enumerate(report.thresholds):
        cells = [f"{t:g}", _cost(t), *_cells(report.alone[i])]
        if report.proxy is not None:
            cells += _cells(report.proxy[i])
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Rates are over all {report.unit} except *wrong of answered*. Score: right +1, "
        "wrong −t/(1−t), abstain 0, averaged. The proxy answers iff P(correct) > t.",
        "",
    ]
    if report.metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_number(v)} |" for k, v in report.metrics.items()]
        lines.append("")
    return "\n".join(lines)


def _row_dict(row: Outcome | None) -> dict[str, float] | None:
    if row is None:
        return None
    return {
        "abstention_rate": row.abstention_rate,
        "accuracy": row.accuracy,
        "error_rate": row.error_rate,
        "wrong_of_answered": row.risk,
        "penalised_score": row.score,
    }


def _clean(value: Any) -> Any:
    """NaN is not JSON: write it as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def to_json(report: EvalReport) -> dict[str, Any]:
    """The report as a JSON-ready object (NaN written as null)."""
    rows = []
    for i, t in enumerate(report.thresholds):
        rows.append(
            {
                "threshold": t,
                "wrong_costs": selective.penalty(t),
                "alone": _row_dict(report.alone[i]),
                "proxy": None if report.proxy is None else _row_dict(report.proxy[i]),
            }
        )
    out = {
        "dataset": report.dataset,
        "model": report.model,
        "mode": report.mode,
        "n": report.n,
        "unit": report.unit,
        "table": rows,
        "metrics": dict(report.metrics),
        "meta": dict(report.meta),
    }
    return dict(_clean(out))


def write_report(report: EvalReport, out_dir: str | Path) -> list[Path]:
    """Write ``eval.md`` and ``eval.json`` into ``out_dir`` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "eval.md", out / "eval.json"
    md.write_text(to_markdown(report), encoding="utf-8")
    js.write_text(json.dumps(to_json(report), indent=2) + "\n", encoding="utf-8")
    return [md, js]
