"""``abstain calibrate`` and ``abstain eval`` end to end against a fake model with known answers.

The fake model (tests/eval/fake_model.py) is served on loopback; ``eval`` runs the real
proxy in-process in front of it. Expected numbers follow from the fake's design: a third
of the answers are confidently right, a third confidently wrong, a third coin flips.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from proxy.cli import main
from proxy.confidence.calibration import load_calibration
from proxy.confidence.features import LOGISTIC_FEATURES, TEXT_SCORES
from proxy.confidence.logprobs import scores_from_choice
from proxy.confidence.shift_scores import text_scores_of_choice
from proxy.evaluation.calibrate import Labelled, logistic_inputs
from proxy.evaluation.prompts import get_template
from tests.eval import fake_model

POLICY = """
upstreams:
  fake: {base_url: "http://127.0.0.1:9/v1", supports_n: false}
models:
  fake-model: {upstream: fake}
defaults: {threshold: 0.5, action: abstain, score: mean_logprob}
auth: {unknown_keys: default, default_tenant: anyone}
tenants:
  anyone: {}
"""


def _calibrate(dataset: Path, url: str, tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "cal" / "fake.json"
    argv = ["calibrate", "--dataset", str(dataset), "--model", "fake-model", "--base-url", url]
    argv += ["--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet", *extra]
    assert main(argv) == 0
    return out


def test_calibrate_writes_a_calibration_that_separates_the_groups(
    dataset: Path, model_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _calibrate(dataset, model_url, tmp_path, "--score", "min_logprob")
    cal = load_calibration(path)
    assert cal.score == "min_logprob" and cal.model == "fake-model"
    assert cal.fitted_on["dataset"] == "capitals" and cal.fitted_on["n"] == fake_model.N
    assert cal.metrics["held_out"] is True and cal.metrics["ece_bins"] == 10
    sure, coin, guess = (cal({"min_logprob": v}) or 0.0 for v in (-0.05, -0.7, -2.0))
    assert sure > 0.9 and guess < 0.1 and 0.3 < coin < 0.7
    out = capsys.readouterr().out
    assert "60 labelled answers, 30 right" in out
    assert "isotonic" in out and "platt" in out and "histogram" in out


def test_calibrate_weighs_a_logistic_model_over_every_logprob_feature(
    dataset: Path, model_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _calibrate(dataset, model_url, tmp_path)
    combined = "+".join(LOGISTIC_FEATURES)
    rows = [line for line in capsys.readouterr().out.splitlines() if "logistic" in line]
    assert len(rows) == 1 and rows[0].startswith(combined)
    cal = load_calibration(path)
    # Whichever candidate won, the file the proxy loads must judge the fake's answers.
    prompt = get_template("qa-fewshot").prompt("What is the capital of Country0?")
    choice = fake_model.completion({"prompt": prompt})["choices"][0]
    assert cal(scores_from_choice(choice["logprobs"])) is not None


def test_calibrate_with_text_scores_adds_them_to_the_logistic_model(
    dataset: Path, model_url: str, tmp_path: Path
) -> None:
    path = _calibrate(dataset, model_url, tmp_path, "--calibrators", "logistic", "--text-scores")
    cal = load_calibration(path)
    assert cal.inputs == (*LOGISTIC_FEATURES, *TEXT_SCORES)
    assert cal.reference is not None and set(TEXT_SCORES) <= set(cal.reference.inputs)
    question = "What is the capital of Country0?"
    choice = fake_model.completion({"prompt": get_template("qa-fewshot").prompt(question)})
    logprobs = choice["choices"][0]["logprobs"]
    assert cal(scores_from_choice(logprobs)) is None  # the text inputs are needed
    assert cal(scores_from_choice(logprobs) | text_scores_of_choice(logprobs, question)) is not None


def test_logistic_inputs_drop_a_feature_some_answers_lack() -> None:
    y = np.array([1.0, 0.0, 1.0, 0.0])
    full = np.array([-0.1, -2.0, -0.2, -1.5])
    gappy = np.array([0.5, np.nan, 0.4, 0.1])
    unscored = np.array([np.nan] * 4)
    features = {"mean_logprob": full, "first_logprob": full, "first_margin": gappy}
    data = Labelled({**features, "log_length": unscored}, y)
    assert logistic_inputs(data, "logprobs", ["mean_logprob"]) == ["mean_logprob", "first_logprob"]
    # Rows without the primary score are left out anyway: a gap there does not count.
    data = Labelled({"mean_logprob": gappy, "first_margin": gappy}, y)
    assert logistic_inputs(data, "logprobs", ["mean_logprob"]) == ["mean_logprob", "first_margin"]


def test_refitting_reads_the_cache_instead_of_asking_again(
    dataset: Path, model_url: str, tmp_path: Path, counter: fake_model.Counter
) -> None:
    _calibrate(dataset, model_url, tmp_path)
    asked = counter.requests
    assert asked == fake_model.N
    _calibrate(dataset, model_url, tmp_path, "--calibrators", "platt")
    assert counter.requests == asked


def test_calibrate_on_the_fit_split_leaves_the_held_out_questions_unasked(
    dataset: Path, model_url: str, tmp_path: Path, counter: fake_model.Counter
) -> None:
    path = _calibrate(dataset, model_url, tmp_path, "--split", "fit", "--held-out-fraction", "0.25")
    assert counter.requests == 45
    assert load_calibration(path).fitted_on["split"] == "fit"


def test_eval_through_the_proxy_reproduces_the_known_table(
    dataset: Path, model_url: str, tmp_path: Path
) -> None:
    cal = _calibrate(dataset, model_url, tmp_path, "--score", "min_logprob")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    out = tmp_path / "report"
    argv = ["eval", "--dataset", str(dataset), "--model", "fake-model", "--policy", str(policy)]
    argv += ["--calibration", str(cal), "--upstream-url", model_url, "--out", str(out)]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["mode"] == "proxy" and report["n"] == fake_model.N
    rows = {row["threshold"]: row for row in report["table"]}
    alone, proxy = rows[0.75]["alone"], rows[0.75]["proxy"]
    assert alone["accuracy"] == pytest.approx(0.5) and alone["abstention_rate"] == 0.0
    assert alone["penalised_score"] == pytest.approx(0.5 - 0.5 * 3)
    # Only the confident third is answered, and all of it is right.
    assert proxy["abstention_rate"] == pytest.approx(2 / 3)
    assert proxy["accuracy"] == pytest.approx(1 / 3)
    assert proxy["error_rate"] == 0.0 and proxy["penalised_score"] == pytest.approx(1 / 3)
    assert rows[0.0]["proxy"]["accuracy"] == pytest.approx(0.5)
    metrics = report["metrics"]
    assert metrics["calibrated answers"] == fake_model.N
    assert metrics["rule mismatches"] == 0
    assert metrics["AUROC"] > 0.9
    for chart in ("reliability.png", "risk_coverage.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 0.75 | 3 |" in (out / "eval.md").read_text()
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["correct"] for a in answers] == [fake_model.is_right(i) for i in range(fake_model.N)]
    assert answers[0]["decision"] == "answer" and answers[1]["decision"] == "annotate"


def test_eval_direct_reports_the_model_alone(dataset: Path, model_url: str, tmp_path: Path) -> None:
    out = tmp_path / "direct"
    argv = ["eval", "--dataset", str(dataset), "--model", "fake-model", "--direct"]
    argv += ["--base-url", model_url, "--out", str(out), "--no-cache", "--quiet"]
    assert main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["mode"] == "direct"
    assert all(row["proxy"] is None for row in report["table"])
    assert report["table"][0]["alone"]["accuracy"] == pytest.approx(0.5)
    assert not (out / "reliability.png").exists()


def test_eval_refuses_a_model_url_posing_as_a_proxy(
    dataset: Path, model_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "--dataset", str(dataset), "--model", "fake-model", "--base-url", model_url]
    argv += ["--out", str(tmp_path / "x"), "--no-cache", "--quiet"]
    assert main(argv) == 2
    assert "--direct" in capsys.readouterr().err


def _log_lines() -> list[str]:
    lines = []
    for i in range(fake_model.N):
        scores = {"min_logprob": fake_model.logprob(i), "mean_logprob": fake_model.logprob(i)}
        lines.append(json.dumps({"type": "decision", "id": f"c{i}", "choice": 0, "model": "m",
                                 "method": "hybrid", "scores": scores}))  # fmt: skip
        lines.append(json.dumps({"type": "feedback", "id": f"c{i}", "choice": 0,
                                 "correct": fake_model.is_right(i)}))  # fmt: skip
    lines.append('{"type": "decision", "id": "torn')
    return lines


def test_calibrate_from_a_decision_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "decisions.jsonl"
    log.write_text("\n".join(_log_lines()) + "\n")
    out = tmp_path / "from-log.json"
    argv = ["calibrate", "--from-log", str(log), "--score", "min_logprob", "--out", str(out)]
    assert main(argv) == 0
    cal = load_calibration(out)
    assert cal.model == "m" and cal.fitted_on["n"] == fake_model.N
    assert cal.method == "hybrid"
    assert (cal({"min_logprob": -0.05}) or 0) > 0.9 > 0.1 > (cal({"min_logprob": -2.0}) or 1)
    assert "malformed 1" in capsys.readouterr().out


def test_eval_refuses_a_threshold_of_one_before_asking(
    dataset: Path, model_url: str, tmp_path: Path, counter: fake_model.Counter
) -> None:
    argv = ["eval", "--dataset", str(dataset), "--model", "m", "--thresholds", "0.5,1"]
    argv += ["--direct", "--base-url", model_url, "--no-cache", "--quiet"]
    with pytest.raises(SystemExit):
        main([*argv, "--out", str(tmp_path / "x")])
    assert counter.requests == 0


def test_calibrate_needs_exactly_one_source(tmp_path: Path) -> None:
    assert main(["calibrate", "--out", str(tmp_path / "x.json")]) == 2


def test_calibrate_refuses_an_unknown_calibrator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "decisions.jsonl"
    log.write_text("\n".join(_log_lines()) + "\n")
    argv = ["calibrate", "--from-log", str(log), "--calibrators", "isotonic,splines"]
    assert main([*argv, "--out", str(tmp_path / "x.json")]) == 2
    assert "splines" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.fixture
def running_proxy(model_url: str, tmp_path: Path) -> Iterator[str]:
    """`abstain serve`'s app on a loopback port (uvicorn in a thread), abstaining at t=0.5."""
    import socket
    import threading
    import time

    import uvicorn
    from prometheus_client import CollectorRegistry

    from proxy.app import create_app
    from proxy.settings import Settings

    policy = tmp_path / "served.yaml"
    policy.write_text(POLICY.replace("http://127.0.0.1:9/v1", model_url))
    settings = Settings(policy=policy, handle_signals=False, reload_interval_seconds=0)
    app = create_app(settings, registry=CollectorRegistry())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30  # a guard against hanging, not a timing assertion
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the proxy did not start"
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join()


def test_eval_against_a_running_proxy_marks_rows_it_cannot_grade(
    dataset: Path, running_proxy: str, tmp_path: Path
) -> None:
    out = tmp_path / "external"
    argv = ["eval", "--dataset", str(dataset), "--model", "fake-model"]
    argv += ["--base-url", running_proxy, "--out", str(out), "--no-cache", "--quiet"]
    assert main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["mode"] == "external"
    # Uncalibrated mean_logprob: exp(-0.05) = .95, exp(-0.7) = .50, exp(-2) = .14; the
    # proxy replaced the two lower groups' answers with "I don't know." at t = 0.5.
    assert report["metrics"]["withheld answers"] == 40
    rows = {row["threshold"]: row for row in report["table"]}
    assert rows[0.0]["proxy"] is None and rows[0.0]["alone"] is None
    assert rows[0.75]["proxy"]["accuracy"] == pytest.approx(1 / 3)
    assert rows[0.75]["proxy"]["error_rate"] == 0.0
