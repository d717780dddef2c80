"""Recalibration from feedback: a two-parameter map on top of the shipped calibration.

The shipped calibration maps an answer's scores to a base P(correct) ``p``. Traffic the
calibration never saw (another prompt wording, other kinds of questions) keeps the
ranking roughly right but moves the probabilities, so feedback labels ``(p, correct)``
fit the map

    r(p) = sigmoid(slope · logit(p) + intercept),    slope ≥ 0

(Platt scaling of the base map's logit). It is the identity at slope 1, intercept 0;
non-decreasing in ``p`` because the slope is constrained to be non-negative (a map that
reversed the base ranking would need far more evidence than a few hundred labels); and
its values lie strictly inside (0, 1) (clipped to [1e-6, 1 - 1e-6]).

**Shrinkage.** The fit is the posterior mode under a Gaussian prior centred on the
identity: it minimises ``Σ log loss + (λ/2)·((slope − 1)² + intercept²)``. The penalty
is fixed while the data term grows with the labels, so the prior's weight relative to
the data falls like λ/n: with no labels the map *is* the identity, with a few it barely
moves, with hundreds the labels decide. The default λ = 2 was chosen on the shifted
sets of ``benchmarks/recalibration_eval.py``: λ = 10 kept the map too close to the
shipped one on NQ-open (accuracy 6 %, where the intercept must move by ~1.5), and the
swap rule below already protects traffic the shipped map fits.

**When a fit replaces the current map** (:func:`refit`): the labels (most recent
``window`` of them, in arrival order) are split into the oldest ``1 − holdout`` to fit
on and the newest ``holdout`` to judge on, the newest because under drift they are the
traffic to come. The candidate fitted on the first part replaces the current map (the
identity when there is none) only if its mean log loss on the held-out part is lower
by more than one standard error of the per-label differences (a paired comparison:
``mean(gain) > 1.0 · sd(gain)/√n_held_out``). Without that margin, on traffic the
shipped map already fits, noise swapped in a slightly worse map in 17 of 20 simulated
streams; with it, 10 of 20, while every shifted set still swaps. The held-out part is
not fresh for the current map (it was fitted on some of those labels), which also
favours keeping it. When the candidate wins, the map put in service is refitted on all
labels of the window (the split validates the procedure; the refit uses every label).

Pure numpy; the composition with a shipped calibration (:func:`compose`) builds the
ordinary calibrator kinds of :mod:`proxy.confidence.calibration`, so a recalibrated
map can be exported as a normal calibration file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy.confidence.calibration import (
    Calibration,
    Calibrator,
    Histogram,
    Isotonic,
    Logistic,
    Platt,
)

Array = npt.NDArray[np.float64]

#: Probabilities are kept this far from 0 and 1: in the logit, and in what r returns.
EPS = 1e-6
#: λ of the prior centred on the identity (benchmarks/recalibration_eval.py, --prior to compare)
DEFAULT_PRIOR = 2.0
#: a candidate must beat the current map on held-out labels by this many standard errors
DEFAULT_MARGIN_SE = 1.0


def _logit(p: Array) -> Array:
    q = np.clip(p, EPS, 1.0 - EPS)
    return np.asarray(np.log(q) - np.log1p(-q), dtype=np.float64)


def _sigmoid(z: Array) -> Array:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64))))


@dataclass(frozen=True, slots=True)
class RecalibrationRule:
    """A rule's ``recalibrate_*`` keys, resolved (None on a rule that does not recalibrate)."""

    min_labels: int = 100
    refit_every: int = 25
    holdout: float = 0.3
    prior_strength: float = DEFAULT_PRIOR
    #: the most recent labels a fit reads (never fewer than ``min_labels``)
    window: int = 2000

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout < 1.0:
            raise ValueError("holdout must be in (0, 1)")
        if self.min_labels < 2 or self.refit_every < 1 or self.prior_strength < 0:
            raise ValueError("min_labels ≥ 2, refit_every ≥ 1 and prior_strength ≥ 0")
        if self.window < self.min_labels:
            object.__setattr__(self, "window", self.min_labels)


