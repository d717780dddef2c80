"""Selective-prediction metrics: how well a confidence tells right answers from wrong ones.

Pure numpy: arrays in, numbers out. ``confidence`` is P(correct) (or any score where
higher means more confident, for the rank metrics); ``correct`` is 0/1. A missing
confidence is NaN; the table functions treat it as an abstention at every threshold,
which is what the proxy does with ``on_missing_score: abstain`` (its default).

Every metric handles ties explicitly, because calibrated confidences from isotonic
regression or histogram binning are full of them:

* AUROC counts a tied right/wrong pair as half a win (Mann–Whitney with mid-ranks).
* ECE uses equal-mass bins, but never splits a run of equal confidences across two bins,
  so a bin may end up empty; empty bins carry no weight and ``bins_used`` says how many
  were not empty.
* The risk–coverage curve only has points at tie-group boundaries (a threshold cannot
  separate equal confidences); its area is the exact expectation under random
  tie-breaking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]
ArrayLike = npt.ArrayLike


def _arrays(confidence: ArrayLike, correct: ArrayLike) -> tuple[Array, Array]:
    p = np.asarray(confidence, dtype=np.float64).ravel()
    y = np.asarray(correct, dtype=np.float64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"confidence and correct differ in length ({p.size} vs {y.size})")
    return p, y


def _known(confidence: ArrayLike, correct: ArrayLike) -> tuple[Array, Array]:
    """The pairs whose confidence is known (not NaN)."""
    p, y = _arrays(confidence, correct)
    keep = ~np.isnan(p)
    return p[keep], y[keep]


def midranks(values: ArrayLike) -> Array:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    x = np.asarray(values, dtype=np.float64).ravel()
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mids = ends - (counts - 1) / 2.0
    return np.asarray(mids[inverse], dtype=np.float64)


def auroc(confidence: ArrayLike, correct: ArrayLike) -> float:
    """P(a random right answer is more confident than a random wrong one); ties count 0.5.

    NaN when only one class is present (the question has no answer then).
    """
    p, y = _known(confidence, correct)
    n_pos = float(np.sum(y == 1))
    n_neg = float(np.sum(y == 0))
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = midranks(p)
    return float((np.sum(ranks[y == 1]) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-mass bins of a confidence: what a reliability diagram draws and ECE sums."""

    bins: int  # requested
    counts: tuple[int, ...]  # per bin, including empty ones
    mean_confidence: tuple[float, ...]  # NaN for an empty bin
    accuracy: tuple[float, ...]  # NaN for an empty bin

    @property
    def bins_used(self) -> int:
        return sum(1 for c in self.counts if c > 0)

    @property
    def ece(self) -> float:
        total = sum(self.counts)
        if total == 0:
            return float("nan")
        return float(
            sum(
                (c / total) * abs(m - a)
                for c, m, a in zip(self.counts, self.mean_confidence, self.accuracy, strict=True)
                if c > 0
            )
        )


def reliability_bins(confidence: ArrayLike, correct: ArrayLike, bins: int = 10) -> ReliabilityBins:
    """Sort by confidence and cut into ``bins`` groups of (nearly) equal size.

    A tie group goes wholly into the bin of its first member, so equal confidences are
    never judged apart (a bin can therefore be empty).
    """
    if bins < 1:
        raise ValueError("bins must be at least 1")
    p, y = _known(confidence, correct)
    n = p.size
    order = np.argsort(p, kind="stable")
    ps, ys = p[order], y[order]
    positions = np.arange(n)
    if n:
        starts = np.r_[True, ps[1:] != ps[:-1]]
        positions = np.maximum.accumulate(np.where(starts, positions, 0))
    which = positions * bins // max(n, 1)
    counts, means, accs = [], [], []
    for b in range(bins):
        mask = which == b
        c = int(np.sum(mask))
        counts.append(c)
        means.append(float(np.mean(ps[mask])) if c else float("nan"))
        accs.append(float(np.mean(ys[mask])) if c else float("nan"))
    return ReliabilityBins(bins, tuple(counts), tuple(means), tuple(accs))


def ece(confidence: ArrayLike, correct: ArrayLike, bins: int = 10) -> float:
    """Expected calibration error over equal-mass bins: Σ (n_b/n)·|mean p_b − accuracy_b|."""
    return reliability_bins(confidence, correct, bins).ece


def ece_noise_floor(
    confidence: ArrayLike, bins: int = 10, draws: int = 400, seed: int = 0
) -> float:
    """The ECE a perfectly calibrated model would show, on average, with these confidences.

    ECE is biased upwards on small samples: each bin's accuracy is a noisy estimate, and
    its absolute error never averages out. Drawing labels from the confidences themselves
    (so that calibration is perfect by construction) measures that bias; an observed ECE
    near this floor is as good as the sample can show.
    """
    p = np.asarray(confidence, dtype=np.float64).ravel()
    p = p[~np.isnan(p)]
    if not p.size:
        return float("nan")
    rng = np.random.default_rng(seed)
    draws_ = [ece(p, rng.random(p.size) < p, bins) for _ in range(draws)]
    return float(np.mean(draws_))


