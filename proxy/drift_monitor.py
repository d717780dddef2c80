"""Live input drift per tenant and model: is the traffic still what the calibration saw?

:class:`DriftMonitor` keeps, for each (tenant, model), a window of the last ``window``
judged answers: one ring buffer of reference-bin indexes per calibration input (one byte
per answer and input) and the count per bin it implies. Each answer costs O(inputs) to
add, plus O(inputs × bins) to refresh the gauges:

* ``abstain_input_drift_psi{tenant, model, input}``: PSI of the window against the
  calibration's reference (:mod:`proxy.confidence.drift`);
* ``abstain_input_drift{tenant, model}``: the largest of them (one shifted input is
  enough to make P(correct) unreliable);
* ``abstain_input_drift_window_answers{tenant, model}``: how many answers the PSI rests on;
* ``abstain_out_of_distribution_total{tenant, model}``: answers the verdict marked
  ``out_of_distribution``.

Why a window of the last N answers rather than exponential decay: the PSI of a sample of
size N has a known noise floor, about ``(bins - 1) · (1/N + 1/n_ref)`` (0.034 for N = 500
and 549 reference answers), so an alert threshold means the same thing for every tenant,
and the window forgets a past shift exactly N answers later. PSI is exported only once
the window holds ``min_answers`` answers; below that a few odd answers would read as drift.

**Acting on it** (a rule's ``drift_psi``): :meth:`DriftMonitor.drifted` says whether an
input of the window reads a PSI of at least that level *and* differs from the reference
by more than the two samples' noise (:func:`proxy.confidence.drift.differs`, at
``alpha`` = 10⁻⁵ over the inputs, Bonferroni), from ``act_answers`` = 30 answers on.
PSI alone is no test on a small window: on windows of 100, in-domain answers of the
reference model read above 0.25 one time in nine. The pipeline then judges the call at
the rule's ``ood_threshold`` (docs/calibration.md, "Acting on drift").

When a policy reload changes a tenant's calibration (another reference), its window starts
over. Answers judged without the calibration (uncalibrated rules, the logprob fallback of
a sampled rule) are not counted: they are not what the reference describes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import Gauge

from proxy.confidence.calibration import Calibration
from proxy.confidence.drift import InputReference, Reference, differs, psi
from proxy.metrics import Metrics
from proxy.verdict import Verdict

#: Answers per window (per tenant and model).
DEFAULT_WINDOW = 500
#: Answers the window must hold before PSI is exported.
DEFAULT_MIN_ANSWERS = 100
#: Answers the window must hold before a rule's ``drift_psi`` may act.
DEFAULT_ACT_ANSWERS = 30
#: Significance at which the window must differ from the reference to act (over all of
#: its inputs: each is tested at alpha / inputs). In-domain answers of the reference
#: model, 100 random orders each of facts-extra and of its chat requests: 10⁻⁴ raised
#: an alarm in one order of each, 10⁻⁵ in none (``benchmarks/drift_action.py --seeds
#: 100 [--alpha 1e-4]``).
DEFAULT_ALPHA = 1e-5
_EMPTY = 255  # ring slot with no value for this input (missing score, or not yet filled)


class _Window:
    """The last ``size`` answers of one (tenant, model), as bin indexes per input."""

    __slots__ = ("answers", "counts", "names", "pos", "reference", "refs", "rings", "size")

    def __init__(self, reference: Reference, size: int) -> None:
        self.reference = reference
        self.names = tuple(reference.inputs)
        self.refs: tuple[InputReference, ...] = tuple(reference.inputs[n] for n in self.names)
        if any(r.bins >= _EMPTY for r in self.refs):
            raise ValueError(f"a drift reference may have at most {_EMPTY - 1} bins per input")
        self.size = size
        self.rings = [bytearray([_EMPTY]) * size for _ in self.names]
        self.counts = [[0] * r.bins for r in self.refs]
        self.pos = 0
        self.answers = 0

    def add(self, scores: Mapping[str, float]) -> None:
        pos = self.pos
        for i, name in enumerate(self.names):
            ring, counts = self.rings[i], self.counts[i]
            old = ring[pos]
            if old != _EMPTY:
                counts[old] -= 1
            value = scores.get(name)
            if value is None or math.isnan(value):
                ring[pos] = _EMPTY
            else:
                b = self.refs[i].bin_of(value)
                ring[pos] = b
                counts[b] += 1
        self.pos = (pos + 1) % self.size
        self.answers = min(self.answers + 1, self.size)

    def psi(self, min_answers: int) -> dict[str, float]:
        """PSI per input with at least ``min_answers`` values in the window."""
        return {
            name: psi(ref.shares, counts)
            for name, ref, counts in zip(self.names, self.refs, self.counts, strict=True)
            if sum(counts) >= min_answers
        }


@dataclass(frozen=True, slots=True)
class DriftReading:
    """What the monitor knows about one (tenant, model) now."""

    answers: int
    psi: Mapping[str, float]

    @property
    def summary(self) -> float | None:
        """The largest PSI over the inputs (None before enough answers)."""
        return max(self.psi.values()) if self.psi else None


@dataclass(frozen=True, slots=True)
class TrafficDrift:
    """A (tenant, model) whose recent traffic has moved away from the calibration's data."""

    input: str
    psi: float
    answers: int
    level: float

    def to_dict(self) -> dict[str, object]:
        """What the verdict's ``traffic_drift`` shows."""
        return {
            "input": self.input,
            "psi": round(self.psi, 3),
            "answers": self.answers,
            "drift_psi": self.level,
        }


