"""Labelled question sets (JSON Lines) and their deterministic fit / held-out split.

One question a line: ``{"id": "...", "question": "...", "answers": ["gold", "alias", ...],
"kind": "..."}`` (``kind`` optional). A *multi-claim* question, whose answer states several
facts judged sentence by sentence (:mod:`proxy.evaluation.claims`), has one gold list per
expected claim instead of ``answers``: ``"claims": [{"about": "capital", "answers":
[...]}, ...]`` (an optional ``"keywords"`` list names the words that say a sentence is
about that claim). A set is one kind or the other, never both.

The split is stratified by ``kind`` and decided by a hash of each id, so ``abstain
calibrate --split fit`` and ``abstain eval --split held-out`` agree on which question is
where without storing a split file, and no question is ever used both to fit a
calibration and to judge it.

The sets the project ships live in ``proxy/data`` (package data, see its README for
sources and licences); :func:`resolve` maps their short names (:data:`PACKAGED`) to the
files, so ``--dataset facts-dev`` works from any directory and from an installed wheel.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal, TypeGuard

Split = Literal["all", "fit", "held-out"]
SPLITS: tuple[Split, ...] = ("all", "fit", "held-out")


class DatasetError(ValueError):
    """A question file is missing or malformed (the message names the line)."""


#: The user's cache folder: answers and samples asked of a model (the evaluation commands'
#: and the benchmarks' caches live under it). Named here only.
CACHE_DIR = Path.home() / ".cache" / "abstain"

#: The question sets shipped in ``proxy/data``, by the short name the CLI accepts.
PACKAGED: dict[str, str] = {
    "facts-dev": "facts-dev.jsonl",
    "facts-extra": "facts-extra.jsonl",
    "nq-open": "nq-open.jsonl",
    "facts-multi-dev": "facts-multi-dev.jsonl",
    "facts-multi-test": "facts-multi-test.jsonl",
}


def data_dir() -> Path:
    """``proxy/data`` of the installed package (the raw tables are in its ``raw/``)."""
    # A regular package installed as files (editable or from the wheel) gives a real path.
    return Path(str(resources.files("proxy") / "data"))


def resolve(dataset: str | Path) -> Path:
    """The file of a question set: a short name from :data:`PACKAGED`, or a path.

    A short name wins over a file of the same bare name in the working directory (write
    ``./facts-dev`` for that); anything else must be an existing file.
    """
    text = str(dataset)
    if text in PACKAGED:
        return data_dir() / PACKAGED[text]
    path = Path(dataset)
    if not path.is_file():
        known = ", ".join(PACKAGED)
        raise DatasetError(f"{text}: no such question file, and not a packaged set ({known})")
    return path


@dataclass(frozen=True)
class Claim:
    """One fact a multi-claim question expects: what it is about, and its gold answers."""

    about: str
    answers: tuple[str, ...]
    #: words that mark a sentence as stating this claim (empty: the default for ``about``,
    #: :data:`proxy.evaluation.claims.KEYWORDS`)
    keywords: tuple[str, ...] = ()


@dataclass(frozen=True)
class Question:
    """One labelled question (``answers`` empty when it is multi-claim: see ``claims``)."""

    id: str
    question: str
    answers: tuple[str, ...]
    kind: str = ""
    claims: tuple[Claim, ...] = ()


def _strings(value: object) -> TypeGuard[list[str]]:
    return isinstance(value, list) and bool(value) and all(isinstance(a, str) for a in value)


def _claims(raw: object, where: str) -> tuple[Claim, ...]:
    if not isinstance(raw, list) or not raw:
        raise DatasetError(f"{where}: 'claims' must be a non-empty list")
    out = []
    for i, claim in enumerate(raw):
        if not isinstance(claim, dict):
            raise DatasetError(f"{where}: claim {i} must be an object")
        about, answers, keywords = claim.get("about"), claim.get("answers"), claim.get("keywords")
        if not isinstance(about, str) or not about.strip():
            raise DatasetError(f"{where}: claim {i} needs a non-empty string 'about'")
        if not _strings(answers):
            raise DatasetError(f"{where}: claim {i}: 'answers' must be a non-empty list of strings")
        words: tuple[str, ...] = ()
        if keywords is not None:
            if not _strings(keywords):
                raise DatasetError(f"{where}: claim {i}: 'keywords' must be a list of strings")
            words = tuple(keywords)
        out.append(Claim(about.strip(), tuple(answers), words))
    return tuple(out)


def _parse(line: str, where: str) -> Question:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object")
    qid, text, answers = row.get("id"), row.get("question"), row.get("answers")
    if not isinstance(qid, str | int) or not isinstance(text, str) or not text.strip():
        raise DatasetError(f"{where}: needs a string 'id' and a non-empty 'question'")
    kind = str(row.get("kind") or "")
    if "claims" in row:
        if answers is not None:
            raise DatasetError(f"{where}: give 'answers' or 'claims', not both")
        return Question(str(qid), text.strip(), (), kind, _claims(row["claims"], where))
    if not _strings(answers):
        raise DatasetError(f"{where}: 'answers' must be a non-empty list of strings")
    return Question(str(qid), text.strip(), tuple(answers), kind)


def parse_questions(lines: Iterable[str], source: str = "<lines>") -> list[Question]:
    """Questions from JSON Lines text; blank lines are skipped, duplicate ids refused."""
    out: list[Question] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        q = _parse(line, f"{source}:{number}")
        if q.id in seen:
            raise DatasetError(f"{source}:{number}: duplicate id {q.id!r}")
        seen.add(q.id)
        out.append(q)
    if not out:
        raise DatasetError(f"{source}: no questions")
    if len({bool(q.claims) for q in out}) > 1:
        raise DatasetError(f"{source}: mixes multi-claim questions ('claims') with single ones")
    return out


def is_multi_claim(questions: Sequence[Question]) -> bool:
    """Whether a set's questions expect several claims each (judged per sentence)."""
    return bool(questions) and all(q.claims for q in questions)


