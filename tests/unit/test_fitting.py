"""Calibrator fitting: hand cases, monotonicity, bounds, file round trips, CV selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from proxy.confidence import fitting as f
from proxy.confidence.calibration import Calibration, Calibrator, load_calibration

GRID = np.linspace(-12.0, 3.0, 301)


def _logistic_data(n: int, a: float, b: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(-1.0, 1.5, size=n)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-(a * x + b)))).astype(float)
    return x, y


def _curve(cal: Calibrator, score: str = "s") -> np.ndarray:
    return np.array([cal({score: float(v)}) for v in GRID])


def test_pav_pools_violators_by_hand() -> None:
    values, weights, lengths = f.pav([1.0, 3.0, 2.0, 4.0], [1, 1, 1, 1])
    assert values.tolist() == [1.0, 2.5, 4.0]
    assert weights.tolist() == [1.0, 2.0, 1.0]
    assert lengths.tolist() == [1, 2, 1]
    values, _, _ = f.pav([3.0, 2.0, 1.0], [1.0, 1.0, 2.0])
    assert values.tolist() == [pytest.approx(7 / 4)]
    # Equal neighbours are one block: the stored mapping stays short.
    values, _, lengths = f.pav([0.0, 0.0, 0.0, 1.0, 1.0], [1] * 5)
    assert values.tolist() == [0.0, 1.0] and lengths.tolist() == [3, 2]


def test_isotonic_by_hand() -> None:
    # Means per x: 0, 1, 0, 1 -> PAV 0, .5, .5, 1; kept 1/(n+2) = 1/6 away from 0 and 1.
    cal = f.fit_isotonic([1, 2, 3, 4], [0, 1, 0, 1], "s")
    assert cal.x == (1.0, 2.0, 3.0, 4.0)
    assert cal.y == pytest.approx((1 / 6, 0.5, 0.5, 5 / 6))
    assert cal({"s": 2.5}) == pytest.approx(0.5)
    assert cal({"s": 1.5}) == pytest.approx((1 / 6 + 0.5) / 2)


def test_isotonic_pools_equal_scores() -> None:
    cal = f.fit_isotonic([1.0, 1.0, 2.0, 2.0], [0, 1, 1, 1], "s")
    assert cal({"s": 1.0}) == pytest.approx(0.5)


def test_platt_recovers_a_known_logistic() -> None:
    x, y = _logistic_data(20000, a=1.5, b=0.5)
    cal = f.fit_platt(x, y, "s")
    assert cal.a == pytest.approx(1.5, rel=0.08)
    assert cal.b == pytest.approx(0.5, abs=0.1)


def test_platt_slope_is_never_negative() -> None:
    x, y = _logistic_data(500, a=-2.0, b=0.0)
    cal = f.fit_platt(x, y, "s")
    assert cal.a == 0.0
    assert cal({"s": 0.0}) == pytest.approx(np.mean(y), abs=0.01)


def test_histogram_rates_are_pooled_and_ties_never_split() -> None:
    # Bins by position: {0,0,0,0} (rate 1/2), {1,2} (rate 0), {3,4} (rate 1). The four
    # zeros stay together although a quarter of the data is two rows; the falling first
    # pair is pooled into 2/6; the last rate is kept 1/(n+2) below 1.
    cal = f.fit_histogram([0, 0, 0, 0, 1, 2, 3, 4], [0, 0, 1, 1, 0, 0, 1, 1], "s", bins=4)
    assert cal.edges == (2.5,)
    assert cal.values == pytest.approx((1 / 3, 0.9))
    assert cal({"s": 0.0}) == cal({"s": 2.0}) == pytest.approx(1 / 3)


@pytest.mark.parametrize("kind", ["isotonic", "platt", "histogram"])
def test_single_score_calibrators_are_monotone_and_bounded(kind: str) -> None:
    x, y = _logistic_data(400, a=2.0, b=1.0, seed=7)
    curve = _curve(f.FITTERS[kind](x, y, "s"))
    assert np.all(np.diff(curve) >= -1e-12)
    assert np.all((curve >= 0.0) & (curve <= 1.0))
    assert curve[-1] - curve[0] > 0.5  # and it actually learned something


@pytest.mark.parametrize("kind", ["isotonic", "platt", "histogram"])
def test_calibrators_round_trip_through_their_file(kind: str, tmp_path: Path) -> None:
    x, y = _logistic_data(300, a=2.0, b=1.0, seed=11)
    cal = f.FITTERS[kind](x, y, "min_logprob")
    path = tmp_path / "cal.json"
    Calibration("min_logprob", cal, model="m", metrics={"ece": 0.01}).save(path)
    loaded = load_calibration(path)
    assert loaded.calibrator.kind == kind
    assert loaded.metrics["ece"] == 0.01
    assert np.allclose(_curve(loaded, "min_logprob"), _curve(cal, "min_logprob"))


def test_logistic_uses_every_feature_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    X = rng.normal(size=(2000, 2))
    y = (rng.random(2000) < 1 / (1 + np.exp(-(2 * X[:, 0] - 1 * X[:, 1])))).astype(float)
    cal = f.fit_logistic(X, y, ["a", "b"])
    assert cal.weights[0] > 0 > cal.weights[1]
    path = tmp_path / "cal.json"
    Calibration("a", cal).save(path)
    loaded = load_calibration(path)
    probe = {"a": 0.3, "b": -1.2}
    assert loaded(probe) == pytest.approx(cal(probe))
    assert 0.0 <= float(cal(probe) or -1) <= 1.0


def test_stratified_folds_partition_and_balance() -> None:
    y = np.array([1] * 10 + [0] * 40)
    folds = f.stratified_folds(y, 5, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(50))
    assert [int(y[fold].sum()) for fold in folds] == [2] * 5


def test_grouped_folds_keep_each_answers_rows_together_and_balance_groups() -> None:
    # 30 answers of 3 sentences; answers 0-9 have a right sentence.
    groups = np.repeat([f"q{i}" for i in range(30)], 3)
    y = np.zeros(90)
    y[[3 * i for i in range(10)]] = 1.0
    folds = f.stratified_folds(y, 5, seed=2, groups=groups)
    assert sorted(np.concatenate(folds).tolist()) == list(range(90))
    for fold in folds:
        in_fold = set(groups[fold].tolist())
        assert len(fold) == 3 * len(in_fold)  # no answer split across folds
        assert len(in_fold) == 6
        assert int(y[fold].sum()) == 2  # the answers with a right sentence, dealt evenly
    with pytest.raises(ValueError):
        f.stratified_folds(y, 5, groups=groups[:-1])


def test_grouped_cross_validation_does_not_learn_an_answer_from_its_own_sentences() -> None:
    # Each answer's 3 sentences share one random score and one random label: nothing is
    # learnable across answers. A flexible fitter (nearest neighbour) shows the leak: a
    # fold holding out one sentence while training on its twins learns that answer.
    def nearest(X: np.ndarray, labels: np.ndarray) -> Calibrator:
        def calibrator(features: dict[str, float]) -> float:
            return float(labels[np.argmin(np.abs(X[:, 0] - features["s"]))])

        return calibrator  # type: ignore[return-value]

    leaky, honest = [], []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        groups = np.repeat(np.arange(200), 3)
        score = np.repeat(rng.normal(size=200), 3)
        y = np.repeat((rng.random(200) < 0.5).astype(float), 3)
        X = score[:, None]
        leaky.append(np.mean(f.cross_validate(X, y, ["s"], nearest, 5, 0) == y))
        honest.append(np.mean(f.cross_validate(X, y, ["s"], nearest, 5, 0, groups) == y))
    assert min(leaky) > 0.95  # the twins give the labels away
    assert abs(np.mean(honest) - 0.5) < 0.05  # 1,000 answers: chance, as it should be


def test_cross_validation_never_predicts_a_row_it_was_fitted_on() -> None:
    X = np.arange(20, dtype=float)[:, None]
    y = np.array([0, 1] * 10, dtype=float)
    seen: list[set[float]] = []

    def spy(Xt: np.ndarray, yt: np.ndarray) -> Calibrator:
        seen.append(set(Xt[:, 0].tolist()))
        return f.fit_platt(Xt[:, 0], yt, "s")

    out = f.cross_validate(X, y, ["s"], spy, k=4, seed=0)
    assert not np.isnan(out).any()
    folds = f.stratified_folds(y, 4, seed=0)
    for train_values, test in zip(seen, folds, strict=True):
        assert train_values.isdisjoint(set(X[test, 0].tolist()))


def test_select_prefers_the_informative_score_and_reports_before_and_after() -> None:
    x, y = _logistic_data(600, a=2.5, b=1.0, seed=2)
    noise = np.random.default_rng(9).normal(size=x.size)
    ranked = f.select({"good": x, "noise": noise}, y, scores=["good", "noise"], folds=5)
    best, fitted = ranked[0]
    assert best.score == "good"
    assert best.after.auroc > 0.75 > ranked[-1][0].after.auroc
    briers = [c.criterion("brier") for c, _ in ranked]
    assert briers == sorted(briers)  # the default criterion
    by_loss = f.select({"good": x, "noise": noise}, y, scores=["good"], criterion="log_loss")
    losses = [c.criterion("log_loss") for c, _ in by_loss]
    assert losses == sorted(losses)
    assert best.n == x.size and best.after.ece_bins == 10
    assert fitted({"good": 0.0}) is not None


def test_select_skips_rows_missing_the_score() -> None:
    x, y = _logistic_data(200, a=2.0, b=0.0, seed=4)
    x[:50] = np.nan
    (best, _), *_ = f.select({"s": x}, y, scores=["s"], kinds=["platt"])
    assert best.n == 150


def test_before_maps_semantic_entropy_as_the_proxy_does_without_a_calibration() -> None:
    # Semantic entropy is stored negated (<= 0); the logprob mapping would clip every
    # value to 0 and report a useless "before" where the proxy ranks answers well.
    x, y = _logistic_data(300, a=2.0, b=1.0, seed=5)
    entropy = -np.log1p(np.exp(-x))  # negative, rising with x
    cand, _ = f.candidate("isotonic", {"semantic_entropy": entropy}, y, names=["semantic_entropy"])
    assert cand.before.auroc == pytest.approx(cand.after.auroc, abs=0.05)
    assert cand.before.auroc > 0.75


def test_select_adds_one_logistic_candidate_over_the_named_features() -> None:
    x, y = _logistic_data(500, a=2.0, b=0.5, seed=6)
    rng = np.random.default_rng(7)
    # Two noisy views of the same signal: together they rank better than either alone.
    a, b = x + rng.normal(0, 1.0, x.size), x + rng.normal(0, 1.0, x.size)
    ranked = f.select(
        {"a": a, "b": b, "len": rng.normal(size=x.size)},
        y,
        scores=["a", "b"],
        kinds=["platt", "logistic"],
        logistic_features=["a", "b", "len"],
    )
    logistic = [c for c, _ in ranked if c.kind == "logistic"]
    assert [c.features for c in logistic] == [("a", "b", "len")]
    assert ranked[0][0].kind == "logistic"
    singles = [c.after.auroc for c, _ in ranked if c.kind == "platt"]
    assert logistic[0].after.auroc > max(singles)