class DriftMonitor:
    """Windows of recent answers per (tenant, model), exported as drift gauges."""

    def __init__(
        self,
        metrics: Metrics | None = None,
        *,
        window: int = DEFAULT_WINDOW,
        min_answers: int = DEFAULT_MIN_ANSWERS,
        act_answers: int | None = None,
        alpha: float = DEFAULT_ALPHA,
    ) -> None:
        if window < 1 or not 1 <= min_answers <= window:
            raise ValueError("need window >= 1 and 1 <= min_answers <= window")
        if act_answers is None:  # the default, within what a smaller window holds
            act_answers = min(DEFAULT_ACT_ANSWERS, window)
        if not 1 <= act_answers <= window or not 0.0 < alpha < 1.0:
            raise ValueError("need 1 <= act_answers <= window and 0 < alpha < 1")
        self.metrics = metrics
        self.window = window
        self.min_answers = min_answers
        self.act_answers = act_answers
        self.alpha = alpha
        self._windows: dict[tuple[str, str], _Window] = {}

    def observe(
        self, tenant: str, model: str, calibration: Calibration | None, verdict: Verdict
    ) -> None:
        """Count one verdict's inputs, if its calibration has a reference and judged it."""
        if verdict.out_of_distribution and self.metrics is not None:
            self.metrics.out_of_distribution.labels(tenant, model).inc()
        reference = calibration.reference if calibration is not None else None
        if reference is None or not reference.inputs or not verdict.calibrated:
            return
        # A calibration of sentences has a reference of sentences: each part is counted.
        inputs = (
            [p.scores for p in verdict.sentences if p.decision != "unjudged" and p.scores]
            if verdict.sentences is not None
            else [verdict.scores]
        )
        if verdict.decision == "unjudged" or not any(inputs):
            return
        key = (tenant, model)
        win = self._windows.get(key)
        if win is None or (win.reference is not reference and win.reference != reference):
            if win is not None:
                self._clear(tenant, model, win.names)
            win = self._windows[key] = _Window(reference, self.window)
        for scores in inputs:
            win.add(scores)
        self._export(tenant, model, win)

    def reading(self, tenant: str, model: str) -> DriftReading | None:
        """The window's answer count and PSI per input, or None before any answer."""
        win = self._windows.get((tenant, model))
        if win is None:
            return None
        return DriftReading(win.answers, win.psi(self.min_answers))

    def drifted(self, tenant: str, model: str, level: float) -> TrafficDrift | None:
        """The input with the largest PSI among those at ``level`` or above whose counts
        also differ significantly from the reference (``alpha``), over at least
        ``act_answers`` answers; None when there is none. O(inputs × bins); called only
        for rules that set ``drift_psi``."""
        win = self._windows.get((tenant, model))
        if win is None or win.answers < self.act_answers:
            return None
        best: tuple[str, float] | None = None
        for name, ref, counts in zip(win.names, win.refs, win.counts, strict=True):
            if sum(counts) < self.act_answers:
                continue
            value = psi(ref.shares, counts)
            if value < level or (best is not None and value <= best[1]):
                continue
            if differs(ref, counts, self.alpha / len(win.refs)):
                best = (name, value)
        return None if best is None else TrafficDrift(best[0], best[1], win.answers, level)

    def _export(self, tenant: str, model: str, win: _Window) -> None:
        m = self.metrics
        if m is None:
            return
        m.input_drift_window.labels(tenant, model).set(win.answers)
        values = win.psi(self.min_answers)
        for name, value in values.items():
            m.input_drift_psi.labels(tenant, model, name).set(value)
        if values:
            m.input_drift.labels(tenant, model).set(max(values.values()))

    def _clear(self, tenant: str, model: str, names: tuple[str, ...]) -> None:
        """Forget the gauges of a window that starts over (its inputs may differ)."""
        m = self.metrics
        if m is None:
            return
        series: list[tuple[Gauge, tuple[str, ...]]] = [
            (m.input_drift, (tenant, model)),
            (m.input_drift_window, (tenant, model)),
        ]
        series += [(m.input_drift_psi, (tenant, model, n)) for n in names]
        for gauge, labels in series:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
