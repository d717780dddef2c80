"""The facts-multi builder: one gold list per claim, facts-dev's answer lists, a fixed split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import facts_multi
from proxy.evaluation import datasets

COUNTRIES = [
    {"name": "Chile", "capital": ["Santiago"], "region": "Americas",
     "subregion": "South America", "currencies": ["Chilean peso"]},
    {"name": "Cuba", "capital": ["Havana"], "region": "Americas", "subregion": "Caribbean",
     "currencies": ["Cuban peso", "Cuban convertible peso"]},
    {"name": "Japan", "capital": ["Tokyo"], "region": "Asia", "subregion": "Eastern Asia",
     "currencies": ["Japanese yen"]},
    {"name": "Bouvet Island", "capital": [], "region": "Antarctic", "subregion": "",
     "currencies": []},
    {"name": "Ghana", "capital": ["Accra"], "region": "Africa", "subregion": "Western Africa",
     "currencies": ["Ghanaian cedi"]},
]  # fmt: skip
ELEMENTS = [
    {"name": "Neon", "symbol": "Ne", "number": 10, "discovered_by": "Morris Travers"},
    {"name": "Aluminium", "symbol": "Al", "number": 13, "discovered_by": None},
    {"name": "Oxygen", "symbol": "O", "number": 8, "discovered_by": "Carl Wilhelm Scheele"},
    {"name": "Scandium", "symbol": "Sc", "number": 21, "discovered_by": "Lars Fredrik Nilson"},
]


def _raw(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "countries.json").write_text(json.dumps(COUNTRIES))
    (raw / "elements.json").write_text(json.dumps(ELEMENTS))
    return raw


def test_rows_have_one_gold_list_per_claim_by_facts_devs_rules(tmp_path: Path) -> None:
    rows = {r["name"]: r for r in facts_multi.entities(_raw(tmp_path))}
    assert rows["Cuba"]["claims"] == [
        {"about": "capital", "answers": ["Havana"]},
        {"about": "currency", "answers": ["Cuban peso", "Cuban convertible peso"]},
        {"about": "continent", "answers": ["Americas", "North America", "America"]},
    ]
    assert rows["Scandium"]["claims"] == [
        {"about": "symbol", "answers": ["Sc"]},
        {"about": "atomic_number", "answers": ["21"]},
        {"about": "discoverer", "answers": ["Lars Fredrik Nilson"]},
    ]
    assert facts_multi.question_text(rows["Scandium"]) == (
        "Tell me about Scandium: its chemical symbol, its atomic number and who discovered it."
    )
    assert facts_multi.question_text(rows["Cuba"]) == (
        "Tell me about Cuba: its capital, its currency and its continent."
    )


def test_entities_lacking_a_fact_and_the_prompts_shots_are_left_out(tmp_path: Path) -> None:
    names = [r["name"] for r in facts_multi.entities(_raw(tmp_path))]
    assert names == ["Chile", "Cuba", "Ghana", "Neon", "Scandium"]
    assert {"Japan", "Peru", "Hydrogen", "Oxygen"} == facts_multi.SHOT_ENTITIES


def test_the_split_is_per_kind_disjoint_and_does_not_depend_on_order(tmp_path: Path) -> None:
    rows = facts_multi.entities(_raw(tmp_path))
    dev, test = facts_multi.split(rows)
    assert set(dev) | set(test) == {r["name"] for r in rows} and not set(dev) & set(test)
    # Per kind, half (rounded down) goes to test: 3 countries -> 1, 2 elements -> 1.
    assert sum(n in test for n in ("Chile", "Cuba", "Ghana")) == 1
    assert sum(n in test for n in ("Neon", "Scandium")) == 1
    assert facts_multi.split(list(reversed(rows))) == (
        list(reversed(dev)),
        list(reversed(test)),
    )


def test_a_gold_list_differing_from_the_single_fact_sets_is_refused(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    rows = facts_multi.entities(raw)
    facts_multi.check_single(rows, raw)  # the rules agree with themselves
    rows[0]["claims"][0]["answers"] = ["Valparaiso"]
    with pytest.raises(SystemExit, match="1 gold lists differ"):
        facts_multi.check_single(rows, raw)


def test_the_packaged_sets_are_what_the_packaged_tables_give() -> None:
    dev_text, test_text = facts_multi.render()
    assert datasets.resolve("facts-multi-dev").read_text(encoding="utf-8") == dev_text
    assert datasets.resolve("facts-multi-test").read_text(encoding="utf-8") == test_text
    dev = datasets.load_questions("facts-multi-dev")
    test = datasets.load_questions("facts-multi-test")
    assert len(dev) == len(test) == 179
    assert datasets.is_multi_claim(dev) and datasets.is_multi_claim(test)
    assert not {q.question for q in dev} & {q.question for q in test}
    assert all(len(q.claims) == 3 for q in [*dev, *test])
    assert sum(q.kind == "country" for q in test) == 121


def test_check_fails_on_a_stale_file_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = tmp_path / "dev.jsonl"
    stale.write_text(datasets.resolve("facts-multi-dev").read_text(encoding="utf-8")[:-300])
    before = stale.read_text()
    good = str(datasets.resolve("facts-multi-test"))
    monkeypatch.setattr(
        "sys.argv", ["facts_multi.py", "--check", "--dev", str(stale), "--test", good]
    )
    assert facts_multi.main() == 1
    assert stale.read_text() == before
    monkeypatch.setattr("sys.argv", ["facts_multi.py", "--check"])
    assert facts_multi.main() == 0
