"""The decision log survives rotation and deletion, counts what it loses, can use stdout."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from proxy.decision_log import DecisionLog
from proxy.verdict import Verdict
from tests.conftest import auth
from tests.proxy.test_metrics import value

CHAT = {"messages": [{"role": "user", "content": "Capital of France?"}]}


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


class Lost:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, n: int) -> None:
        self.count += n


VERDICT = Verdict(
    decision="answer",
    confidence=0.9,
    threshold=0.5,
    score=-0.1,
    score_name="min_logprob",
    method="logprobs",
    calibrated=True,
    tenant="t",
    scores={"min_logprob": -0.1},
)


def verdicts(n: int = 1) -> list[Verdict]:
    return [VERDICT] * n


def make(path: Path | str, **kw: object) -> tuple[DecisionLog, Lost]:
    lost = Lost()
    return DecisionLog(Path(path), on_error=lost, **kw), lost  # type: ignore[arg-type]


def test_after_a_rename_records_land_in_a_fresh_file_at_the_path(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    log, lost = make(path)
    log.record("r1", "t", "m", verdicts())
    path.rename(tmp_path / "decisions.jsonl.1")  # logrotate
    log.record("r2", "t", "m", verdicts())
    assert ids(tmp_path / "decisions.jsonl.1") == ["r1"]
    assert ids(path) == ["r2"]
    assert lost.count == 0
    log.close()


def test_a_deleted_file_is_re_created(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    log, lost = make(path)
    log.record("r1", "t", "m", verdicts())
    path.unlink()
    log.record("r2", "t", "m", verdicts())
    assert ids(path) == ["r2"]
    assert lost.count == 0
    log.close()


def test_a_deleted_directory_counts_every_lost_record_then_recovers(tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    folder.mkdir()
    path = folder / "decisions.jsonl"
    log, lost = make(path)
    log.record("r1", "t", "m", verdicts())
    shutil.rmtree(folder)
    log.record("r2", "t", "m", verdicts(3))  # three choices: three records lost
    log.feedback("r1", 0, True)
    assert lost.count == 4
    assert log.lookup("r2") is not None  # feedback memory is kept regardless
    folder.mkdir()
    log.record("r3", "t", "m", verdicts())
    assert ids(path) == ["r3"]
    assert lost.count == 4
    log.close()


def test_stdout_sink_writes_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    log, lost = make("-")
    log.record("r1", "t", "m", verdicts(2))
    log.feedback("r1", 1, False)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["type"], r["id"], r["choice"]) for r in lines] == [
        ("decision", "r1", 0),
        ("decision", "r1", 1),
        ("feedback", "r1", 1),
    ]
    assert lost.count == 0


def test_an_injected_stream_and_a_closed_one(tmp_path: Path) -> None:
    stream = io.StringIO()
    log, lost = make("-", stream=stream)
    log.record("r1", "t", "m", verdicts())
    assert json.loads(stream.getvalue())["id"] == "r1"
    stream.close()
    log.record("r2", "t", "m", verdicts())  # does not raise
    assert lost.count == 1


def test_feedback_memory_is_bounded_with_the_responses() -> None:
    log = DecisionLog(None, memory=2)
    for rid in ("a", "b", "c"):
        log.record(rid, "t", "m", verdicts())
        log.feedback(rid, 0, True)
    assert log.lookup("a") is None and log.previous_feedback("a", 0) is None
    assert log.previous_feedback("c", 0) is True
    assert log.previous_feedback("c", 1) is None


def test_the_app_counts_lost_records_and_keeps_serving_when_the_directory_goes(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    folder = tmp_path / "logs"
    folder.mkdir()
    client = make_client(decision_log=folder / "decisions.jsonl")

    def ask(n: int = 1) -> None:
        r = client.post("/v1/chat/completions", json={"model": "sure", **CHAT, "n": n},
                        headers=auth("clinic"))  # fmt: skip
        assert r.status_code == 200

    ask()
    shutil.rmtree(folder)
    ask(2)
    assert value(client, "abstain_decision_log_errors_total") == 2
    folder.mkdir()
    ask()
    assert len(ids(folder / "decisions.jsonl")) == 1
    assert value(client, "abstain_decision_log_errors_total") == 2


def test_the_app_can_log_to_stdout(
    make_client: Callable[..., TestClient], capsys: pytest.CaptureFixture[str]
) -> None:
    client = make_client(decision_log="-")
    r = client.post("/v1/chat/completions", json={"model": "sure", **CHAT}, headers=auth("clinic"))
    out = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    assert [(d["type"], d["id"]) for d in out] == [("decision", r.json()["id"])]
