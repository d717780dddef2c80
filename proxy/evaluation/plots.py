"""PNG charts: a reliability diagram and a risk–coverage curve, thresholds marked.

matplotlib is an optional extra (``pip install 'abstain-proxy[eval]'``), imported only
when a chart is drawn, and driven through its object API on the Agg canvas so that
drawing never touches a display or pyplot's global state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy.confidence import selective


def _figure() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("charts need matplotlib: pip install 'abstain-proxy[eval]'") from exc
    return Figure(figsize=(5.5, 4.5), dpi=100, layout="constrained")


def reliability_diagram(
    confidence: npt.ArrayLike,
    correct: npt.ArrayLike,
    path: str | Path,
    *,
    bins: int = 10,
    thresholds: Sequence[float] = (),
    title: str = "Reliability",
) -> Path:
    """Observed accuracy against mean P(correct) per equal-mass bin; marker area ∝ bin size."""
    rel = selective.reliability_bins(confidence, correct, bins)
    fig = _figure()
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    used = [i for i, c in enumerate(rel.counts) if c > 0]
    xs = [rel.mean_confidence[i] for i in used]
    ys = [rel.accuracy[i] for i in used]
    sizes = [20 + 200 * rel.counts[i] / max(sum(rel.counts), 1) for i in used]
    ax.plot(xs, ys, color="tab:blue", linewidth=1)
    ax.scatter(xs, ys, s=sizes, color="tab:blue", zorder=3, label="equal-mass bins")
    for t in thresholds:
        ax.axvline(t, color="tab:red", linewidth=0.8, alpha=0.6)
        ax.text(t, 0.02, f" t={t:g}", color="tab:red", fontsize=8, rotation=90, va="bottom")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted P(correct)")
    ax.set_ylabel("observed accuracy")
    ax.set_title(f"{title}\nECE {rel.ece:.3f} ({bins} bins, {rel.bins_used} used)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    out = Path(path)
    fig.savefig(out)
    return out


def risk_coverage_chart(
    confidence: npt.ArrayLike,
    correct: npt.ArrayLike,
    path: str | Path,
    *,
    thresholds: Sequence[float] = (),
    title: str = "Risk–coverage",
) -> Path:
    """Error rate among the answered against the share answered; each threshold's point."""
    curve = selective.risk_coverage(confidence, correct)
    p = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    fig = _figure()
    ax = fig.subplots()
    # Straight segments between achievable thresholds: within a tie group the expected
    # number of errors grows linearly with coverage, so a step would misdraw it.
    ax.plot(curve.coverage, curve.risk, color="tab:blue", linewidth=1.5, marker=".")
    ax.plot([], [], color="tab:blue", label=f"behind the proxy (AURC {curve.area:.3f})")
    points: dict[tuple[float, float], list[str]] = {}
    for t in thresholds:
        row = selective.outcome(selective.answered_at(p, t), y, t)
        if row.abstention_rate < 1.0:
            points.setdefault((1.0 - row.abstention_rate, row.risk), []).append(f"{t:g}")
    for i, ((cov, risk), names) in enumerate(points.items()):
        # Thresholds that answer the same questions share one point and one label; labels
        # are stacked because neighbouring thresholds often land close together.
        ax.scatter([cov], [risk], color="tab:red", zorder=3)
        ax.annotate(
            "t=" + ", ".join(names),
            (cov, risk),
            textcoords="offset points",
            # Near the top edge the label goes below its point, or it would leave the axes.
            xytext=(6, -(14 + 14 * i) if risk > 0.85 else 6 + 14 * i),
            color="tab:red",
            arrowprops={"arrowstyle": "-", "color": "tab:red", "linewidth": 0.5},
        )
    always = float(np.mean(1.0 - y)) if y.size else float("nan")
    ax.axhline(always, color="0.6", linestyle="--", linewidth=1, label="always answer")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1)
    ax.set_xlabel("coverage (share of questions answered)")
    ax.set_ylabel("risk (wrong among answered)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    out = Path(path)
    fig.savefig(out)
    return out
