"""Build ``facts-extra``: the facts questions facts-dev left out, by facts-dev's own rules.

    .venv/bin/python benchmarks/facts_extra.py [--check] [--out FILE]

facts-dev (548 questions) samples two public tables that ship beside it in
``proxy/data/raw``: countries (capital, currency, continent) and chemical elements
(symbol, atomic number, discoverer). The rest of those tables holds about as many
questions again, of the same kinds and drawn the same way, which makes a second held-out
set: one split of 220 questions judges an ECE only to about ±0.05, so a calibration's
held-out numbers need more questions than facts-dev can spare after fitting.

The rules below were read off facts-dev; :func:`check_rules` rebuilds every facts-dev
question from the tables and fails if a single answer list differs, so the extra
questions are built exactly as the originals were. The result is committed as
``proxy/data/facts-extra.jsonl`` (the CLI's ``--dataset facts-extra``); ``--check`` only
verifies that the committed file is what the tables give. Sources and licences are in
``proxy/data/README.md`` (countries: ODbL 1.0; elements: CC BY-SA 3.0).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from proxy.evaluation import datasets

DATA = datasets.data_dir()
FACTS_DEV = datasets.resolve("facts-dev")
RAW = DATA / "raw"
OUT = datasets.resolve("facts-extra")


def _continent(country: dict[str, Any]) -> list[str]:
    # facts-dev accepts the region, and for the Americas also the half and plain "America".
    region = country["region"]
    if region != "Americas":
        return [region]
    half = "South America" if country["subregion"] == "South America" else "North America"
    return ["Americas", half, "America"]


def _from_countries(countries: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for c in countries:
        name = c["name"]
        if c["capital"]:
            yield {"question": f"What is the capital of {name}?", "answers": list(c["capital"]),
                   "kind": "capital"}  # fmt: skip
        if c["currencies"]:
            yield {"question": f"What is the currency of {name}?",
                   "answers": list(c["currencies"]), "kind": "currency"}  # fmt: skip
        yield {"question": f"On which continent is {name}?", "answers": _continent(c),
               "kind": "continent"}  # fmt: skip


def _from_elements(elements: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for e in elements:
        name = e["name"]
        yield {"question": f"What is the chemical symbol for {name}?", "answers": [e["symbol"]],
               "kind": "symbol"}  # fmt: skip
        yield {"question": f"Which chemical element has atomic number {e['number']}?",
               "answers": [name], "kind": "atomic_number"}  # fmt: skip
        if e["discovered_by"]:
            yield {"question": f"Who discovered {name}?", "answers": [e["discovered_by"]],
                   "kind": "discoverer"}  # fmt: skip


def all_questions(raw: Path = RAW) -> dict[str, dict[str, Any]]:
    """Every question the two tables give, by question text."""
    countries = json.loads((raw / "countries.json").read_text(encoding="utf-8"))
    elements = json.loads((raw / "elements.json").read_text(encoding="utf-8"))
    rows = [*_from_countries(countries), *_from_elements(elements)]
    return {r["question"]: r for r in rows}


def check_rules(built: dict[str, dict[str, Any]], facts_dev: Sequence[dict[str, Any]]) -> None:
    """Fail unless the rules rebuild every facts-dev question with the same answers."""
    wrong = [
        r["question"]
        for r in facts_dev
        if r["question"] not in built
        or built[r["question"]]["answers"] != r["answers"]
        or built[r["question"]]["kind"] != r["kind"]
    ]
    if wrong:
        raise SystemExit(f"the rules do not rebuild {len(wrong)} facts-dev questions: {wrong[:3]}")


def render(facts_dev: Path = FACTS_DEV, raw: Path = RAW) -> str:
    """The text of facts-extra: the questions facts-dev lacks, ids facts-extra-N."""
    dev = [json.loads(line) for line in facts_dev.read_text(encoding="utf-8").splitlines()]
    built = all_questions(raw)
    check_rules(built, dev)
    taken = {r["question"] for r in dev}
    extra = [r for q, r in built.items() if q not in taken]
    lines = [json.dumps({"id": f"facts-extra-{i}", **r}) for i, r in enumerate(extra)]
    return "\n".join(lines) + "\n"


def build(out: Path = OUT, facts_dev: Path = FACTS_DEV, raw: Path = RAW) -> Path:
    """Write :func:`render`'s questions to ``out``; return ``out``."""
    text = render(facts_dev, raw)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="fail if --out differs; write nothing")
    args = parser.parse_args()
    if args.check:
        if not args.out.is_file():
            print(f"{args.out}: missing")
            return 1
        same = args.out.read_text(encoding="utf-8") == render()
        print(f"{args.out}: {'up to date' if same else 'differs from what the tables give'}")
        return 0 if same else 1
    path = build(args.out)
    print(f"wrote {sum(1 for _ in path.open(encoding='utf-8'))} questions to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
