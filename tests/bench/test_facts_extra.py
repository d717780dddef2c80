"""The facts-extra builder: facts-dev's rules applied to the tables, and its self-check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import facts_extra
from proxy.evaluation import datasets

COUNTRIES = [
    {"name": "Chile", "capital": ["Santiago"], "region": "Americas",
     "subregion": "South America", "currencies": ["Chilean peso"]},
    {"name": "Cuba", "capital": ["Havana"], "region": "Americas", "subregion": "Caribbean",
     "currencies": ["Cuban peso", "Cuban convertible peso"]},
    {"name": "Bouvet Island", "capital": [], "region": "Antarctic", "subregion": "",
     "currencies": []},
]  # fmt: skip
ELEMENTS = [
    {"name": "Neon", "symbol": "Ne", "number": 10, "discovered_by": "Morris Travers"},
    {"name": "Aluminium", "symbol": "Al", "number": 13, "discovered_by": None},
]


def _raw(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "countries.json").write_text(json.dumps(COUNTRIES))
    (raw / "elements.json").write_text(json.dumps(ELEMENTS))
    return raw


def _dev(tmp_path: Path, rows: list[dict[str, object]]) -> Path:
    path = tmp_path / "facts-dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_rules_give_every_kind_and_skip_missing_facts(tmp_path: Path) -> None:
    built = facts_extra.all_questions(_raw(tmp_path))
    assert built["On which continent is Chile?"]["answers"] == [
        "Americas", "South America", "America"
    ]  # fmt: skip
    assert built["On which continent is Cuba?"]["answers"] == [
        "Americas", "North America", "America"
    ]  # fmt: skip
    assert built["What is the currency of Cuba?"]["answers"] == [
        "Cuban peso", "Cuban convertible peso"
    ]  # fmt: skip
    assert built["Which chemical element has atomic number 10?"]["answers"] == ["Neon"]
    assert "What is the capital of Bouvet Island?" not in built  # no capital listed
    assert "Who discovered Aluminium?" not in built  # no discoverer listed
    assert built["On which continent is Bouvet Island?"]["answers"] == ["Antarctic"]


def test_build_writes_only_the_questions_facts_dev_lacks(tmp_path: Path) -> None:
    dev = [{"id": "facts-dev-0", "question": "What is the capital of Chile?",
            "answers": ["Santiago"], "kind": "capital"}]  # fmt: skip
    out = facts_extra.build(tmp_path / "extra.jsonl", _dev(tmp_path, dev), _raw(tmp_path))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    questions = [r["question"] for r in rows]
    assert "What is the capital of Chile?" not in questions
    assert "What is the capital of Cuba?" in questions
    assert len(rows) == len(facts_extra.all_questions(tmp_path / "raw")) - 1
    assert [r["id"] for r in rows] == [f"facts-extra-{i}" for i in range(len(rows))]


def test_build_refuses_when_the_rules_do_not_rebuild_facts_dev(tmp_path: Path) -> None:
    dev = [{"id": "facts-dev-0", "question": "What is the capital of Chile?",
            "answers": ["Valparaiso"], "kind": "capital"}]  # fmt: skip
    with pytest.raises(SystemExit, match="do not rebuild 1 facts-dev questions"):
        facts_extra.build(tmp_path / "extra.jsonl", _dev(tmp_path, dev), _raw(tmp_path))
    assert not (tmp_path / "extra.jsonl").exists()


def test_the_packaged_facts_extra_is_what_the_packaged_tables_give(tmp_path: Path) -> None:
    packaged = datasets.resolve("facts-extra").read_text(encoding="utf-8")
    raw = datasets.data_dir() / "raw"
    built = facts_extra.build(tmp_path / "extra.jsonl", datasets.resolve("facts-dev"), raw)
    assert built.read_text(encoding="utf-8") == packaged
    assert len(packaged.splitlines()) == 549
    # The script's defaults are the packaged files, so a plain run rewrites the same file.
    assert datasets.resolve("facts-extra") == facts_extra.OUT
    assert facts_extra.render() == packaged


def test_check_fails_on_a_stale_file_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = tmp_path / "facts-extra.jsonl"
    stale.write_text(datasets.resolve("facts-extra").read_text(encoding="utf-8")[:-200])
    before = stale.read_text()
    monkeypatch.setattr("sys.argv", ["facts_extra.py", "--check", "--out", str(stale)])
    assert facts_extra.main() == 1
    assert stale.read_text() == before
    monkeypatch.setattr("sys.argv", ["facts_extra.py", "--check"])
    assert facts_extra.main() == 0
