"""Calibration files: map a raw confidence score to P(correct).

A calibration file is JSON::

    {
      "format": "abstain-calibration/1",
      "method": "logprobs",            # which estimator produced the scores
      "score": "min_logprob",          # the raw score the mapping applies to
      "model": "gemma-3-270m",
      "calibrator": {"kind": "isotonic", "x": [...], "y": [...]},
      "fitted_on": {"dataset": "facts-dev", "n": 411, "date": "2026-11-24"},
      "metrics": {"ece": 0.03, "auroc": 0.81, "brier": 0.14, "ece_bins": 10, "held_out": true},
      "reference": {"source": "...", "bins": 10, "inputs": {"min_logprob": {"edges": [...],
                    "shares": [...], "min": ..., "max": ..., "p01": ..., "p99": ..., "n": 411}}}
    }

``reference`` (optional, :mod:`proxy.confidence.drift`) is the distribution of the inputs
over the answers it describes, for the drift monitor and the out-of-distribution test.

Calibrator kinds: ``isotonic`` (piecewise-linear through fitted points), ``platt``
(sigmoid(a·x + b)), ``histogram`` (bin edges and per-bin rates) and ``logistic``
(sigmoid of a weighted sum of several named features, for hybrid scores).
Fitting lives in :mod:`proxy.confidence.fitting`; this module only applies.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from proxy.confidence.drift import DriftReferenceError, Reference

FORMAT = "abstain-calibration/1"


class CalibrationError(ValueError):
    """A calibration file is missing, unreadable or malformed."""


class Calibrator(Protocol):
    """Maps a feature dict to a probability in [0, 1]."""

    @property
    def kind(self) -> str: ...

    def __call__(self, features: Mapping[str, float]) -> float | None: ...

    def to_dict(self) -> dict[str, Any]: ...


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _clip(p: float) -> float:
    return 0.0 if p < 0.0 else 1.0 if p > 1.0 else p


@dataclass(frozen=True)
class Isotonic:
    """Monotone step mapping, interpolated linearly between fitted points."""

    score: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    kind: str = "isotonic"

    def __post_init__(self) -> None:
        if not self.x or len(self.x) != len(self.y):
            raise CalibrationError("isotonic calibrator needs equal, non-empty x and y")
        if any(b < a for a, b in zip(self.x, self.x[1:], strict=False)):
            raise CalibrationError("isotonic calibrator x must be sorted")

    def __call__(self, features: Mapping[str, float]) -> float | None:
        v = features.get(self.score)
        if v is None:
            return None
        xs, ys = self.x, self.y
        if v <= xs[0]:
            return _clip(ys[0])
        if v >= xs[-1]:
            return _clip(ys[-1])
        i = bisect.bisect_right(xs, v)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        if x1 == x0:
            return _clip(y1)
        return _clip(y0 + (y1 - y0) * (v - x0) / (x1 - x0))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "x": list(self.x), "y": list(self.y)}


@dataclass(frozen=True)
class Platt:
    """Logistic mapping sigmoid(a·x + b) of one score."""

    score: str
    a: float
    b: float
    kind: str = "platt"

    def __call__(self, features: Mapping[str, float]) -> float | None:
        v = features.get(self.score)
        return None if v is None else _sigmoid(self.a * v + self.b)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "a": self.a, "b": self.b}


@dataclass(frozen=True)
class Histogram:
    """Histogram binning: the observed rate of correct answers in the score's bin."""

    score: str
    edges: tuple[float, ...]  # inner edges: len(values) - 1 of them
    values: tuple[float, ...]
    kind: str = "histogram"

    def __post_init__(self) -> None:
        if len(self.values) != len(self.edges) + 1:
            raise CalibrationError("histogram calibrator needs len(values) == len(edges) + 1")

    def __call__(self, features: Mapping[str, float]) -> float | None:
        v = features.get(self.score)
        if v is None:
            return None
        return _clip(self.values[bisect.bisect_right(self.edges, v)])

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "edges": list(self.edges), "values": list(self.values)}


