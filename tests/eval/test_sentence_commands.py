"""``abstain calibrate`` and ``abstain eval`` on a multi-claim set: one labelled example per
sentence, the calibration recording granularity sentence, and the proxy's per-sentence
verdicts judged against it (tests/eval/fake_claims_model.py answers with known grades)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import main
from proxy.confidence.calibration import load_calibration
from proxy.evaluation import claims, datasets, runner
from proxy.evaluation.grading import MatchGrader
from proxy.evaluation.prompts import get_template
from tests.eval import fake_claims_model as fake

POLICY = """
upstreams:
  fake: {base_url: "http://127.0.0.1:9/v1", supports_n: false}
models:
  fake-model: {upstream: fake}
defaults: {threshold: 0.5, action: abstain}
auth: {unknown_keys: default, default_tenant: anyone}
tenants:
  anyone: {}
"""
SENTENCES = 3 * fake.N


@pytest.fixture
def seen() -> list[dict[str, Any]]:
    return []


@pytest.fixture
def url(seen: list[dict[str, Any]]) -> Iterator[str]:
    with fake.serve(seen) as base:
        yield base


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return fake.write_dataset(tmp_path / "multi.jsonl")


def _calibrate(dataset: Path, url: str, tmp_path: Path, *extra: str) -> tuple[int, Path]:
    out = tmp_path / "cal.json"
    argv = ["calibrate", "--dataset", str(dataset), "--model", "fake-model", "--base-url", url]
    argv += ["--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet", *extra]
    return main(argv), out


def test_calibrate_fits_one_example_per_sentence_and_records_granularity(
    dataset: Path,
    url: str,
    tmp_path: Path,
    seen: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, path = _calibrate(dataset, url, tmp_path, "--calibrators", "logistic")
    assert code == 0
    cal = load_calibration(path)
    assert cal.fitted_on["granularity"] == "sentence"
    assert cal.fitted_on["template"] == "sentences-fewshot"
    assert cal.fitted_on["n"] == SENTENCES and cal.calibrator.kind == "logistic"
    assert cal.reference is not None  # drift reference over the sentences fitted on
    out = capsys.readouterr().out
    assert f"{SENTENCES} sentences in {fake.N} answers" in out
    assert f"answers of one sentence per claim: {fake.N} (100%)" in out
    # Asked with the multi-fact template and its budget, not the 16-token default.
    assert len(seen) == fake.N and {b["max_tokens"] for b in seen} == {64}
    assert "Its capital is Tokyo." in seen[0]["prompt"]
    # The claim's tokens separate the sentences: sure ones high, guesses low.
    labels = _offline(dataset)
    states = [fake.state(i, j) for i in range(fake.N) for j in range(3)]
    p = [cal(lab.scores) or 0.0 for lab in labels]
    assert min(v for v, st in zip(p, states, strict=True) if st == 0) > 0.8
    assert max(v for v, st in zip(p, states, strict=True) if st == 1) < 0.2


def _offline(dataset: Path) -> list[claims.SentenceLabel]:
    """The fake's answers labelled and scored offline, as abstain calibrate does."""
    questions = datasets.load_questions(dataset)
    template = get_template("sentences-fewshot")
    direct = []
    for q in questions:
        (choice,) = fake.completion({"prompt": template.prompt(q.question)})["choices"]
        direct.append(
            runner.Generation(q.id, "k", logprobs=choice["logprobs"], raw_text=choice["text"])
        )
    labels, _ = claims.label_all(questions, direct, MatchGrader(), template, "fake-model")
    return labels


def test_calibrate_refuses_sampling_methods_on_a_multi_claim_set(
    dataset: Path, url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, path = _calibrate(dataset, url, tmp_path, "--method", "consistency")
    assert code == 2 and not path.exists()
    assert "only --method logprobs scores sentences" in capsys.readouterr().err


def test_eval_through_the_proxy_judges_every_sentence_with_the_calibration(
    dataset: Path, url: str, tmp_path: Path, seen: list[dict[str, Any]]
) -> None:
    code, cal_path = _calibrate(dataset, url, tmp_path, "--calibrators", "logistic")
    assert code == 0
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    out = tmp_path / "report"
    argv = ["eval", "--dataset", str(dataset), "--model", "fake-model", "--policy", str(policy)]
    argv += ["--calibration", str(cal_path), "--upstream-url", url, "--out", str(out)]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--quiet", "--no-charts"]
    assert main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["unit"] == "sentences" and report["n"] == SENTENCES
    assert report["meta"]["granularity"] == "sentence"
    metrics = report["metrics"]
    assert metrics["sentences without a confidence"] == 0
    assert metrics["answers judged whole"] == 0 and metrics["AUROC"] > 0.9
    assert "t=0.5: right sentences kept" in metrics
    # Every sentence's P(correct) from the proxy is the calibration applied to the
    # scores computed offline: the calibration means on the live path what it was fitted on.
    cal = load_calibration(cal_path)
    offline = _offline(dataset)
    records = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    live = [s for r in records for s in r["sentences"]]
    assert len(live) == len(offline) == SENTENCES
    for got, want in zip(live, offline, strict=True):
        assert got["text"] == want.text and got["correct"] == want.correct
        assert got["decision"] in ("answer", "annotate")
        assert got["confidence"] == pytest.approx(cal(want.scores), abs=1e-6)
    grades = [s["correct"] for s in live]
    expected = [fake.is_right(i, j) for i in range(fake.N) for j in range(3)]
    assert grades == expected


def test_eval_direct_reports_the_model_alone_per_sentence(
    dataset: Path, url: str, tmp_path: Path
) -> None:
    out = tmp_path / "direct"
    argv = ["eval", "--dataset", str(dataset), "--model", "fake-model", "--direct"]
    argv += ["--base-url", url, "--out", str(out), "--cache-dir", str(tmp_path / "c")]
    assert main([*argv, "--quiet", "--no-charts"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["n"] == SENTENCES and report["unit"] == "sentences"
    right = sum(fake.is_right(i, j) for i in range(fake.N) for j in range(3))
    first = report["table"][0]
    assert first["proxy"] is None
    assert first["alone"]["accuracy"] == pytest.approx(right / SENTENCES)
    assert report["metrics"]["AUROC of raw min_logprob"] > 0.9
    assert "## fake-model on multi (180 sentences, direct)" in (out / "eval.md").read_text()