def brier(confidence: ArrayLike, correct: ArrayLike) -> float:
    """Mean squared error of the probability: mean (p − y)²."""
    p, y = _known(confidence, correct)
    return float(np.mean((p - y) ** 2)) if p.size else float("nan")


def log_loss(confidence: ArrayLike, correct: ArrayLike, eps: float = 1e-6) -> float:
    """Mean negative log-likelihood; p is clipped to [eps, 1−eps] so one 0 is not infinite."""
    p, y = _known(confidence, correct)
    if not p.size:
        return float("nan")
    q = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(q) + (1.0 - y) * np.log(1.0 - q)))


@dataclass(frozen=True)
class RiskCoverage:
    """Error rate among the answered (risk) when answering the most confident fraction."""

    thresholds: tuple[float, ...]  # answer iff confidence >= this
    coverage: tuple[float, ...]
    risk: tuple[float, ...]
    area: float  # mean risk over every coverage k/n, ties broken at random (expected)


def risk_coverage(confidence: ArrayLike, correct: ArrayLike) -> RiskCoverage:
    """The risk–coverage curve at every achievable threshold, and its area (AURC)."""
    p, y = _known(confidence, correct)
    n = p.size
    if n == 0:
        return RiskCoverage((), (), (), float("nan"))
    order = np.argsort(-p, kind="stable")
    ps, wrong = p[order], 1.0 - y[order]
    ends = np.r_[np.nonzero(ps[1:] != ps[:-1])[0] + 1, n]  # exclusive end of each tie group
    starts = np.r_[0, ends[:-1]]
    cum_wrong = np.r_[0.0, np.cumsum(wrong)]
    # Within a tie group the expected number of errors grows linearly with k, and k is
    # fixed, so the expected risk at k is exact: (errors before + share of the group's)/k.
    group_of = np.repeat(np.arange(ends.size), ends - starts)
    k = np.arange(1, n + 1, dtype=np.float64)
    s, e = starts[group_of], ends[group_of]
    group_wrong = cum_wrong[e] - cum_wrong[s]
    expected_wrong = cum_wrong[s] + (k - s) * group_wrong / (e - s)
    area = float(np.mean(expected_wrong / k))
    return RiskCoverage(
        thresholds=tuple(float(ps[i - 1]) for i in ends),
        coverage=tuple(float(i / n) for i in ends),
        risk=tuple(float(cum_wrong[i] / i) for i in ends),
        area=area,
    )


def coverage_at_risk(confidence: ArrayLike, correct: ArrayLike, target: float) -> float:
    """The largest coverage any threshold reaches with risk ≤ ``target`` (0 if none)."""
    curve = risk_coverage(confidence, correct)
    ok = [c for c, r in zip(curve.coverage, curve.risk, strict=True) if r <= target + 1e-12]
    return max(ok, default=0.0)


def penalty(threshold: float) -> float:
    """Points a wrong answer costs at threshold t: t/(1−t) (the paper's confidence target)."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError("threshold must be in [0, 1)")
    return threshold / (1.0 - threshold)


def penalised_score(answered: ArrayLike, correct: ArrayLike, threshold: float) -> float:
    """Mean points: right +1, wrong −t/(1−t), abstained 0."""
    a = np.asarray(answered, dtype=bool).ravel()
    y = np.asarray(correct, dtype=np.float64).ravel()
    if a.shape != y.shape:
        raise ValueError("answered and correct differ in length")
    if not a.size:
        return float("nan")
    points = np.where(a, np.where(y == 1, 1.0, -penalty(threshold)), 0.0)
    return float(np.mean(points))


@dataclass(frozen=True)
class Outcome:
    """One row of the abstain/right/wrong table, over all questions."""

    threshold: float
    abstention_rate: float
    accuracy: float  # right / all questions
    error_rate: float  # wrong / all questions
    risk: float  # wrong / answered (NaN when nothing is answered)
    score: float  # penalised score at this threshold


def outcome(answered: ArrayLike, correct: ArrayLike, threshold: float) -> Outcome:
    """Rates and the penalised score for a given set of answered questions."""
    a = np.asarray(answered, dtype=bool).ravel()
    y = np.asarray(correct, dtype=np.float64).ravel()
    n = a.size
    right = float(np.sum(a & (y == 1)))
    wrong = float(np.sum(a & (y == 0)))
    n_answered = right + wrong
    return Outcome(
        threshold=threshold,
        abstention_rate=(n - n_answered) / n if n else float("nan"),
        accuracy=right / n if n else float("nan"),
        error_rate=wrong / n if n else float("nan"),
        risk=wrong / n_answered if n_answered else float("nan"),
        score=penalised_score(a, y, threshold),
    )


def answered_at(confidence: ArrayLike, threshold: float) -> npt.NDArray[np.bool_]:
    """The proxy's rule: answer iff P(correct) > t; a missing confidence abstains."""
    p = np.asarray(confidence, dtype=np.float64).ravel()
    with np.errstate(invalid="ignore"):
        return np.asarray(~np.isnan(p) & (p > threshold), dtype=np.bool_)
