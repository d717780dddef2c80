"""Applying calibration files: each calibrator kind, round trips, and broken files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.confidence.calibration import (
    Calibration,
    CalibrationError,
    Histogram,
    Isotonic,
    Logistic,
    Platt,
    load_calibration,
)


def test_isotonic_interpolates_and_clamps() -> None:
    iso = Isotonic("s", (-2.0, -1.0, 0.0), (0.1, 0.3, 0.9))
    assert iso({"s": -5.0}) == pytest.approx(0.1)
    assert iso({"s": -1.5}) == pytest.approx(0.2)
    assert iso({"s": -0.5}) == pytest.approx(0.6)
    assert iso({"s": 3.0}) == pytest.approx(0.9)
    assert iso({"other": 1.0}) is None


def test_isotonic_rejects_unsorted_points() -> None:
    with pytest.raises(CalibrationError):
        Isotonic("s", (0.0, -1.0), (0.1, 0.2))


def test_platt_is_a_sigmoid() -> None:
    p = Platt("s", a=2.0, b=1.0)
    assert p({"s": -0.5}) == pytest.approx(0.5)
    assert p({"s": 10.0}) > 0.99
    assert p({"s": -1000.0}) == pytest.approx(0.0)  # no overflow


def test_histogram_picks_the_bin() -> None:
    h = Histogram("s", edges=(-1.0, 0.0), values=(0.2, 0.5, 0.9))
    assert h({"s": -3.0}) == 0.2
    assert h({"s": -0.5}) == 0.5
    assert h({"s": 0.0}) == 0.9


def test_logistic_needs_every_feature() -> None:
    lg = Logistic(("a", "b"), (1.0, -1.0), 0.0)
    assert lg({"a": 1.0, "b": 1.0}) == pytest.approx(0.5)
    assert lg({"a": 1.0}) is None


@pytest.mark.parametrize(
    "calibrator",
    [
        Isotonic("min_logprob", (-3.0, 0.0), (0.05, 0.95)),
        Platt("min_logprob", 1.5, 0.2),
        Histogram("min_logprob", (-1.0,), (0.1, 0.8)),
        Logistic(("min_logprob", "agreement"), (0.5, 2.0), -1.0, (0.0, 0.5), (1.0, 0.2)),
    ],
)
def test_round_trip_through_the_file(tmp_path: Path, calibrator) -> None:
    cal = Calibration(
        "min_logprob", calibrator, model="m", fitted_on={"n": 10}, metrics={"ece": 0.1}
    )
    path = tmp_path / "cal.json"
    cal.save(path)
    back = load_calibration(path)
    feats = {"min_logprob": -0.7, "agreement": 0.6}
    assert back(feats) == pytest.approx(cal(feats))
    assert back.fitted_on == {"n": 10}
    assert back.to_dict() == cal.to_dict()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "must hold a JSON object"),
        ('{"format": "other"}', "not an abstain-calibration/1"),
        ('{"format": "abstain-calibration/1", "score": "s"}', "lacks"),
        ('{"format": "abstain-calibration/1", "score": "s", "calibrator": {"kind": "magic"}}',
         "unknown calibrator kind"),
        ('{"format": "abstain-calibration/1", "score": "s", "calibrator": {"kind": "platt"}}',
         "malformed platt"),
    ],
)  # fmt: skip
def test_broken_files_name_the_path_and_the_problem(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(CalibrationError) as err:
        load_calibration(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="cannot read"):
        load_calibration(tmp_path / "nope.json")


def test_saved_file_is_plain_json(tmp_path: Path) -> None:
    Calibration("s", Platt("s", 1.0, 0.0)).save(tmp_path / "c.json")
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["calibrator"] == {"kind": "platt", "a": 1.0, "b": 0.0}
