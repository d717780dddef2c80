"""The packaged question sets: short names, the files behind them, and what ships."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

import proxy
from proxy.cli import main as abstain
from proxy.evaluation import datasets

ROOT = Path(__file__).resolve().parents[2]
#: The row counts proxy/data/README.md documents.
ROWS = {
    "facts-dev": 548,
    "facts-extra": 549,
    "nq-open": 500,
    "facts-multi-dev": 179,
    "facts-multi-test": 179,
}


def test_the_packaged_names_are_the_documented_ones() -> None:
    assert set(datasets.PACKAGED) == set(ROWS)
    readme = (datasets.data_dir() / "README.md").read_text(encoding="utf-8")
    for name, rows in ROWS.items():
        assert f"| `{name}` | `{datasets.PACKAGED[name]}` | {rows} |" in readme


@pytest.mark.parametrize("name", sorted(ROWS))
def test_a_short_name_loads_the_packaged_file_from_anywhere(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # not the checkout: the package finds its own data
    path = datasets.resolve(name)
    assert path.is_file()
    assert path.parent == Path(proxy.__file__).resolve().parent / "data"
    questions = datasets.load_questions(name)
    assert len(questions) == ROWS[name]
    assert questions == datasets.load_questions(path)
    # A multi-claim set has one gold list per claim instead of answers.
    assert all(q.id and q.question and (q.answers or q.claims) for q in questions)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_a_short_name_has_its_files_name_so_caches_keep_their_keys(name: str) -> None:
    assert datasets.dataset_name(name) == name
    assert datasets.dataset_name(datasets.resolve(name)) == name


def test_the_held_out_facts_share_no_question_with_the_fitted_ones() -> None:
    dev = {q.question for q in datasets.load_questions("facts-dev")}
    extra = {q.question for q in datasets.load_questions("facts-extra")}
    assert dev.isdisjoint(extra)
    assert {q.kind for q in datasets.load_questions("facts-extra")} == {
        q.kind for q in datasets.load_questions("facts-dev")
    }


def test_a_path_still_works_and_a_dotted_path_is_not_a_short_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    row = {"id": "a", "question": "What is the capital of Chile?", "answers": ["Santiago"]}
    own = tmp_path / "mine.jsonl"
    own.write_text(json.dumps(row) + "\n")
    assert datasets.resolve(own) == own
    assert [q.id for q in datasets.load_questions(str(own))] == ["a"]
    assert datasets.dataset_name(own) == "mine"
    # A local file named like a packaged set is reached with an explicit ./ path.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "facts-dev").write_text(json.dumps(row) + "\n")
    assert len(datasets.load_questions("./facts-dev")) == 1
    assert len(datasets.load_questions("facts-dev")) == ROWS["facts-dev"]


@pytest.mark.parametrize("bad", ["facts", "Facts-Dev", "nq-open.jsonl", "no/such/file.jsonl"])
def test_an_unknown_name_that_is_no_file_names_the_known_sets(bad: str) -> None:
    with pytest.raises(datasets.DatasetError) as info:
        datasets.resolve(bad)
    message = str(info.value)
    assert bad in message
    assert all(name in message for name in ROWS)


def test_a_directory_is_not_a_question_file(tmp_path: Path) -> None:
    with pytest.raises(datasets.DatasetError, match="facts-dev, facts-extra, nq-open"):
        datasets.load_questions(tmp_path)


@pytest.mark.parametrize("command", ["calibrate", "eval"])
def test_the_cli_refuses_an_unknown_set_before_asking_anything(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, "--dataset", "facts-deb", "--model", "m", "--out", str(tmp_path / "o")]
    # Nothing listens on this URL: reaching the model would fail differently.
    argv += ["--base-url", "http://127.0.0.1:9/v1", "--cache-dir", str(tmp_path / "cache")]
    if command == "eval":
        argv.append("--direct")
    assert abstain(argv) == 2
    err = capsys.readouterr().err
    assert "facts-deb" in err and "facts-dev, facts-extra, nq-open" in err
    assert not (tmp_path / "cache").exists()


def test_the_cli_takes_a_short_name_and_keys_its_cache_by_it(
    model_url: str, tmp_path: Path
) -> None:
    out, cache = tmp_path / "report", tmp_path / "cache"
    argv = ["eval", "--dataset", "facts-dev", "--model", "fake-model", "--direct"]
    argv += ["--base-url", model_url, "--limit", "6", "--no-charts", "--quiet"]
    assert abstain([*argv, "--out", str(out), "--cache-dir", str(cache)]) == 0
    assert json.loads((out / "eval.json").read_text())["dataset"] == "facts-dev"
    assert [p.name for p in cache.iterdir()] == ["facts-dev--fake-model.jsonl"]
    assert len((out / "answers.jsonl").read_text().splitlines()) == 6


def test_the_help_lists_the_short_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        abstain(["calibrate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "facts-dev, facts-extra, nq-open" in help_text


def test_every_packaged_file_is_in_the_wheels_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["proxy"]
    shipped = [
        p.relative_to(ROOT / "proxy").as_posix()
        for p in (ROOT / "proxy" / "data").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    assert {"data/facts-dev.jsonl", "data/raw/countries.json", "data/README.md"} <= set(shipped)
    # setuptools globs each pattern in the package's folder, as Path.glob does.
    matched = {
        p.relative_to(ROOT / "proxy").as_posix()
        for pattern in patterns
        for p in (ROOT / "proxy").glob(pattern)
    }
    assert sorted(set(shipped) - matched) == []


def test_the_packaged_data_stays_small() -> None:
    size = sum(p.stat().st_size for p in datasets.data_dir().rglob("*") if p.is_file())
    assert size < 1_000_000