@dataclass(frozen=True)
class Recalibration:
    """``r(p) = sigmoid(slope·logit(p) + intercept)``, with where it came from."""

    slope: float = 1.0
    intercept: float = 0.0
    #: 1 for the first map put in service for a tenant and model, then +1 per swap
    version: int = 0
    #: labels it was fitted on
    n: int = 0
    #: the comparison that put it in service (held-out log loss before and after, ...)
    evidence: Mapping[str, Any] = field(default_factory=dict)
    fitted_at: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.slope) and math.isfinite(self.intercept)):
            raise ValueError("recalibration parameters must be finite")
        if self.slope < 0:
            raise ValueError("recalibration slope must be non-negative (monotone map)")

    @property
    def source(self) -> str:
        """What the verdict's ``calibration_source`` says when this map answered."""
        return f"recalibrated:{self.version}"

    def __call__(self, p: float) -> float:
        """The recalibrated probability of one base P(correct)."""
        return float(self.apply(np.array([p]))[0])

    def apply(self, p: npt.ArrayLike) -> Array:
        z = self.slope * _logit(np.asarray(p, dtype=np.float64)) + self.intercept
        return np.clip(_sigmoid(z), EPS, 1.0 - EPS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "slope": self.slope,
            "intercept": self.intercept,
            "version": self.version,
            "n": self.n,
            "evidence": dict(self.evidence),
            "fitted_at": self.fitted_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recalibration:
        try:
            return cls(
                slope=float(data["slope"]),
                intercept=float(data["intercept"]),
                version=int(data.get("version", 0)),
                n=int(data.get("n", 0)),
                evidence=dict(data.get("evidence") or {}),
                fitted_at=data.get("fitted_at"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed recalibration: {exc}") from exc


IDENTITY = Recalibration()


def _arrays(base: npt.ArrayLike, correct: npt.ArrayLike) -> tuple[Array, Array]:
    p = np.asarray(base, dtype=np.float64).ravel()
    y = np.asarray(correct, dtype=np.float64).ravel()
    if p.shape != y.shape:
        raise ValueError("need as many labels as base probabilities")
    if np.isnan(p).any():
        raise ValueError("base probabilities contain NaN")
    return p, y


def posterior_mode(
    A: npt.ArrayLike,
    correct: npt.ArrayLike,
    centre: npt.ArrayLike,
    *,
    prior_strength: float = DEFAULT_PRIOR,
    iterations: int = 100,
) -> Array:
    """Weights ``w`` of ``P = sigmoid(A·w)``: the posterior mode under a Gaussian prior.

    Damped Newton on ``Σ log loss + (λ/2)·‖w − centre‖²``, which is convex. The family of
    a map is its design ``A`` (one row per label) and ``centre`` (the weights of the
    identity): ``[logit p, 1]`` and ``(1, 0)`` for :func:`fit`; a benchmark compares
    richer families through the same solver (``benchmarks/recalibration_families.py``).
    """
    X = np.asarray(A, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64).ravel()
    c = np.asarray(centre, dtype=np.float64).ravel()
    if X.ndim != 2 or X.shape != (y.size, c.size):
        raise ValueError("need one design row per label and one centre weight per column")
    if prior_strength < 0:
        raise ValueError("prior_strength must be non-negative")
    lam = float(prior_strength)

    def objective(b: Array) -> float:
        z = X @ b
        # Σ log(1 + e^z) − y·z, computed without overflow, plus the prior.
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * lam * np.sum((b - c) ** 2))

    beta = c.copy()
    value = objective(beta)
    for _ in range(iterations):
        q = _sigmoid(X @ beta)
        grad = X.T @ (q - y) + lam * (beta - c)
        hess = (X * (q * (1.0 - q))[:, None]).T @ X + (lam + 1e-9) * np.eye(beta.size)
        step = np.linalg.solve(hess, grad)
        # Damped Newton: halve the step until the objective does not increase.
        t = 1.0
        while t > 1e-8:
            trial = beta - t * step
            trial_value = objective(trial)
            if trial_value <= value:
                break
            t *= 0.5
        else:
            break
        beta, value = trial, trial_value
        if np.max(np.abs(t * step)) < 1e-10:
            break
    return beta


def fit(
    base: npt.ArrayLike,
    correct: npt.ArrayLike,
    *,
    prior_strength: float = DEFAULT_PRIOR,
    iterations: int = 100,
) -> tuple[float, float]:
    """(slope, intercept): the posterior mode of the recalibration, slope ≥ 0.

    :func:`posterior_mode` over ``[logit p, 1]``, centred on the identity; the objective
    is convex, so when the unconstrained optimum has a negative slope the constrained one
    lies on slope = 0, where only the intercept is fitted. No labels: the identity.
    """
    p, y = _arrays(base, correct)
    if prior_strength < 0:
        raise ValueError("prior_strength must be non-negative")
    if p.size == 0:
        return 1.0, 0.0
    x = _logit(p)
    ones = np.ones_like(x)
    slope, intercept = posterior_mode(
        np.stack([x, ones], axis=1), y, (1.0, 0.0),
        prior_strength=prior_strength, iterations=iterations,
    )  # fmt: skip
    if slope < 0:
        (intercept,) = posterior_mode(
            ones[:, None], y, (0.0,), prior_strength=prior_strength, iterations=iterations
        )
        slope = 0.0
    return float(slope), float(intercept)


def _losses(p: Array, y: Array) -> Array:
    q = np.clip(p, EPS, 1.0 - EPS)
    return np.asarray(-(y * np.log(q) + (1.0 - y) * np.log1p(-q)), dtype=np.float64)


def log_loss(p: npt.ArrayLike, correct: npt.ArrayLike) -> float:
    """Mean negative log likelihood of the labels (probabilities clipped to [EPS, 1-EPS])."""
    q, y = _arrays(p, correct)
    if q.size == 0:
        return float("nan")
    q = np.clip(q, EPS, 1.0 - EPS)
    return float(-np.mean(y * np.log(q) + (1.0 - y) * np.log1p(-q)))


@dataclass(frozen=True)
class Refit:
    """The outcome of one refit: the map to put in service, or why the current one stays."""

    swapped: bool
    recalibration: Recalibration | None
    reason: str
    evidence: Mapping[str, Any] = field(default_factory=dict)


def refit(
    base: Sequence[float] | npt.ArrayLike,
    correct: Sequence[bool] | npt.ArrayLike,
    current: Recalibration | None,
    *,
    min_labels: int,
    holdout: float = 0.3,
    prior_strength: float = DEFAULT_PRIOR,
    window: int | None = None,
    margin_se: float = DEFAULT_MARGIN_SE,
    fitted_at: str | None = None,
) -> Refit:
    """Fit a candidate on the older labels; swap it in if it wins on the newer ones.

    ``base`` and ``correct`` are in arrival order. ``current`` is the map in service
    (None: the shipped calibration, i.e. the identity). See the module text for the rule.
    """
    p, y = _arrays(base, correct)
    if window is not None and p.size > window:
        p, y = p[-window:], y[-window:]
    n = int(p.size)
    if n < min_labels:
        return Refit(False, current, f"{n} labels, fewer than min_labels={min_labels}")
    if not 0.0 < holdout < 1.0:
        raise ValueError("holdout must be in (0, 1)")
    n_test = max(1, round(holdout * n))
    n_train = n - n_test
    if n_train < 1:
        return Refit(False, current, "too few labels to fit on after the held-out split")
    slope, intercept = fit(p[:n_train], y[:n_train], prior_strength=prior_strength)
    candidate = Recalibration(slope, intercept)
    now = current or IDENTITY
    test_p, test_y = p[n_train:], y[n_train:]
    # Per-label log-loss differences, current minus candidate: positive = candidate better.
    gain = _losses(now.apply(test_p), test_y) - _losses(candidate.apply(test_p), test_y)
    before = log_loss(now.apply(test_p), test_y)
    after = log_loss(candidate.apply(test_p), test_y)
    se = float(np.std(gain, ddof=1) / math.sqrt(n_test)) if n_test > 1 else 0.0
    evidence = {
        "held_out": n_test,
        "fitted_on": n_train,
        "log_loss_current": round(before, 6),
        "log_loss_candidate": round(after, 6),
        "gain_se": round(se, 6),
        "current_version": now.version,
    }
    if not float(np.mean(gain)) > margin_se * se:
        return Refit(False, current, "the candidate is not better on the held-out labels", evidence)
    slope, intercept = fit(p, y, prior_strength=prior_strength)
    chosen = Recalibration(
        slope,
        intercept,
        version=now.version + 1,
        n=n,
        evidence=evidence,
        fitted_at=fitted_at,
    )
    return Refit(True, chosen, "better on the held-out labels", evidence)


def compose_calibrator(calibrator: Calibrator, r: Recalibration) -> Calibrator:
    """The base calibrator followed by ``r``, as a calibrator of the same kind.

    Exact for ``logistic`` and ``platt`` (the slope and intercept fold into the weights
    and bias, without the clipping of the logit); for ``isotonic`` and ``histogram`` the
    stored values are mapped (exact at the fitted points and in every bin).
    """
    a, b = r.slope, r.intercept
    if isinstance(calibrator, Logistic):
        return dataclasses.replace(
            calibrator,
            weights=tuple(a * w for w in calibrator.weights),
            bias=a * calibrator.bias + b,
        )
    if isinstance(calibrator, Platt):
        return dataclasses.replace(calibrator, a=a * calibrator.a, b=a * calibrator.b + b)
    if isinstance(calibrator, Isotonic):
        return dataclasses.replace(calibrator, y=tuple(float(v) for v in r.apply(calibrator.y)))
    if isinstance(calibrator, Histogram):
        values = tuple(float(v) for v in r.apply(calibrator.values))
        return dataclasses.replace(calibrator, values=values)
    raise ValueError(f"cannot recalibrate a {calibrator.kind} calibrator")


def compose(calibration: Calibration, r: Recalibration) -> Calibration:
    """The shipped calibration with ``r`` applied on top: an ordinary calibration.

    Every other field (metrics, the reference data other features read) is kept.
    """
    return dataclasses.replace(
        calibration, calibrator=compose_calibrator(calibration.calibrator, r)
    )
