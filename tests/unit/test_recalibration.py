"""The recalibrator (proxy.confidence.recalibration) and its stores (proxy.recalibration_store)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from proxy.confidence.calibration import Calibration, Histogram, Isotonic, Logistic, Platt
from proxy.confidence.recalibration import (
    IDENTITY,
    Recalibration,
    RecalibrationRule,
    compose,
    fit,
    log_loss,
    posterior_mode,
    refit,
)
from proxy.evidence import CallEvidence, ChoiceEvidence
from proxy.judge import judge_call
from proxy.policy.loading import PolicyError, parse_policy
from proxy.recalibration_store import FileStore, Label, MemoryStore, file_name, key_of


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def _distorted(n: int, slope: float, intercept: float, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Base probabilities and labels drawn from sigmoid(slope·logit(p) + intercept)."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.02, 0.98, n)
    truth = 1.0 / (1.0 + np.exp(-(slope * _logit(p) + intercept)))
    return p, (rng.uniform(size=n) < truth).astype(float), truth


def test_no_labels_is_the_identity() -> None:
    assert fit([], []) == (1.0, 0.0)
    p = np.linspace(0.01, 0.99, 50)
    assert np.allclose(IDENTITY.apply(p), p)


def test_few_labels_barely_move_the_map_and_many_let_the_labels_decide() -> None:
    p, y, _ = _distorted(4000, 0.5, -1.0)
    distance = []
    for n in (5, 50, 500, 4000):
        slope, intercept = fit(p[:n], y[:n], prior_strength=10.0)
        distance.append(np.hypot(slope - 1.0, intercept))
    assert distance[0] < 0.4  # five labels: still close to the shipped map
    assert distance[-1] > 3 * distance[0]
    assert distance[-1] == pytest.approx(np.hypot(0.5, 1.0), abs=0.15)  # the truth
    # A stronger prior keeps it closer to the shipped map for the same labels.
    weak = fit(p[:50], y[:50], prior_strength=1.0)
    strong = fit(p[:50], y[:50], prior_strength=200.0)
    assert np.hypot(strong[0] - 1, strong[1]) < np.hypot(weak[0] - 1, weak[1])


def test_recovers_a_known_distortion() -> None:
    p, y, truth = _distorted(5000, 0.6, -0.8, seed=1)
    slope, intercept = fit(p, y)
    assert slope == pytest.approx(0.6, abs=0.08)
    assert intercept == pytest.approx(-0.8, abs=0.1)
    r = Recalibration(slope, intercept)
    assert np.max(np.abs(r.apply(p) - truth)) < 0.04


def test_posterior_mode_recovers_weights_and_keeps_the_centre_under_a_strong_prior() -> None:
    # A three-column family (beta calibration's ln p, −ln(1 − p), 1), as the families
    # benchmark fits it: many labels give the true weights, a huge prior the centre.
    rng = np.random.default_rng(3)
    p = rng.uniform(0.02, 0.98, 20000)
    A = np.stack([np.log(p), -np.log1p(-p), np.ones_like(p)], axis=1)
    truth = np.array([0.7, 1.6, -0.4])
    y = (rng.uniform(size=p.size) < 1.0 / (1.0 + np.exp(-(A @ truth)))).astype(float)
    centre = (1.0, 1.0, 0.0)
    assert posterior_mode(A, y, centre, prior_strength=0.0) == pytest.approx(truth, abs=0.08)
    assert posterior_mode(A, y, centre, prior_strength=1e9) == pytest.approx(centre, abs=1e-3)
    # fit() is this solver on [logit p, 1]: the same weights.
    x = _logit(p)
    both = posterior_mode(np.stack([x, np.ones_like(x)], axis=1), y, (1.0, 0.0))
    assert fit(p, y) == pytest.approx(tuple(both), abs=1e-9)
    with pytest.raises(ValueError, match="one centre weight per column"):
        posterior_mode(A, y, (1.0, 0.0))


def test_monotone_and_bounded_even_on_labels_that_reverse_the_ranking() -> None:
    p = np.linspace(0.05, 0.95, 400)
    y = (p < 0.5).astype(float)  # confident answers are the wrong ones
    slope, intercept = fit(p, y, prior_strength=0.0)
    assert slope == 0.0  # constrained: flat, never decreasing
    r = Recalibration(slope, intercept)
    grid = np.concatenate([[0.0, 1e-12], np.linspace(0, 1, 101), [1 - 1e-12, 1.0]])
    out = r.apply(np.sort(grid))
    assert np.all(np.diff(out) >= 0)
    assert np.all((out > 0) & (out < 1))
    extreme = Recalibration(40.0, 30.0).apply(np.array([0.0, 0.5, 1.0]))
    assert np.all((extreme > 0) & (extreme < 1))
    with pytest.raises(ValueError):
        Recalibration(-0.1, 0.0)


def test_swaps_only_when_better_on_held_out_labels() -> None:
    p, y, _ = _distorted(300, 0.5, -1.0, seed=2)
    first = refit(p, y, None, min_labels=100, holdout=0.3)
    assert first.swapped and first.recalibration is not None
    assert first.recalibration.version == 1 and first.recalibration.n == 300
    ev = first.evidence
    assert ev["log_loss_candidate"] < ev["log_loss_current"]
    assert ev["held_out"] == 90 and ev["fitted_on"] == 210

    # The map in service is the one to beat: a good current map is kept.
    good = first.recalibration
    again = refit(p, y, good, min_labels=100, holdout=0.3)
    assert not again.swapped and again.recalibration is good

    # Too few labels: nothing is fitted.
    few = refit(p[:50], y[:50], None, min_labels=100)
    assert not few.swapped and "fewer than min_labels" in few.reason


def test_a_swap_is_rejected_when_the_candidate_loses_on_the_newest_labels() -> None:
    # The old labels say "overconfident", the newest ones say the shipped map is right.
    p_old, y_old, _ = _distorted(200, 0.3, -1.5, seed=4)
    rng = np.random.default_rng(5)
    p_new = rng.uniform(0.05, 0.95, 100)
    y_new = (rng.uniform(size=100) < p_new).astype(float)
    out = refit(np.r_[p_old, p_new], np.r_[y_old, y_new], None, min_labels=100, holdout=1 / 3)
    assert not out.swapped
    assert out.evidence["log_loss_candidate"] >= out.evidence["log_loss_current"]


def test_window_reads_only_the_newest_labels() -> None:
    p, y, _ = _distorted(500, 0.5, -1.0, seed=6)
    out = refit(p, y, None, min_labels=100, window=200)
    assert out.recalibration is not None and out.recalibration.n == 200


def test_rule_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        RecalibrationRule(holdout=1.0)
    assert RecalibrationRule(min_labels=300, window=100).window == 300


def test_round_trip() -> None:
    r = Recalibration(0.7, -0.2, version=3, n=120, evidence={"held_out": 36}, fitted_at="t")
    assert Recalibration.from_dict(r.to_dict()) == r
    assert r.source == "recalibrated:3"
    with pytest.raises(ValueError):
        Recalibration.from_dict({"slope": "x"})


@pytest.mark.parametrize(
    "calibrator",
    [
        Logistic(("a", "b"), (1.5, -0.5), 0.2, (0.1, 0.0), (2.0, 1.0)),
        Platt("a", 2.0, -1.0),
        Isotonic("a", (-3.0, -1.0, 0.0), (0.1, 0.5, 0.9)),
        Histogram("a", (-1.0,), (0.2, 0.8)),
    ],
    ids=lambda c: c.kind,
)
def test_compose_is_the_base_map_then_the_recalibration(calibrator) -> None:
    cal = Calibration(score="a", calibrator=calibrator, fitted_on={"dataset": "x"})
    r = Recalibration(0.6, -0.4)
    composed = compose(cal, r)
    assert composed.calibrator.kind == calibrator.kind
    assert composed.fitted_on == cal.fitted_on
    # Reloads as an ordinary calibration file.
    again = Calibration.from_dict(composed.to_dict())
    points = [-3.0, -1.0, 0.0] if calibrator.kind == "isotonic" else [-2.0, -0.5, 0.3, 2.0]
    for a in points:
        features = {"a": a, "b": 0.5}
        base = cal(features)
        assert base is not None
        assert again(features) == pytest.approx(r(base), abs=1e-5)


def test_log_loss() -> None:
    assert log_loss([0.5, 0.5], [1, 0]) == pytest.approx(np.log(2))
    assert np.isfinite(log_loss([0.0, 1.0], [1, 0]))


def test_memory_store_swaps_compare_and_swap() -> None:
    async def run() -> None:
        store = MemoryStore()
        assert await store.add_label("t", "m", Label(0.9, False)) == 1
        assert await store.add_label("t", "m", Label(0.8, True)) == 2
        assert [lab.base for lab in await store.labels("t", "m")] == [0.9, 0.8]
        assert [lab.base for lab in await store.labels("t", "m", limit=1)] == [0.8]
        assert store.current("t", "m") is None
        assert not await store.swap("t", "m", Recalibration(0.5, 0.0, version=2))
        assert await store.swap("t", "m", Recalibration(0.5, 0.0, version=1))
        assert not await store.swap("t", "m", Recalibration(0.4, 0.0, version=1))
        assert store.current("t", "m") == Recalibration(0.5, 0.0, version=1)
        assert store.known() == [("t", "m")]

    asyncio.run(run())


def test_file_store_survives_a_restart_and_a_torn_line(tmp_path: Path) -> None:
    async def write() -> None:
        store = FileStore(tmp_path / "recal")
        for i in range(3):
            await store.add_label("clinic/a b", "gemma@1", Label(0.1 * i, i % 2 == 0, "t"))
        await store.swap("clinic/a b", "gemma@1", Recalibration(0.8, -0.1, version=1, n=3))

    asyncio.run(write())
    (path,) = (tmp_path / "recal").iterdir()
    assert path.name == file_name("clinic/a b", "gemma@1")
    assert key_of(path) == ("clinic/a b", "gemma@1")
    with path.open("ab") as fh:
        fh.write(b'{"type": "label", "ba')  # a crash mid-write
    store = FileStore(tmp_path / "recal")
    assert store.skipped == 1
    assert store.current("clinic/a b", "gemma@1") == Recalibration(0.8, -0.1, version=1, n=3)
    labels = asyncio.run(store.labels("clinic/a b", "gemma@1"))
    assert [(lab.base, lab.correct) for lab in labels] == [(0.0, True), (0.1, False), (0.2, True)]
    assert store.count("clinic/a b", "gemma@1") == 3


def test_the_judge_applies_the_recalibration_and_says_so() -> None:
    policy = parse_policy(
        'upstreams: {u: {base_url: "http://127.0.0.1:9/v1"}}\nmodels: {m: {upstream: u}}\n'
    )
    plain = policy.rule(None, "m")
    cal = Calibration(score="min_logprob", calibrator=Platt("min_logprob", 1.0, 3.0))
    calibrated = dataclasses.replace(plain, calibration=cal)
    evidence = CallEvidence([ChoiceEvidence(0, "Paris", {"min_logprob": -0.01})])
    shipped = judge_call(evidence, calibrated)[0]
    assert shipped.calibration_source == "shipped" and shipped.decision == "answer"
    r = Recalibration(0.0, -1.0, version=4)
    learnt = judge_call(evidence, calibrated, r)[0]
    assert learnt.calibration_source == "recalibrated:4"
    assert learnt.confidence == pytest.approx(r(shipped.confidence or 0.0))
    assert learnt.decision == "abstain"
    # Without a calibration there is nothing to recalibrate, and no source to name.
    raw = judge_call(evidence, plain, r)[0]
    assert raw.calibration_source is None and not raw.calibrated


@pytest.mark.parametrize(
    "bad",
    [
        "recalibrate_holdout: 0.9",
        "recalibrate_min_labels: 5",
        "recalibrate_every: 0",
        "recalibrate_prior: -1",
        "recalibrate: maybe",
        "recalibrate_windw: 100",
    ],
)
def test_recalibration_keys_are_validated(bad: str) -> None:
    text = 'upstreams: {u: {base_url: "http://127.0.0.1:9/v1"}}\nmodels: {m: {upstream: u}}\n'
    with pytest.raises(PolicyError):
        parse_policy(text + f"defaults: {{{bad}}}\n")


def test_a_rule_recalibrates_only_with_a_calibration_and_when_asked() -> None:
    text = 'upstreams: {u: {base_url: "http://127.0.0.1:9/v1"}}\nmodels: {m: {upstream: u}}\n'
    assert (
        parse_policy(text + "defaults: {recalibrate: true}\n").rule(None, "m").recalibrate is None
    )


def test_sentences_are_recalibrated_one_by_one_and_keep_the_shipped_p() -> None:
    from proxy.judge import judge_sentences
    from proxy.sentences import split

    policy = parse_policy(
        'upstreams: {u: {base_url: "http://127.0.0.1:9/v1"}}\n'
        "models: {m: {upstream: u, granularity: sentence}}\n"
    )
    cal = Calibration(score="min_logprob", calibrator=Platt("min_logprob", 1.0, 3.0))
    rule = dataclasses.replace(policy.rule(None, "m"), calibration=cal)
    segments = split("Lima is the capital. Its currency is the sol.")
    scores = [{"min_logprob": -0.01}, {"min_logprob": -2.0}]
    shipped = judge_sentences(segments, scores, rule, sent=False)
    r = Recalibration(0.5, -1.0, version=2)
    learnt = judge_sentences(segments, scores, rule, sent=False, recalibration=r)
    for before, after in zip(shipped, learnt, strict=True):
        assert before.shipped_confidence is None
        assert after.shipped_confidence == pytest.approx(before.confidence)
        assert after.confidence == pytest.approx(r(before.confidence or 0.0))
        assert after.label_base == before.label_base == before.confidence
    assert [p.decision for p in shipped] == ["answer", "answer"]
    assert [p.decision for p in learnt] == ["answer", "abstain"]
