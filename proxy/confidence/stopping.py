"""Adaptive early stopping for self-consistency sampling.

Samples are drawn in rounds. After each round the answer's agreement rate r (the chance
that one more sample lands in the answer's cluster) has a Beta posterior,
Beta(prior_agree + agreeing, prior_disagree + disagreeing). What the proxy finally judges
is the share of agreeing samples over the whole budget, so the rule asks the posterior
*predictive* question: given what came back, how likely is the full budget's share to
end above the cut-point t? (The remaining samples' agreeing count is Beta-binomial.)
Sampling stops as soon as that is settled:

* ``decided``: whatever the remaining samples say, the final share lands on the same
  side of t (exact, no risk);
* ``above``: P(final share > t) > 1 − risk;
* ``below``: P(final share ≤ t) > 1 − risk.

Predicting the final share rather than testing r itself matters when t is near 0 or 1:
a calibration that needs 8 of 8 samples to agree puts t just under 1, and a test on r
would call "below" after two agreeing samples although 8 of 8 was still likely. When
sampling stops early, :func:`expected_final_share` is the agreement the verdict uses, so
the decision matches what the stopping rule predicted for the full budget.

t here is a cut-point on the agreement share, not on P(correct): with a calibration,
:func:`agreement_cutpoint` finds the agreement at which the calibrated probability
crosses the policy threshold. Everything is a pure function of counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

StopReason = Literal["above", "below", "decided", "continue"]


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def prob_final_above(
    agreeing: int,
    drawn: int,
    budget: int,
    threshold: float,
    prior: tuple[float, float] = (1.0, 1.0),
) -> float:
    """P(final agreeing share over ``budget`` samples > threshold), after ``drawn`` of them.

    The remaining samples' agreeing count is Beta-binomial under the Beta posterior.
    """
    if not 0 <= agreeing <= drawn <= budget:
        raise ValueError("need 0 <= agreeing <= drawn <= budget")
    a, b = prior[0] + agreeing, prior[1] + drawn - agreeing
    remaining = budget - drawn
    # Smallest number of further agreeing samples that lifts the share above the cut.
    needed = math.floor(threshold * budget) + 1 - agreeing
    if needed <= 0:
        return 1.0
    if needed > remaining:
        return 0.0
    log_norm = _log_beta(a, b)
    total = 0.0
    for x in range(needed, remaining + 1):
        log_choose = (
            math.lgamma(remaining + 1) - math.lgamma(x + 1) - math.lgamma(remaining - x + 1)
        )
        total += math.exp(log_choose + _log_beta(x + a, remaining - x + b) - log_norm)
    return min(1.0, total)


def expected_final_share(
    agreeing: int, drawn: int, budget: int, prior: tuple[float, float] = (1.0, 1.0)
) -> float:
    """The full budget's expected agreeing share: what was seen plus the posterior mean."""
    if not 0 <= agreeing <= drawn <= budget or budget == 0:
        raise ValueError("need 0 <= agreeing <= drawn <= budget, budget > 0")
    mean = (prior[0] + agreeing) / (prior[0] + prior[1] + drawn)
    return (agreeing + (budget - drawn) * mean) / budget


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
    #: posterior predictive P(the full budget's agreeing share > threshold)
    p_above: float


def check(
    rule: StoppingRule,
    *,
    agreeing: int,
    drawn: int,
    budget: int,
) -> StopCheck:
    """Whether sampling can stop after ``drawn`` of ``budget`` samples.

    ``agreeing`` counts samples in the answer's cluster. With nothing drawn the check
    never stops: a prior alone decides nothing.
    """
    if drawn > budget:
        raise ValueError("drawn exceeds budget")
    prior = (rule.prior_agree, rule.prior_disagree)
    p_above = prob_final_above(agreeing, drawn, budget, rule.threshold, prior)
    if drawn == 0:
        return StopCheck(False, "continue", p_above)
    remaining = budget - drawn
    # Counts, not shares, so a share exactly at t is not lost to rounding.
    cut = rule.threshold * budget
    if agreeing > cut or agreeing + remaining <= cut:
        return StopCheck(True, "decided", p_above)
    if p_above > 1.0 - rule.risk:
        return StopCheck(True, "above", p_above)
    if 1.0 - p_above > 1.0 - rule.risk:
        return StopCheck(True, "below", p_above)
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
