"""Adaptive early stopping for self-consistency sampling.

Samples are drawn in rounds. After each round the answer's agreement rate r (the chance
that one more sample lands in the answer's cluster) has a Beta posterior,
Beta(prior_agree + agreeing, prior_disagree + disagreeing). Sampling stops as soon as
the decision the samples feed is settled:

* ``above``: P(r > t) > 1 − risk, so the answer clears the cut-point t;
* ``below``: P(r ≤ t) > 1 − risk, so it does not;
* ``decided``: whatever the remaining samples say, the final share of agreeing samples
  lands on the same side of t (exact, no risk);
* ``majority`` (opt-in): the leading answer is ahead by more than the samples left, so
  the majority answer cannot change.

Only the first two use the risk. The majority rule fixes *which* answer wins, not
whether it clears t, so it is off unless the caller needs just the answer (e.g. the
policy shows the majority answer and only annotates).

t here is a cut-point on the agreement rate, not on P(correct): with a calibration,
:func:`agreement_cutpoint` finds the agreement at which the calibrated probability
crosses the policy threshold. Everything is a pure function of counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

StopReason = Literal["above", "below", "decided", "majority", "continue"]

_CF_ITERATIONS = 300
_CF_EPSILON = 1e-14
_TINY = 1e-300


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """Continued fraction of the incomplete beta function, by the modified Lentz method."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    result = d
    for m in range(1, _CF_ITERATIONS + 1):
        # Even step, then odd step, of the expansion 1 / (1 + d1 / (1 + d2 / ...)).
        for coeff in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + coeff * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + coeff / c
            c = c if abs(c) > _TINY else _TINY
            result *= c * d
        if abs(c * d - 1.0) < _CF_EPSILON:
            break
    return result


def beta_cdf(x: float, a: float, b: float) -> float:
    """P(X ≤ x) for X ~ Beta(a, b): the regularised incomplete beta function I_x(a, b)."""
    if a <= 0 or b <= 0:
        raise ValueError("Beta parameters must be positive")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    # The fraction converges fast only left of the mean; use I_x(a,b) = 1 − I_{1−x}(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return min(1.0, front * _beta_continued_fraction(x, a, b) / a)
    return max(0.0, 1.0 - front * _beta_continued_fraction(1.0 - x, b, a) / b)


def prob_above(
    agreeing: int, drawn: int, threshold: float, prior: tuple[float, float] = (1.0, 1.0)
) -> float:
    """Posterior P(r > threshold) after ``agreeing`` of ``drawn`` samples agreed."""
    if not 0 <= agreeing <= drawn:
        raise ValueError("need 0 <= agreeing <= drawn")
    return 1.0 - beta_cdf(threshold, prior[0] + agreeing, prior[1] + drawn - agreeing)


@dataclass(frozen=True, slots=True)
class StoppingRule:
    """When to stop drawing samples; the risk is policy-set."""

    #: cut-point on the agreement rate (see :func:`agreement_cutpoint`)
    threshold: float
    #: accepted chance of stopping on the wrong side of the threshold
    risk: float = 0.05
    #: Beta prior pseudo-counts; (1, 1) is uniform, (0.5, 0.5) Jeffreys
    prior_agree: float = 1.0
    prior_disagree: float = 1.0
    #: also stop once the majority answer cannot change
    stop_on_settled_majority: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError("threshold must lie in [0, 1]")
        if not 0.0 < self.risk < 0.5:
            raise ValueError("risk must lie in (0, 0.5)")
        if self.prior_agree <= 0 or self.prior_disagree <= 0:
            raise ValueError("prior pseudo-counts must be positive")


@dataclass(frozen=True, slots=True)
class StopCheck:
    """The outcome of one check: whether to stop, why, and the posterior it saw."""

    stop: bool
    reason: StopReason
    #: posterior P(agreement rate > threshold)
    p_above: float


def check(
    rule: StoppingRule,
    *,
    agreeing: int,
    drawn: int,
    budget: int,
    majority: int = 0,
    runner_up: int = 0,
) -> StopCheck:
    """Whether sampling can stop after ``drawn`` of ``budget`` samples.

    ``agreeing`` counts samples in the answer's cluster; ``majority`` and ``runner_up``
    are the two largest clusters' sizes (used only by the majority rule). With nothing
    drawn the check never stops: a prior alone decides nothing.
    """
    if drawn > budget:
        raise ValueError("drawn exceeds budget")
    p_above = prob_above(agreeing, drawn, rule.threshold, (rule.prior_agree, rule.prior_disagree))
    if drawn == 0:
        return StopCheck(False, "continue", p_above)
    if p_above > 1.0 - rule.risk:
        return StopCheck(True, "above", p_above)
    if 1.0 - p_above > 1.0 - rule.risk:
        return StopCheck(True, "below", p_above)
    remaining = budget - drawn
    # Counts, not shares, so a share exactly at t is not lost to rounding. When the full
    # budget's share is settled, so is the current one (agreeing/drawn lies on the same
    # side of t), so stopping here changes no decision.
    cut = rule.threshold * budget
    if agreeing > cut or agreeing + remaining <= cut:
        return StopCheck(True, "decided", p_above)
    if rule.stop_on_settled_majority and majority - runner_up > remaining:
        return StopCheck(True, "majority", p_above)
    return StopCheck(False, "continue", p_above)


def agreement_cutpoint(
    p_correct: Callable[[float], float | None], threshold: float, *, tolerance: float = 1e-4
) -> float:
    """The lowest agreement whose P(correct) exceeds ``threshold``, for a monotone map.

    ``p_correct`` maps an agreement in [0, 1] to the calibrated probability (for a hybrid
    calibration: the logistic model with the answer's logprob features held fixed). If
    even unanimous agreement does not clear the threshold the result is 1.0, and if
    none at all already clears it, 0.0: the stopping rule then settles at the first check.
    Uncalibrated, P(correct) is the agreement itself and the cut-point is the threshold.
    """

    def clears(agreement: float) -> bool:
        p = p_correct(agreement)
        return p is not None and p > threshold

    if clears(0.0):
        return 0.0
    if not clears(1.0):
        return 1.0
    low, high = 0.0, 1.0  # invariant: clears(high), not clears(low)
    while high - low > tolerance:
        mid = (low + high) / 2.0
        if clears(mid):
            high = mid
        else:
            low = mid
    return high