@dataclass(frozen=True)
class Logistic:
    """Logistic regression over several named features (the hybrid score)."""

    features: tuple[str, ...]
    weights: tuple[float, ...]
    bias: float
    # Standardisation fitted with the weights, so the stored weights are comparable.
    means: tuple[float, ...] = ()
    scales: tuple[float, ...] = ()
    kind: str = "logistic"

    def __post_init__(self) -> None:
        if len(self.features) != len(self.weights):
            raise CalibrationError("logistic calibrator needs one weight per feature")

    def __call__(self, features: Mapping[str, float]) -> float | None:
        z = self.bias
        for i, name in enumerate(self.features):
            v = features.get(name)
            if v is None:
                return None
            if self.means:
                v = (v - self.means[i]) / (self.scales[i] or 1.0)
            z += self.weights[i] * v
        return _sigmoid(z)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "features": list(self.features),
            "weights": list(self.weights),
            "bias": self.bias,
            "means": list(self.means),
            "scales": list(self.scales),
        }


def calibrator_from_dict(score: str, data: Mapping[str, Any]) -> Calibrator:
    """Build a calibrator from its JSON object."""
    kind = data.get("kind")
    try:
        if kind == "isotonic":
            return Isotonic(score, _floats(data["x"]), _floats(data["y"]))
        if kind == "platt":
            return Platt(score, float(data["a"]), float(data["b"]))
        if kind == "histogram":
            return Histogram(score, _floats(data["edges"]), _floats(data["values"]))
        if kind == "logistic":
            return Logistic(
                tuple(str(f) for f in data["features"]),
                _floats(data["weights"]),
                float(data["bias"]),
                _floats(data.get("means", ())),
                _floats(data.get("scales", ())),
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise CalibrationError(f"malformed {kind} calibrator: {exc}") from exc
    raise CalibrationError(f"unknown calibrator kind {kind!r}")


def _floats(values: Sequence[Any]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class Calibration:
    """A fitted mapping from one method's raw score(s) to P(correct), with its provenance."""

    score: str
    calibrator: Calibrator
    method: str = "logprobs"
    model: str | None = None
    fitted_on: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    #: labelled answers the mapping was *not* fitted on: ``{"source", "confidence": [...],
    #: "correct": [...]}``; a rule's ``target_error`` chooses its threshold from them
    validation: Mapping[str, Any] = field(default_factory=dict)
    #: the distribution of the inputs it was fitted on (drift and the outside test);
    #: None in files written before it existed
    reference: Reference | None = None

    def __call__(self, features: Mapping[str, float]) -> float | None:
        """P(correct) for an answer's raw scores, or None when the needed score is missing."""
        return self.calibrator(features)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every score this calibration reads (a logistic model reads several)."""
        return self.calibrator.features if isinstance(self.calibrator, Logistic) else (self.score,)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "method": self.method,
            "score": self.score,
            "model": self.model,
            "calibrator": self.calibrator.to_dict(),
            "fitted_on": dict(self.fitted_on),
            "metrics": dict(self.metrics),
            **({"validation": dict(self.validation)} if self.validation else {}),
            **({"reference": self.reference.to_dict()} if self.reference is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        if data.get("format") != FORMAT:
            raise CalibrationError(f"not an {FORMAT} file (format={data.get('format')!r})")
        try:
            score = str(data["score"])
            calibrator = calibrator_from_dict(score, data["calibrator"])
        except KeyError as exc:
            raise CalibrationError(f"calibration file lacks {exc}") from exc
        reference = None
        if data.get("reference") is not None:
            try:
                reference = Reference.from_dict(data["reference"])
            except (DriftReferenceError, AttributeError) as exc:
                raise CalibrationError(f"malformed reference: {exc}") from exc
        return cls(
            score=score,
            calibrator=calibrator,
            method=str(data.get("method", "logprobs")),
            model=data.get("model"),
            fitted_on=dict(data.get("fitted_on") or {}),
            metrics=dict(data.get("metrics") or {}),
            validation=dict(data.get("validation") or {}),
            reference=reference,
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration file; raises :class:`CalibrationError` with the path on failure."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read calibration file ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise CalibrationError(f"{path}: calibration file must hold a JSON object")
    try:
        return Calibration.from_dict(data)
    except CalibrationError as exc:
        raise CalibrationError(f"{path}: {exc}") from exc
