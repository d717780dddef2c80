"""Choosing a threshold for a target error rate, with a finite-sample guarantee.

A tenant may ask for "at most 10 % of the answers I get are wrong, with 95 % confidence"
(``target_error: 0.1``, ``target_confidence: 0.95``) instead of naming a threshold. The
threshold is chosen from labelled answers the calibration was not fitted on, as in
Learn-then-Test (Angelopoulos et al., 2021): every threshold t of a fixed grid is a
hypothesis "the error among answers with P(correct) > t exceeds the target", tested with
an exact (Clopper-Pearson) upper confidence bound on that error; the lowest threshold
whose hypothesis is rejected is chosen, which answers the most while keeping the bound.

The grid is fixed in advance (0.05, 0.10, ..., 0.95) and the tests are combined by
Bonferroni (each at level δ/m), so the chance that *any* chosen threshold's true error
exceeds the target is at most δ = 1 − target_confidence. Bonferroni rather than the
fixed-sequence order: the most conservative thresholds answer only a handful of the
labelled questions, cannot reject, and would stop a fixed sequence before it reached
the useful ones. The price is a little power: a coarse grid keeps m small.

What the guarantee assumes, plainly: the labelled answers and the traffic are
exchangeable (drawn alike). On traffic the labels do not resemble, it does not hold;
that is what the drift statistic and feedback recalibration are for.

Pure: standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: The thresholds tested: fixed in advance, never chosen from the data.
GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) ≤ k), summed exactly in log space."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    # log P(X = i), from i = 0 by the ratio of neighbouring terms: O(k), no overflow.
    log_ratio = math.log(p) - math.log1p(-p)
    term = n * math.log1p(-p)
    terms = [term]
    for i in range(k):
        term += math.log(n - i) - math.log(i + 1) + log_ratio
        terms.append(term)
    peak = max(terms)
    return min(1.0, math.exp(peak) * sum(math.exp(t - peak) for t in terms))


def upper_bound(errors: int, n: int, alpha: float) -> float:
    """The one-sided Clopper-Pearson upper bound on an error rate, at level 1 − alpha.

    The largest rate e with P(Bin(n, e) ≤ errors) ≥ alpha: with probability at least
    1 − alpha the true rate lies below it. 1.0 when nothing was observed (n = 0).
    """
    if not 0 <= errors <= n:
        raise ValueError("need 0 <= errors <= n")
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must lie in (0, 1)")
    if n == 0 or errors == n:
        return 1.0
    low, high = errors / n, 1.0
    for _ in range(60):  # bisection to ~1e-18: the CDF falls as the rate rises
        mid = (low + high) / 2.0
        if binomial_cdf(errors, n, mid) >= alpha:
            low = mid
        else:
            high = mid
    return high


@dataclass(frozen=True, slots=True)
class ThresholdTest:
    """One grid threshold tested on the labelled answers."""

    threshold: float
    answered: int
    errors: int
    #: upper confidence bound on the error among answered, at level 1 − δ/m
    bound: float


@dataclass(frozen=True, slots=True)
class RiskChoice:
    """The chosen threshold and what it rests on; ``threshold`` None when none qualifies."""

    threshold: float | None
    target_error: float
    confidence: float
    labels: int
    #: share of the labelled answers the threshold answers
    coverage: float
    #: the bound on the error among answered at the chosen threshold
    bound: float | None
    #: error among answered on the labelled answers at the chosen threshold
    observed_error: float | None
    tests: tuple[ThresholdTest, ...]
    source: str = ""

    @property
    def reason(self) -> str | None:
        """Why no threshold was chosen, for the verdict and check-policy; None when one was."""
        if self.threshold is not None:
            return None
        return (
            f"no threshold keeps the error among answered below {self.target_error:g} "
            f"with {self.confidence:.0%} confidence on {self.labels} labelled answers: "
            "every answer is refused until more labels are available"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "target_error": self.target_error,
            "confidence": self.confidence,
            "threshold": self.threshold,
            "error_bound": None if self.bound is None else round(self.bound, 4),
            "coverage": round(self.coverage, 4),
            "labels": self.labels,
            "source": self.source,
        }


def choose_threshold(
    confidence: Sequence[float],
    correct: Sequence[bool | int | float],
    *,
    target_error: float,
    target_confidence: float = 0.95,
    grid: Sequence[float] = GRID,
    source: str = "",
) -> RiskChoice:
    """The lowest grid threshold whose error bound is at most ``target_error``.

    ``confidence`` is each labelled answer's P(correct) under the calibration, ``correct``
    whether it was right. An answer counts as answered at t when P(correct) > t, exactly
    as the proxy decides.
    """
    if len(confidence) != len(correct):
        raise ValueError("confidence and correct differ in length")
    if not 0.0 < target_error < 1.0:
        raise ValueError("target_error must lie in (0, 1)")
    if not 0.0 < target_confidence < 1.0:
        raise ValueError("target_confidence must lie in (0, 1)")
    pairs = [(float(p), bool(y)) for p, y in zip(confidence, correct, strict=True)]
    alpha = (1.0 - target_confidence) / len(grid)  # Bonferroni over the fixed grid
    tests = []
    for t in grid:
        answered = [y for p, y in pairs if p > t]
        errors = sum(1 for y in answered if not y)
        tests.append(
            ThresholdTest(t, len(answered), errors, upper_bound(errors, len(answered), alpha))
        )
    passing = [test for test in tests if test.bound <= target_error]
    n = len(pairs)
    if not passing:
        return RiskChoice(
            None, target_error, target_confidence, n, 0.0, None, None, tuple(tests), source
        )
    best = min(passing, key=lambda test: test.threshold)
    return RiskChoice(
        threshold=best.threshold,
        target_error=target_error,
        confidence=target_confidence,
        labels=n,
        coverage=best.answered / n if n else 0.0,
        bound=best.bound,
        observed_error=best.errors / best.answered if best.answered else None,
        tests=tuple(tests),
        source=source,
    )
