"""Fitting calibrators: raw scores and right/wrong labels in, a calibrator out.

Pure numpy; produces the classes :mod:`proxy.confidence.calibration` applies.

* ``isotonic``: pool-adjacent-violators on the scores, stored as the two ends of every
  pooled block, so the proxy interpolates between blocks and is flat within one.
* ``platt``: sigmoid(a·x + b) by Newton's method (logistic regression on one score).
* ``histogram``: equal-mass bins of the score, each bin's observed rate, pooled where
  needed so the rates never decrease.
* ``logistic``: logistic regression over several standardised scores (for hybrids).

Every single-score calibrator is non-decreasing in its score: a higher raw confidence
must never lower P(correct), or the threshold would stop meaning "more sure". Isotonic and
histogram rates are kept one pseudo-observation away from 0 and 1 (1/(n+2)), because a
probability of exactly 0 claims a certainty that a few hundred labels cannot support and
makes the log loss of one surprise infinite.

Selection: :func:`cross_validate` produces out-of-fold predictions with stratified K-fold,
:func:`select` fits every (score, calibrator) candidate that way and ranks them by held-out
Brier score (default) or log loss; :mod:`proxy.confidence.selective` supplies the metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from proxy.confidence import selective
from proxy.confidence.calibration import Calibrator, Histogram, Isotonic, Logistic, Platt
from proxy.confidence.features import uncalibrated

Array = npt.NDArray[np.float64]
SingleFitter = Callable[[Array, Array, str], Calibrator]
KINDS = ("isotonic", "platt", "histogram")


def _xy(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[Array, Array]:
    x = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if x.shape != y.shape or not x.size:
        raise ValueError("need equal, non-empty scores and labels")
    if np.isnan(x).any():
        raise ValueError("scores contain NaN; drop answers without the score first")
    return x, y


def _floor(n: int) -> float:
    return 1.0 / (n + 2.0)


def pav(values: npt.ArrayLike, weights: npt.ArrayLike) -> tuple[Array, Array, Array]:
    """Pool adjacent violators: the non-decreasing fit to ``values`` (in the given order).

    Returns (block value, block weight, block length) per pooled block; neighbouring
    blocks always differ, so the values are strictly increasing.
    """
    v_in = np.asarray(values, dtype=np.float64)
    w_in = np.asarray(weights, dtype=np.float64)
    vals: list[float] = []
    wts: list[float] = []
    lens: list[int] = []
    for v, w in zip(v_in, w_in, strict=True):
        vals.append(float(v))
        wts.append(float(w))
        lens.append(1)
        # Merge backwards while the last block is not above its predecessor: pooling
        # equal neighbours changes no fitted value and keeps the stored mapping short.
        while len(vals) > 1 and vals[-2] >= vals[-1]:
            w_sum = wts[-2] + wts[-1]
            merged = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / w_sum
            vals[-2:] = [merged]
            wts[-2:] = [w_sum]
            lens[-2:] = [lens[-2] + lens[-1]]
    return np.array(vals), np.array(wts), np.array(lens, dtype=np.float64)


def fit_isotonic(scores: npt.ArrayLike, labels: npt.ArrayLike, score: str) -> Isotonic:
    """Isotonic regression of the labels on one score."""
    x, y = _xy(scores, labels)
    # Equal scores must map to one value: pool them before PAV.
    ux, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    means = np.bincount(inverse, weights=y) / counts
    values, _, lengths = pav(means, counts)
    ends = np.cumsum(lengths).astype(int)
    starts = ends - lengths.astype(int)
    lo = _floor(x.size)
    xs: list[float] = []
    ys: list[float] = []
    for s, e, v in zip(starts, ends, np.clip(values, lo, 1.0 - lo), strict=True):
        xs.append(float(ux[s]))
        ys.append(float(v))
        if e - 1 > s:
            xs.append(float(ux[e - 1]))
            ys.append(float(v))
    return Isotonic(score, tuple(xs), tuple(ys))


def _newton_logistic(X: Array, y: Array, l2: float, iterations: int = 100) -> tuple[Array, float]:
    """Weights and bias of an L2-penalised logistic regression (bias unpenalised)."""
    n, d = X.shape
    A = np.hstack([X, np.ones((n, 1))])
    beta = np.zeros(d + 1)
    ridge = np.full(d + 1, l2)
    ridge[-1] = 0.0
    for _ in range(iterations):
        z = np.clip(A @ beta, -35.0, 35.0)
        p = 1.0 / (1.0 + np.exp(-z))
        grad = A.T @ (p - y) + ridge * beta
        hess = (A * (p * (1.0 - p))[:, None]).T @ A + np.diag(ridge) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return beta[:-1], float(beta[-1])


def _logit(p: float) -> float:
    return float(np.log(p / (1.0 - p)))


def fit_platt(scores: npt.ArrayLike, labels: npt.ArrayLike, score: str, l2: float = 1e-3) -> Platt:
    """Logistic regression on one score; the slope is kept ≥ 0 so the map never decreases."""
    x, y = _xy(scores, labels)
    rate = float(np.clip(np.mean(y), _floor(x.size), 1.0 - _floor(x.size)))
    scale = float(np.std(x))
    if scale == 0.0 or np.all(y == y[0]):
        return Platt(score, 0.0, _logit(rate))
    mean = float(np.mean(x))
    w, b = _newton_logistic(((x - mean) / scale)[:, None], y, l2)
    if w[0] <= 0.0:
        # A score that does not rise with correctness carries no usable signal.
        return Platt(score, 0.0, _logit(rate))
    a = float(w[0]) / scale
    return Platt(score, a, b - a * mean)


def fit_histogram(
    scores: npt.ArrayLike, labels: npt.ArrayLike, score: str, bins: int = 10
) -> Histogram:
    """Equal-mass histogram binning, rates pooled to be non-decreasing across bins."""
    x, y = _xy(scores, labels)
    ux, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=y)
    # Cut the sorted unique values where the running count crosses k·n/bins, so a run of
    # equal scores is never split between bins.
    cum = np.cumsum(counts)
    which = np.minimum(((cum - counts) * bins) // x.size, bins - 1)
    edges: list[float] = []
    rates: list[float] = []
    weights: list[float] = []
    for b in np.unique(which):
        idx = np.nonzero(which == b)[0]
        if rates:
            edges.append(float((ux[idx[0] - 1] + ux[idx[0]]) / 2.0))
        weights.append(float(counts[idx].sum()))
        rates.append(float(sums[idx].sum() / counts[idx].sum()))
    values, _, lengths = pav(rates, weights)
    # Pooled bins share a value; keep only the edges between distinct values.
    keep = np.cumsum(lengths).astype(int)[:-1] - 1
    lo = _floor(x.size)
    return Histogram(
        score,
        tuple(edges[i] for i in keep),
        tuple(float(v) for v in np.clip(values, lo, 1.0 - lo)),
    )


def fit_logistic(
    features: npt.ArrayLike, labels: npt.ArrayLike, names: Sequence[str], l2: float = 1e-2
) -> Logistic:
    """Logistic regression over several scores (columns of ``features``), standardised."""
    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64).ravel()
    if X.ndim != 2 or X.shape[0] != y.size or X.shape[1] != len(names) or not y.size:
        raise ValueError("features must be an (n, len(names)) array matching the labels")
    means = X.mean(axis=0)
    scales = X.std(axis=0)
    scales[scales == 0.0] = 1.0
    w, b = _newton_logistic((X - means) / scales, y, l2)
    return Logistic(
        tuple(names),
        tuple(float(v) for v in w),
        b,
        tuple(float(v) for v in means),
        tuple(float(v) for v in scales),
    )


FITTERS: dict[str, SingleFitter] = {
    "isotonic": fit_isotonic,
    "platt": fit_platt,
    "histogram": fit_histogram,
}


def predict(calibrator: Calibrator, names: Sequence[str], X: Array) -> Array:
    """Apply a calibrator to rows of features named ``names``."""
    out = np.empty(X.shape[0])
    for i, row in enumerate(X):
        p = calibrator(dict(zip(names, (float(v) for v in row), strict=True)))
        out[i] = np.nan if p is None else p
    return out


def stratified_folds(
    labels: npt.ArrayLike, k: int, seed: int = 0, groups: npt.ArrayLike | None = None
) -> list[npt.NDArray[np.intp]]:
    """Indices of ``k`` test folds, each with about the same share of right answers.

    With ``groups`` (one id per row), the rows of a group stay in one fold: the sentences
    of one answer are not independent (one hesitant answer makes all of them unsure), and
    a fold that shares answers with its training rows would judge the fit optimistically.
    The groups are then dealt out, those with a right row first, like rows without them.
    """
    y = np.asarray(labels).ravel()
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    if groups is None:
        units = [[int(i)] for i in range(y.size)]
    else:
        ids = np.asarray(groups).ravel()
        if ids.size != y.size:
            raise ValueError("groups and labels differ in length")
        members: dict[object, list[int]] = {}
        for i, g in enumerate(ids.tolist()):
            members.setdefault(g, []).append(i)
        units = list(members.values())
    offset = 0
    for cls in (1, 0):
        # A unit is dealt with the right answers when any of its rows is right.
        stratum = [u for u in units if bool(y[u].max() == 1) == (cls == 1)]
        for j, pick in enumerate(rng.permutation(len(stratum))):
            folds[(j + offset) % k].extend(stratum[int(pick)])
        offset += len(stratum)
    return [np.sort(np.array(f, dtype=np.intp)) for f in folds]


Fit = Callable[[Array, Array], Calibrator]


def cross_validate(
    X: Array,
    y: Array,
    names: Sequence[str],
    fit: Fit,
    k: int,
    seed: int,
    groups: npt.ArrayLike | None = None,
) -> Array:
    """Out-of-fold P(correct) for every row: each fold predicted by a fit on the others
    (a group's rows all in one fold, with ``groups``)."""
    out = np.full(y.size, np.nan)
    for test in stratified_folds(y, k, seed, groups):
        train = np.setdiff1d(np.arange(y.size), test)
        out[test] = predict(fit(X[train], y[train]), names, X[test])
    return out


@dataclass(frozen=True)
class Metrics:
    """How well probabilities match outcomes."""

    auroc: float
    ece: float
    brier: float
    log_loss: float
    ece_bins: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "auroc": round(self.auroc, 4),
            "ece": round(self.ece, 4),
            "brier": round(self.brier, 4),
            "log_loss": round(self.log_loss, 4),
            "ece_bins": self.ece_bins,
        }


