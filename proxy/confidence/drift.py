"""Input drift: a calibration's reference distribution, PSI, and the per-answer outside test.

A calibration is only valid on inputs like the ones it was fitted on. A calibration file
records, per input it reads, a compact *reference*: the decile edges of that input over
the fitting answers, the share of those answers in each bin, and the range they covered
(min, max and the 1st / 99th percentiles). From it:

* :func:`psi` compares live counts per bin with the reference shares (population
  stability index, the symmetrised Kullback-Leibler divergence of the two histograms);
* :meth:`Reference.outside` says whether one answer's inputs leave the fitted range;
* :func:`differs` says whether live counts differ from the reference by more than the
  two samples' noise (a two-sample chi-square test), which PSI alone cannot say on a
  small sample.

Statistics worth knowing before reading a PSI. With ``k`` bins, a live sample of ``m``
answers and a reference of ``n``, PSI between two samples *of the same distribution* is
about ``(k - 1) · (1/m + 1/n)`` on average (the chi-square approximation): 0.05 for
``k = 10``, ``m = 500``, ``n = 549``. :func:`null_psi` gives that number, so a reading is
judged against the noise of its own sample size, not against a folklore 0.1 / 0.25.

Pure: standard library only (fitting from arrays accepts any sequence of floats).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Quantile bins per input (deciles).
DEFAULT_BINS = 10
#: The share an empty bin is given on either side, so that PSI stays finite.
SHARE_FLOOR = 1e-4
#: Percentiles recorded as the "usual" range of an input.
LOW_QUANTILE, HIGH_QUANTILE = 0.01, 0.99
#: Per-answer outside tests: beyond the fitted min/max, or beyond the 1st / 99th percentile.
OUTSIDE_TESTS = ("range", "percentile")


class DriftReferenceError(ValueError):
    """A reference distribution is malformed."""


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of sorted values."""
    n = len(sorted_values)
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True, slots=True)
class InputReference:
    """One input's reference: inner bin edges, the reference share per bin, its range."""

    #: inner edges, increasing and distinct; a value equal to an edge goes to the bin above
    edges: tuple[float, ...]
    #: the reference answers' share in each of the ``len(edges) + 1`` bins (sums to 1)
    shares: tuple[float, ...]
    minimum: float
    maximum: float
    low: float  # 1st percentile
    high: float  # 99th percentile
    n: int

    def __post_init__(self) -> None:
        if len(self.shares) != len(self.edges) + 1:
            raise DriftReferenceError("a reference needs len(shares) == len(edges) + 1")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise DriftReferenceError("reference edges must be strictly increasing")

    @property
    def bins(self) -> int:
        return len(self.shares)

    def bin_of(self, value: float) -> int:
        """The index of the bin ``value`` falls in."""
        return bisect.bisect_right(self.edges, value)

    def outside(self, value: float, test: str = "range") -> bool:
        """Whether ``value`` lies outside what the reference saw (see :data:`OUTSIDE_TESTS`)."""
        if math.isnan(value):
            return False
        if test == "percentile":
            return value < self.low or value > self.high
        return value < self.minimum or value > self.maximum

    def to_dict(self) -> dict[str, Any]:
        return {
            "edges": list(self.edges),  # observed values: not rounded, to bin alike
            "shares": [round(s, 6) for s in self.shares],
            "min": self.minimum,
            "max": self.maximum,
            "p01": round(self.low, 6),
            "p99": round(self.high, 6),
            "n": self.n,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputReference:
        try:
            return cls(
                edges=tuple(float(e) for e in data["edges"]),
                shares=tuple(float(s) for s in data["shares"]),
                minimum=float(data["min"]),
                maximum=float(data["max"]),
                low=float(data.get("p01", data["min"])),
                high=float(data.get("p99", data["max"])),
                n=int(data.get("n", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DriftReferenceError(f"malformed input reference: {exc}") from exc


def fit_input(values: Iterable[float], bins: int = DEFAULT_BINS) -> InputReference | None:
    """The reference of one input from its values (NaN skipped); None without values.

    Edges are the ``bins``-quantiles (observed values), with ties merged (a discrete
    input such as the answer's length gets fewer, wider bins); the shares are those of the values
    themselves under the same binning, so identical data has PSI 0 exactly.
    """
    xs = sorted(float(v) for v in values if not math.isnan(float(v)))
    if not xs:
        return None
    # Edges are observed values (the first value at or above each quantile), so that a
    # discrete input's bins start at its own levels.
    raw = [xs[min(len(xs) - 1, (i * len(xs)) // bins)] for i in range(1, bins)]
    edges: list[float] = []
    for e in raw:
        if e > xs[0] and (not edges or e > edges[-1]):
            edges.append(e)
    counts = [0] * (len(edges) + 1)
    for x in xs:
        counts[bisect.bisect_right(edges, x)] += 1
    return InputReference(
        edges=tuple(edges),
        shares=tuple(c / len(xs) for c in counts),
        minimum=xs[0],
        maximum=xs[-1],
        low=_quantile(xs, LOW_QUANTILE),
        high=_quantile(xs, HIGH_QUANTILE),
        n=len(xs),
    )


@dataclass(frozen=True, slots=True)
class Reference:
    """Every input's reference, and where the data came from."""

    inputs: Mapping[str, InputReference]
    #: which answers the reference was built from (e.g. ``facts-extra (benchmarks/...)``)
    source: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def outside_inputs(self, scores: Mapping[str, float], test: str = "range") -> list[str]:
        """The inputs whose value in ``scores`` lies outside the reference (missing: not)."""
        return [
            name
            for name, ref in self.inputs.items()
            if name in scores and ref.outside(scores[name], test)
        ]

    def outside(self, scores: Mapping[str, float], test: str = "range") -> bool:
        """Whether any of the answer's inputs lies outside what the calibration saw."""
        return bool(self.outside_inputs(scores, test))

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "bins": max((r.bins for r in self.inputs.values()), default=0),
            **dict(self.extra),
            "inputs": {name: ref.to_dict() for name, ref in self.inputs.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reference:
        inputs = data.get("inputs")
        if not isinstance(inputs, Mapping):
            raise DriftReferenceError("a reference needs an 'inputs' object")
        extra = {k: v for k, v in data.items() if k not in ("source", "bins", "inputs")}
        return cls(
            inputs={str(k): InputReference.from_dict(v) for k, v in inputs.items()},
            source=str(data.get("source", "")),
            extra=extra,
        )


def build_reference(
    features: Mapping[str, Iterable[float]],
    names: Sequence[str],
    *,
    source: str = "",
    bins: int = DEFAULT_BINS,
) -> Reference:
    """The reference of ``names`` (those present in ``features``) from their arrays."""
    inputs = {}
    for name in names:
        if name in features:
            ref = fit_input(features[name], bins)
            if ref is not None:
                inputs[name] = ref
    return Reference(inputs, source=source)


def psi(
    shares: Sequence[float], counts: Sequence[int] | Sequence[float], floor: float = SHARE_FLOOR
) -> float:
    """Population stability index of live ``counts`` per bin against reference ``shares``.

    ``sum((a - e) · ln(a / e))`` over bins, with the live shares ``a`` and the reference
    shares ``e`` both floored at ``floor`` (an empty bin would make it infinite). 0 when
    there are no live counts.
    """
    if len(shares) != len(counts):
        raise ValueError("psi needs one count per reference bin")
    total = float(sum(counts))
    if total <= 0:
        return 0.0
    value = 0.0
    for e, c in zip(shares, counts, strict=True):
        a = max(c / total, floor)
        e = max(e, floor)
        value += (a - e) * math.log(a / e)
    return value


def counts_of(ref: InputReference, values: Iterable[float]) -> list[int]:
    """Live counts per bin of ``ref`` for ``values`` (NaN skipped)."""
    counts = [0] * ref.bins
    for v in values:
        fv = float(v)
        if not math.isnan(fv):
            counts[ref.bin_of(fv)] += 1
    return counts


def psi_of(ref: InputReference, values: Iterable[float]) -> float:
    """PSI of a sample of one input against its reference."""
    return psi(ref.shares, counts_of(ref, values))


def null_psi(bins: int, live: int, reference: int) -> float:
    """The PSI two samples of one distribution show on average: ``(k-1)(1/m + 1/n)``."""
    if live <= 0:
        return float("inf")
    return (bins - 1) * (1.0 / live + (1.0 / reference if reference > 0 else 0.0))


def chi_square(ref: InputReference, counts: Sequence[int]) -> float:
    """Two-sample chi-square of live ``counts`` against the reference's shares.

    ``Σ (a − e)² / e`` over the bins, live shares ``a`` and reference shares ``e``
    (floored as in :func:`psi`), divided by ``1/m + 1/n``: each bin's difference has
    variance about ``e·(1 − e)·(1/m + 1/n)`` when both samples come from one
    distribution, so the sum is then about chi-square with ``bins − 1`` degrees of
    freedom.
    """
    if len(counts) != ref.bins:
        raise ValueError("chi_square needs one count per reference bin")
    m = float(sum(counts))
    if m <= 0 or ref.n <= 0:
        return 0.0
    total = sum(
        (c / m - e) ** 2 / max(e, SHARE_FLOOR) for e, c in zip(ref.shares, counts, strict=True)
    )
    return total / (1.0 / m + 1.0 / ref.n)


def chi_square_sf(x: float, dof: int) -> float:
    """P(χ² > x) with ``dof`` degrees of freedom, exactly, by the finite sums that integer
    degrees of freedom allow (z = x/2):

    * even dof = 2k: ``e^(−z) · Σ_{i<k} z^i / i!``;
    * odd dof = 2k + 1: ``erfc(√z) + e^(−z) · Σ_{i=1..k} z^(i−1/2) / Γ(i + 1/2)``.

    Each term is computed in log space, so a huge statistic gives 0 rather than overflow.
    """
    if dof < 1:
        raise ValueError("need dof >= 1")
    if x <= 0.0:
        return 1.0
    z = x / 2.0
    log_z = math.log(z)
    k, odd = divmod(dof, 2)
    if odd:
        terms = (math.exp((i - 0.5) * log_z - z - math.lgamma(i + 0.5)) for i in range(1, k + 1))
        return min(1.0, math.erfc(math.sqrt(z)) + sum(terms))
    return min(1.0, sum(math.exp(i * log_z - z - math.lgamma(i + 1)) for i in range(k)))


def differs(ref: InputReference, counts: Sequence[int], alpha: float) -> bool:
    """Whether the live counts differ from the reference at significance ``alpha``."""
    if ref.bins < 2:
        return False
    return chi_square_sf(chi_square(ref, counts), ref.bins - 1) < alpha
