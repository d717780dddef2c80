"""Deciding whether an answer is right: normalisation and the offline match grader.

The default rule (``match``), after SQuAD-style normalisation of both sides: an answer is
right when it equals a gold answer or contains one as a whole phrase ("the Ukrainian
hryvnia" contains "Ukrainian hryvnia"; "hryvnia" does not, and neither does
"Nigeriana" contain "Nigeria"). ``exact`` accepts equality only.

Normalisation, and why each step:

* Unicode compatibility decomposition with accents dropped, so "São Tomé" matches
  "Sao Tome" (models spell names both ways; the gold lists rarely carry both).
* lower case;
* hyphens, dashes and slashes become spaces ("Port-au-Prince" = "Port au Prince"), every
  other punctuation mark is deleted as in SQuAD ("U.S." = "US", "Côte d'Ivoire" =
  "Cote dIvoire" on both sides);
* the articles a/an/the are dropped and white space is collapsed.

Graders are pluggable (:class:`Grader`); a judge-model grader can implement the same
protocol outside this pure module. Nothing here imports a web or HTTP library.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

_SPACERS = re.compile(r"[-‐‑‒–—―/\\]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """Fold accents and case, drop punctuation and articles, collapse white space."""
    decomposed = unicodedata.normalize("NFKD", text)
    folded = "".join(c for c in decomposed if not unicodedata.combining(c)).lower()
    spaced = _SPACERS.sub(" ", folded)
    no_punct = "".join(c for c in spaced if not unicodedata.category(c).startswith("P"))
    no_articles = _ARTICLES.sub(" ", no_punct)
    return " ".join(no_articles.split())


class Grader(Protocol):
    """Decides whether ``answer`` is right given the gold answers (any one suffices)."""

    @property
    def name(self) -> str: ...

    def __call__(self, answer: str, gold: Sequence[str]) -> bool: ...


@dataclass(frozen=True)
class MatchGrader:
    """Exact match, or (by default) whole-phrase containment, after :func:`normalize`."""

    containment: bool = True

    @property
    def name(self) -> str:
        return "match" if self.containment else "exact"

    def __call__(self, answer: str, gold: Sequence[str]) -> bool:
        said = normalize(answer)
        if not said:
            return False
        padded = f" {said} "
        for g in gold:
            want = normalize(g)
            if not want:
                continue  # a gold answer that was only an article or punctuation
            if said == want or (self.containment and f" {want} " in padded):
                return True
        return False


GRADERS: dict[str, Grader] = {"match": MatchGrader(), "exact": MatchGrader(containment=False)}


def get_grader(name: str) -> Grader:
    """A grader by name; ``ValueError`` listing the known names otherwise."""
    try:
        return GRADERS[name]
    except KeyError:
        raise ValueError(f"unknown grader {name!r}; known: {', '.join(GRADERS)}") from None