def measure(p: npt.ArrayLike, y: npt.ArrayLike, ece_bins: int = 10) -> Metrics:
    return Metrics(
        auroc=selective.auroc(p, y),
        ece=selective.ece(p, y, ece_bins),
        brier=selective.brier(p, y),
        log_loss=selective.log_loss(p, y),
        ece_bins=ece_bins,
    )


@dataclass(frozen=True)
class Candidate:
    """One (score, calibrator) pair, judged on held-out folds."""

    score: str
    kind: str
    n: int
    before: Metrics  # the raw score through the proxy's uncalibrated mapping
    after: Metrics  # out-of-fold calibrated probabilities
    features: tuple[str, ...] = field(default=())

    def criterion(self, name: str) -> float:
        return float(getattr(self.after, name))


def fitter(kind: str, names: Sequence[str]) -> Fit:
    """The function fitting one calibrator ``kind`` on feature columns named ``names``."""
    if kind == "logistic":
        return lambda X, y: fit_logistic(X, y, names)
    single = FITTERS[kind]
    return lambda X, y: single(X[:, 0], y, names[0])


def candidate(
    kind: str,
    features: Mapping[str, npt.ArrayLike],
    labels: npt.ArrayLike,
    *,
    names: Sequence[str],
    folds: int = 5,
    seed: int = 0,
    ece_bins: int = 10,
    groups: npt.ArrayLike | None = None,
) -> tuple[Candidate, Calibrator]:
    """Cross-validate one calibrator kind on ``names``, then refit it on every row.

    Rows missing any of the named scores are left out (the proxy cannot judge them either).
    ``groups``: rows that must share a fold (the sentences of one answer).
    """
    X = np.column_stack([np.asarray(features[n], dtype=np.float64) for n in names])
    y = np.asarray(labels, dtype=np.float64).ravel()
    keep = ~np.isnan(X).any(axis=1)
    X, y = X[keep], y[keep]
    kept = None if groups is None else np.asarray(groups).ravel()[keep]
    fit = fitter(kind, names)
    oof = cross_validate(X, y, names, fit, folds, seed, kept)
    # The proxy's own mapping without a calibration: what a rule without one would say.
    raw = np.array([uncalibrated(names[0], float(v)) for v in X[:, 0]], dtype=np.float64)
    cand = Candidate(
        score=names[0],
        kind=kind,
        n=int(y.size),
        before=measure(raw, y, ece_bins),
        after=measure(oof, y, ece_bins),
        features=tuple(names) if kind == "logistic" else (),
    )
    return cand, fit(X, y)