def load_questions(path: str | Path) -> list[Question]:
    """Read a question set (a path or a short name, see :func:`resolve`);
    :class:`DatasetError` with the path and line on failure."""
    p = resolve(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"{p}: cannot read question file ({exc.strerror})") from None
    return parse_questions(text.splitlines(), str(p))


def dataset_name(path: str | Path) -> str:
    """The name a calibration file records (and caches are keyed by): the file name
    without ``.jsonl``; a short name is its file's name, so both spellings agree."""
    text = str(path)
    file = PACKAGED.get(text, text)
    return Path(file).name.removesuffix(".jsonl").removesuffix(".json")


def _rank(seed: int, qid: str) -> str:
    return hashlib.sha256(f"{seed}:{qid}".encode()).hexdigest()


def split(
    questions: Sequence[Question], held_out_fraction: float, seed: int = 0
) -> tuple[list[Question], list[Question]]:
    """(fit, held-out): within each kind, the ``held_out_fraction`` with the lowest id hash."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError("held_out_fraction must be between 0 and 1")
    by_kind: dict[str, list[Question]] = {}
    for q in questions:
        by_kind.setdefault(q.kind, []).append(q)
    held: set[str] = set()
    for group in by_kind.values():
        ranked = sorted(group, key=lambda q: _rank(seed, q.id))
        held.update(q.id for q in ranked[: round(held_out_fraction * len(ranked))])
    return [q for q in questions if q.id not in held], [q for q in questions if q.id in held]


def select(
    questions: Sequence[Question],
    which: Split,
    held_out_fraction: float = 0.4,
    seed: int = 0,
    limit: int | None = None,
) -> list[Question]:
    """The questions of one split (``all`` keeps every question), at most ``limit``."""
    if which == "all":
        chosen = list(questions)
    else:
        fit, held_out = split(questions, held_out_fraction, seed)
        chosen = fit if which == "fit" else held_out
    return chosen[:limit] if limit is not None else chosen
