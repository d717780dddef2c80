"""The drift statistic, the outside test, and the reference in a calibration file."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from proxy.confidence import drift
from proxy.confidence.calibration import (
    Calibration,
    CalibrationError,
    Platt,
    load_calibration,
)
from proxy.drift_monitor import DriftMonitor
from proxy.evaluation.calibrate import Labelled, build_calibration, fit_method, fitted_reference
from proxy.metrics import Metrics
from proxy.verdict import Verdict

SHIPPED = Path(__file__).resolve().parents[2] / "policies" / "calibration" / "gemma-3-270m.json"


def test_psi_of_identical_shares_is_zero() -> None:
    assert drift.psi([0.25] * 4, [10, 10, 10, 10]) == pytest.approx(0.0, abs=1e-12)
    assert drift.psi([0.1, 0.2, 0.7], [1, 2, 7]) == pytest.approx(0.0, abs=1e-12)


def test_psi_of_a_known_shift_is_the_hand_computed_value() -> None:
    # (0.8 - 0.5) ln(0.8 / 0.5) + (0.2 - 0.5) ln(0.2 / 0.5)
    expected = 0.3 * math.log(1.6) + (-0.3) * math.log(0.4)
    assert expected == pytest.approx(0.415888, abs=1e-6)
    assert drift.psi([0.5, 0.5], [80, 20]) == pytest.approx(expected, rel=1e-12)


def test_an_empty_bin_is_floored_so_psi_stays_finite() -> None:
    floor = drift.SHARE_FLOOR
    expected = 0.5 * math.log(2) + (floor - 0.5) * math.log(floor / 0.5)
    assert drift.psi([0.5, 0.5], [10, 0]) == pytest.approx(expected, rel=1e-12)
    assert drift.psi([0.5, 0.5], [0, 0]) == 0.0
    with pytest.raises(ValueError):
        drift.psi([0.5, 0.5], [1, 2, 3])


def test_reference_bins_are_deciles_and_its_own_data_has_psi_zero() -> None:
    rng = random.Random(0)
    values = [rng.gauss(0.0, 1.0) for _ in range(2000)]
    ref = drift.fit_input(values)
    assert ref is not None
    assert ref.bins == 10 and len(ref.edges) == 9
    assert all(s == pytest.approx(0.1, abs=0.002) for s in ref.shares)
    assert sum(ref.shares) == pytest.approx(1.0)
    assert drift.psi_of(ref, values) == pytest.approx(0.0, abs=1e-12)
    assert ref.minimum == min(values) and ref.maximum == max(values)


def test_same_distribution_stays_near_the_null_and_a_shift_does_not() -> None:
    rng = random.Random(1)
    ref = drift.fit_input([rng.gauss(0.0, 1.0) for _ in range(1000)])
    assert ref is not None
    same = drift.psi_of(ref, [rng.gauss(0.0, 1.0) for _ in range(1000)])
    shifted = drift.psi_of(ref, [rng.gauss(1.0, 1.0) for _ in range(1000)])
    null = drift.null_psi(10, 1000, 1000)
    assert null == pytest.approx(0.018)
    assert same < 3 * null
    # A one-sigma mean shift of a normal: PSI ~ 1 (KL both ways is 0.5 each).
    assert 0.7 < shifted < 1.3


def test_ties_merge_bins_of_a_discrete_input() -> None:
    values = [0.0] * 50 + [math.log(2)] * 30 + [math.log(3)] * 20
    ref = drift.fit_input(values)
    assert ref is not None
    assert ref.edges == (math.log(2), math.log(3))
    assert ref.shares == pytest.approx((0.5, 0.3, 0.2))
    assert drift.psi_of(ref, values) == pytest.approx(0.0, abs=1e-12)


def test_outside_test_beyond_range_and_beyond_percentiles() -> None:
    ref = drift.fit_input([float(i) for i in range(101)])  # 0..100
    assert ref is not None
    assert ref.low == pytest.approx(1.0) and ref.high == pytest.approx(99.0)
    assert not ref.outside(0.0) and not ref.outside(100.0) and not ref.outside(50.0)
    assert ref.outside(-0.1) and ref.outside(100.5)
    assert ref.outside(0.5, "percentile") and ref.outside(99.5, "percentile")
    assert not ref.outside(50.0, "percentile")
    assert not ref.outside(float("nan"))


def test_reference_outside_names_the_inputs_and_ignores_missing_ones() -> None:
    ref = drift.build_reference(
        {"a": [0.0, 1.0, 2.0], "b": [-1.0, 0.0, 1.0]}, ["a", "b", "absent"], source="test"
    )
    assert list(ref.inputs) == ["a", "b"]
    assert ref.outside_inputs({"a": 3.0, "b": 0.0}) == ["a"]
    assert ref.outside({"a": 1.0}) is False
    assert ref.outside({"a": 1.0, "b": 5.0}) is True


def _calibration(reference: drift.Reference | None) -> Calibration:
    return Calibration(
        score="min_logprob",
        calibrator=Platt("min_logprob", 2.0, 2.0),
        model="m",
        fitted_on={"dataset": "toy"},
        reference=reference,
    )


def test_reference_round_trips_through_the_calibration_file(tmp_path: Path) -> None:
    rng = random.Random(2)
    ref = drift.build_reference(
        {"min_logprob": [rng.uniform(-2, 0) for _ in range(300)]}, ["min_logprob"], source="toy"
    )
    path = tmp_path / "cal.json"
    _calibration(ref).save(path)
    loaded = load_calibration(path)
    assert loaded.reference is not None
    assert loaded.reference.source == "toy"
    got, want = loaded.reference.inputs["min_logprob"], ref.inputs["min_logprob"]
    assert got.edges == pytest.approx(want.edges, abs=1e-6)
    assert got.shares == pytest.approx(want.shares, abs=1e-6)
    assert (got.minimum, got.maximum, got.n) == (want.minimum, want.maximum, 300)
    # Saved again, the file does not change.
    first = path.read_text()
    loaded.save(path)
    assert path.read_text() == first


def test_files_without_a_reference_still_load(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    data = _calibration(None).to_dict()
    assert "reference" not in data
    path.write_text(json.dumps(data))
    assert load_calibration(path).reference is None


def test_a_malformed_reference_is_a_calibration_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    data = _calibration(None).to_dict()
    data["reference"] = {"inputs": {"min_logprob": {"edges": [0.0], "shares": [1.0]}}}
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match="reference"):
        load_calibration(path)


def test_the_shipped_calibration_records_its_reference_and_its_source() -> None:
    cal = load_calibration(SHIPPED)
    assert cal.reference is not None
    assert set(cal.reference.inputs) == set(cal.inputs)
    # Written by `abstain calibrate` from the answers it was fitted on.
    assert cal.fitted_on["dataset"] in cal.reference.source
    for ref in cal.reference.inputs.values():
        assert sum(ref.shares) == pytest.approx(1.0, abs=1e-4)
        assert ref.n == cal.fitted_on["n"] == 548


def test_calibrate_builds_the_reference_over_rows_that_have_every_input() -> None:
    data = Labelled(
        {"a": np.array([0.0, 1.0, np.nan, 3.0]), "b": np.array([1.0, 2.0, 3.0, np.nan])},
        np.array([1.0, 0.0, 1.0, 0.0]),
    )
    ref = fitted_reference(data, ("a", "b"), source="toy")
    assert ref is not None
    assert ref.inputs["a"].n == 2 and ref.inputs["a"].maximum == 1.0
    assert fitted_reference(data, ("a", "missing"), source="toy") is None


def _verdict(scores: dict[str, float], calibrated: bool = True) -> Verdict:
    return Verdict(
        decision="answer",
        confidence=0.9,
        threshold=0.5,
        score=None,
        score_name="x",
        method="logprobs",
        calibrated=calibrated,
        tenant="t",
        scores=scores,
    )


def test_monitor_window_forgets_old_answers_and_exports_psi() -> None:
    ref = drift.build_reference({"x": [i / 100 for i in range(100)]}, ["x"])
    cal = _calibration(ref)
    metrics = Metrics()
    monitor = DriftMonitor(metrics, window=100, min_answers=50)
    for i in range(49):
        monitor.observe("t", "m", cal, _verdict({"x": i / 49}))
    reading = monitor.reading("t", "m")
    assert reading is not None and reading.answers == 49 and reading.summary is None
    assert (
        metrics.registry.get_sample_value("abstain_input_drift", {"tenant": "t", "model": "m"})
        is None
    )
    for i in range(51):
        monitor.observe("t", "m", cal, _verdict({"x": i / 51}))
    low = monitor.reading("t", "m")
    assert low is not None and low.summary is not None and low.summary < 0.2
    for _ in range(100):  # the whole window is now one bin
        monitor.observe("t", "m", cal, _verdict({"x": 0.995}))
    high = monitor.reading("t", "m")
    assert high is not None and high.answers == 100
    assert high.summary == pytest.approx(drift.psi(ref.inputs["x"].shares, [0] * 9 + [100]))
    got = metrics.registry.get_sample_value("abstain_input_drift", {"tenant": "t", "model": "m"})
    assert got == pytest.approx(high.summary)
    # Uncalibrated verdicts are not what the reference describes: not counted.
    monitor.observe("t", "m", cal, _verdict({"x": 0.0}, calibrated=False))
    assert monitor.reading("t", "m") == high


def test_monitor_starts_over_when_the_calibration_changes() -> None:
    first = _calibration(drift.build_reference({"x": [0.0, 1.0, 2.0]}, ["x"]))
    second = _calibration(drift.build_reference({"x": [5.0, 6.0, 7.0]}, ["x"]))
    monitor = DriftMonitor(Metrics(), window=10, min_answers=1)
    for _ in range(5):
        monitor.observe("t", "m", first, _verdict({"x": 1.0}))
    monitor.observe("t", "m", second, _verdict({"x": 6.0}))
    reading = monitor.reading("t", "m")
    assert reading is not None and reading.answers == 1
    assert monitor.reading("t", "other") is None
    monitor.observe("t", "n", _calibration(None), _verdict({"x": 1.0}))
    assert monitor.reading("t", "n") is None


def test_build_calibration_records_the_reference_of_the_fitted_answers() -> None:
    rng = np.random.default_rng(3)
    x = rng.uniform(-3.0, 0.0, 200)
    y = (rng.uniform(0, 1, 200) < 1 / (1 + np.exp(-(2 * x + 2)))).astype(float)
    data = Labelled({"min_logprob": x}, y)
    (best, calibrator), *_ = fit_method(data, "logprobs", score="min_logprob", kinds=("platt",))
    options = {"method": "logprobs", "model": "m", "fitted_on": {"dataset": "toy"}, "folds": 5}
    assert build_calibration(best, calibrator, **options).reference is None
    cal = build_calibration(best, calibrator, data=data, **options)
    assert cal.reference is not None and list(cal.reference.inputs) == ["min_logprob"]
    assert cal.reference.inputs["min_logprob"].n == 200
    assert cal.reference.source.startswith("toy")
    assert Calibration.from_dict(cal.to_dict()).to_dict() == cal.to_dict()


def test_drifted_needs_act_answers_a_psi_at_the_level_and_a_significant_difference() -> None:
    ref = drift.build_reference({"x": [i / 100 for i in range(100)]}, ["x"])
    cal = _calibration(ref)
    monitor = DriftMonitor(None, window=100, min_answers=20, act_answers=30)
    assert monitor.drifted("t", "m", 0.25) is None  # nothing seen
    for _ in range(29):  # all in the top decile: PSI far above 0.25 ...
        monitor.observe("t", "m", cal, _verdict({"x": 0.995}))
    assert monitor.drifted("t", "m", 0.25) is None  # ... but on 29 answers, not 30
    monitor.observe("t", "m", cal, _verdict({"x": 0.995}))
    got = monitor.drifted("t", "m", 0.25)
    counts = [0] * 9 + [30]
    assert got is not None and got.input == "x" and got.answers == 30
    assert got.psi == pytest.approx(drift.psi(ref.inputs["x"].shares, counts))
    assert got.to_dict() == {
        "input": "x",
        "psi": round(got.psi, 3),
        "answers": 30,
        "drift_psi": 0.25,
    }
    assert monitor.drifted("t", "m", got.psi + 0.01) is None  # below a higher level
    assert monitor.drifted("t", "other", 0.25) is None
    # In-domain answers push the old ones out: the window is no longer drifted.
    for i in range(100):
        monitor.observe("t", "m", cal, _verdict({"x": i / 100}))
    assert monitor.drifted("t", "m", 0.25) is None


def test_a_large_psi_on_a_small_window_is_not_drift_unless_it_is_significant() -> None:
    # 30 answers spread evenly except one empty decile: PSI counts the empty bin as a
    # large shift (its share floored), the chi-square test sees sampling noise.
    ref = drift.build_reference({"x": [i / 100 for i in range(100)]}, ["x"])
    cal = _calibration(ref)
    monitor = DriftMonitor(None, window=100, min_answers=20, act_answers=30)
    values = [d / 10 + 0.05 for d in range(9) for _ in range(3)] + [0.05, 0.15, 0.25]
    for v in values:
        monitor.observe("t", "m", cal, _verdict({"x": v}))
    counts = [ref.inputs["x"].bin_of(v) for v in values]
    live = [counts.count(b) for b in range(10)]
    assert live[9] == 0 and drift.psi(ref.inputs["x"].shares, live) > 0.25
    assert not drift.differs(ref.inputs["x"], live, 1e-5)
    assert monitor.drifted("t", "m", 0.25) is None


def test_act_answers_and_alpha_are_checked() -> None:
    assert DriftMonitor(None).act_answers == 30 and DriftMonitor(None).alpha == 1e-5
    assert DriftMonitor(None, window=10, min_answers=1).act_answers == 10
    with pytest.raises(ValueError, match="act_answers"):
        DriftMonitor(None, window=100, min_answers=50, act_answers=200)
    with pytest.raises(ValueError, match="alpha"):
        DriftMonitor(None, alpha=0.0)


def test_chi_square_tail_matches_closed_forms_and_tables() -> None:
    # Even degrees of freedom: Q = e^(-x/2) Σ_{i<k} (x/2)^i / i!, k = dof / 2.
    for dof in (2, 4, 10):
        for x in (0.5, 3.0, 18.0, 60.0):
            k = dof // 2
            exact = math.exp(-x / 2) * sum((x / 2) ** i / math.factorial(i) for i in range(k))
            assert drift.chi_square_sf(x, dof) == pytest.approx(exact, rel=1e-9)
    # Odd ones, from the printed tables: χ²(9) at 0.001 is 27.877, χ²(1) at 0.05 is 3.841.
    assert drift.chi_square_sf(27.877, 9) == pytest.approx(0.001, rel=1e-3)
    assert drift.chi_square_sf(3.841, 1) == pytest.approx(0.05, rel=1e-3)
    assert drift.chi_square_sf(0.0, 3) == 1.0


def test_chi_square_of_the_reference_s_own_shares_is_zero_and_grows_with_the_sample() -> None:
    ref = drift.build_reference({"x": [i / 100 for i in range(100)]}, ["x"])
    r = ref.inputs["x"]
    assert drift.chi_square(r, [10] * 10) == pytest.approx(0.0, abs=1e-9)
    shifted_small, shifted_large = [2] * 5 + [8] * 5, [20] * 5 + [80] * 5
    # Σ (a − e)² / e = 10 · 0.06² / 0.1 = 0.36, over 1/m + 1/n with n = 100 reference
    # answers: the same shares on ten times the answers give a larger statistic (capped
    # by the reference's own noise), and the same PSI.
    assert drift.chi_square(r, shifted_small) == pytest.approx(0.36 / (1 / 50 + 1 / 100))
    assert drift.chi_square(r, shifted_large) == pytest.approx(0.36 / (1 / 500 + 1 / 100))
    assert drift.psi(r.shares, shifted_large) == pytest.approx(drift.psi(r.shares, shifted_small))