def select(
    features: Mapping[str, npt.ArrayLike],
    labels: npt.ArrayLike,
    *,
    scores: Sequence[str],
    kinds: Sequence[str] = KINDS,
    criterion: str = "brier",
    folds: int = 5,
    seed: int = 0,
    ece_bins: int = 10,
    logistic_features: Sequence[str] | None = None,
    groups: npt.ArrayLike | None = None,
) -> list[tuple[Candidate, Calibrator]]:
    """Every candidate, best first by held-out ``criterion`` (``brier`` or ``log_loss``).

    ``logistic`` in ``kinds`` adds one multi-score candidate over ``logistic_features``
    (default: all ``scores``). ``groups``: see :func:`candidate`.
    """
    if criterion not in ("log_loss", "brier"):
        raise ValueError("criterion must be log_loss or brier")
    present = [s for s in scores if s in features]
    combined = [f for f in (logistic_features or scores) if f in features]
    out = []
    for kind in kinds:
        inputs = [combined] if kind == "logistic" else [[s] for s in present]
        for names in inputs:
            out.append(
                candidate(
                    kind,
                    features,
                    labels,
                    names=names,
                    folds=folds,
                    seed=seed,
                    ece_bins=ece_bins,
                    groups=groups,
                )
            )
    out.sort(key=lambda pair: pair[0].criterion(criterion))
    return out
