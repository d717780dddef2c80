"""benchmarks/recalibration_families.py: its families fit what they claim to fit."""

from __future__ import annotations

import numpy as np

from benchmarks.recalibration_families import FAMILIES, INPUTS, judge

PLATT, BETA, WITH_INPUTS = FAMILIES


def _base(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.02, 0.98, n), rng.normal(size=(n, len(INPUTS))), rng


def test_a_distortion_only_beta_can_bend_is_fixed_by_beta_and_not_by_platt() -> None:
    # Too timid at both ends (ln p and −ln(1 − p) weighted apart): no slope and intercept
    # of logit p straighten it, beta's three weights can.
    p, z, rng = _base(3000)
    truth = 1.0 / (1.0 + np.exp(-(2.5 * np.log(p) + 0.4 * np.log1p(-p) * -1.0 + 1.0)))
    y = (rng.random(p.size) < truth).astype(float)
    platt = judge(PLATT, p, z, y, seeds=3, prior=2.0)
    beta = judge(BETA, p, z, y, seeds=3, prior=2.0)
    assert beta["ceiling"] < platt["ceiling"] - 0.01
    assert beta["after"] < platt["after"]


def test_an_input_the_shift_re_weighed_is_learnt_only_by_the_family_that_reads_inputs() -> None:
    p, z, rng = _base(3000, seed=1)
    logit = np.log(p) - np.log1p(-p)
    y = (rng.random(p.size) < 1.0 / (1.0 + np.exp(-(logit + 1.5 * z[:, 0])))).astype(float)
    platt = judge(PLATT, p, z, y, seeds=3, prior=2.0)
    inputs = judge(WITH_INPUTS, p, z, y, seeds=3, prior=2.0)
    # Both can be calibrated on their own P (ECE); only one of them separates the answers.
    assert inputs["log_loss_after"] < platt["log_loss_after"] - 0.05


def test_on_calibrated_labels_every_family_sits_on_the_floor() -> None:
    p, z, rng = _base(3000, seed=2)
    y = (rng.random(p.size) < p).astype(float)
    for family in FAMILIES:
        row = judge(family, p, z, y, seeds=3, prior=2.0)
        assert abs(row["ceiling"] - row["floor"]) < 0.015, family.name
        # Labels drawn from a right family: the 200-label fit adds error above the floor.
        assert row["right_family"] > row["floor"], family.name
