"""Build ``facts-multi``: multi-fact questions from the facts tables, one gold list per claim.

    .venv/bin/python benchmarks/facts_multi.py [--check]

Each question asks for three facts of one entity of the public tables in
``proxy/data/raw`` (the tables facts-dev and facts-extra come from), and its answer is
judged sentence by sentence (:mod:`proxy.evaluation.claims`)::

    {"id": "facts-multi-dev-0", "kind": "country",
     "question": "Tell me about Ghana: its capital, its currency and its continent.",
     "claims": [{"about": "capital", "answers": ["Accra"]},
                {"about": "currency", "answers": ["Ghanaian cedi"]},
                {"about": "continent", "answers": ["Africa"]}]}

    Tell me about Scandium: its chemical symbol, its atomic number and who discovered it.
    -> symbol ["Sc"], atomic_number ["21"], discoverer ["Lars Fredrik Nilson"]

The rules:

* an entity is asked about only when the table has all three of its facts (6 countries
  lack a capital or a currency, one element a discoverer): one question frame per kind,
  so the few-shot prompt's pattern fits every question;
* the gold lists are facts-dev's: the capital, currency, continent, symbol and
  discoverer lists of an entity are exactly the answers of its single-fact questions
  ("What is the capital of Ghana?"), which :func:`check_single` verifies against every
  single-fact question the tables give (themselves checked against facts-dev by
  ``benchmarks/facts_extra.py``); the atomic number is the table's number, as digits;
* the entities of the ``sentences-fewshot`` prompt's shots (Japan, Peru, Hydrogen,
  Oxygen) are left out, so no shot gives an answer away;
* the split is fixed: within each kind, entities are ordered by the SHA-256 of
  ``"facts-multi:" + name``; the first half (rounded down) is ``facts-multi-test``, the
  rest ``facts-multi-dev``. Fit on dev, report on test.

``--check`` rebuilds both files from the tables and fails (writing nothing) if either
differs from the committed one. Sources and licences are those of the tables
(``proxy/data/README.md``: countries ODbL 1.0, elements CC BY-SA 3.0).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: the sibling facts_extra is imported as ``benchmarks.facts_extra``.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import facts_extra
from proxy.evaluation import datasets
from proxy.evaluation.prompts import SENTENCE_SHOTS

RAW = datasets.data_dir() / "raw"
DEV = datasets.resolve("facts-multi-dev")
TEST = datasets.resolve("facts-multi-test")

COUNTRY_QUESTION = "Tell me about {}: its capital, its currency and its continent."
ELEMENT_QUESTION = "Tell me about {}: its chemical symbol, its atomic number and who discovered it."
#: The entity each shot of the prompt is about ("Tell me about Japan: ..." -> Japan).
SHOT_ENTITIES = frozenset(
    m.group(1) for q, _ in SENTENCE_SHOTS if (m := re.match(r"Tell me about (.+?):", q))
)


def _countries(countries: Sequence[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    for c in countries:
        if not c["capital"] or not c["currencies"]:
            continue
        claims = [
            {"about": "capital", "answers": list(c["capital"])},
            {"about": "currency", "answers": list(c["currencies"])},
            # facts-dev's continent rule (the region; the Americas also by half).
            {"about": "continent", "answers": facts_extra._continent(dict(c))},
        ]
        yield {"name": c["name"], "kind": "country", "claims": claims}


def _elements(elements: Sequence[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    for e in elements:
        if not e["discovered_by"]:
            continue
        claims = [
            {"about": "symbol", "answers": [e["symbol"]]},
            {"about": "atomic_number", "answers": [str(e["number"])]},
            {"about": "discoverer", "answers": [e["discovered_by"]]},
        ]
        yield {"name": e["name"], "kind": "element", "claims": claims}


def entities(raw: Path = RAW) -> list[dict[str, Any]]:
    """Every entity with all three facts, in table order, without the shots' entities."""
    countries = json.loads((raw / "countries.json").read_text(encoding="utf-8"))
    elements = json.loads((raw / "elements.json").read_text(encoding="utf-8"))
    every = [*_countries(countries), *_elements(elements)]
    return [e for e in every if e["name"] not in SHOT_ENTITIES]


def question_text(entity: Mapping[str, Any]) -> str:
    frame = COUNTRY_QUESTION if entity["kind"] == "country" else ELEMENT_QUESTION
    return frame.format(entity["name"])


#: The single-fact question whose answers a claim's gold list must equal.
_SINGLE = {
    "capital": "What is the capital of {}?",
    "currency": "What is the currency of {}?",
    "continent": "On which continent is {}?",
    "symbol": "What is the chemical symbol for {}?",
    "discoverer": "Who discovered {}?",
}


def check_single(rows: Sequence[Mapping[str, Any]], raw: Path = RAW) -> None:
    """Fail unless every claim's gold list is its single-fact question's answer list."""
    single = facts_extra.all_questions(raw)
    wrong = []
    for entity in rows:
        for claim in entity["claims"]:
            frame = _SINGLE.get(claim["about"])
            if frame is None:
                continue  # the atomic number: single-fact sets ask the other way round
            asked = single.get(frame.format(entity["name"]))
            if asked is None or asked["answers"] != claim["answers"]:
                wrong.append(f"{entity['name']}: {claim['about']}")
    if wrong:
        raise SystemExit(f"{len(wrong)} gold lists differ from the single-fact sets: {wrong[:3]}")


def _rank(name: str) -> str:
    return hashlib.sha256(f"facts-multi:{name}".encode()).hexdigest()


def split(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """(dev names, test names): per kind, the lower half of the hash order is test."""
    dev: set[str] = set()
    test: set[str] = set()
    for kind in sorted({r["kind"] for r in rows}):
        names = sorted((r["name"] for r in rows if r["kind"] == kind), key=_rank)
        half = len(names) // 2
        test.update(names[:half])
        dev.update(names[half:])
    order = [r["name"] for r in rows]
    return [n for n in order if n in dev], [n for n in order if n in test]


def render(raw: Path = RAW) -> tuple[str, str]:
    """The text of (facts-multi-dev, facts-multi-test)."""
    rows = entities(raw)
    check_single(rows, raw)
    by_name = {r["name"]: r for r in rows}
    texts = []
    for part, names in zip(("dev", "test"), split(rows), strict=True):
        lines = [
            json.dumps(
                {
                    "id": f"facts-multi-{part}-{i}",
                    "question": question_text(by_name[n]),
                    "claims": by_name[n]["claims"],
                    "kind": by_name[n]["kind"],
                }
            )
            for i, n in enumerate(names)
        ]
        texts.append("\n".join(lines) + "\n")
    return texts[0], texts[1]


def build(dev: Path = DEV, test: Path = TEST, raw: Path = RAW) -> tuple[Path, Path]:
    """Write both sets; return their paths."""
    dev_text, test_text = render(raw)
    for path, text in ((dev, dev_text), (test, test_text)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return dev, test


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dev", type=Path, default=DEV)
    parser.add_argument("--test", type=Path, default=TEST)
    parser.add_argument(
        "--check", action="store_true", help="fail if a file differs; write nothing"
    )
    args = parser.parse_args()
    if args.check:
        ok = True
        for path, text in zip((args.dev, args.test), render(), strict=True):
            same = path.is_file() and path.read_text(encoding="utf-8") == text
            state = "up to date" if same else "missing" if not path.is_file() else "differs"
            print(f"{path}: {state}")
            ok = ok and same
        return 0 if ok else 1
    for path in build(args.dev, args.test):
        print(f"wrote {sum(1 for _ in path.open(encoding='utf-8'))} questions to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
