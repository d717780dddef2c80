"""Answer normalisation: when two spellings of an answer count as the same.

Shared by every matcher (:mod:`.consistency`, :mod:`.embedding`) and kept apart from
them so that neither imports the other. Pure: standard library only.
"""

from __future__ import annotations

import re
import string
import unicodedata

_SPACERS = "-‐‑‒–—―/\\"
# Same rule as the evaluation grader: delete Unicode punctuation (category P), so "$" and
# "+" (symbols) survive as in the grader. Precomputed for the ASCII fast path.
_ASCII_TABLE = str.maketrans(
    {c: None for c in string.printable if unicodedata.category(c).startswith("P")}
    | dict.fromkeys("-/\\", " ")
)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse white space.

    SQuAD's rule, extended as in the evaluation grader: accents are folded ("São Tomé" =
    "Sao Tome") and hyphens, dashes and slashes become spaces, so an answer counts as the
    same here exactly when the grader would treat the two spellings alike.
    """
    if text.isascii():
        # Fast path: nearly every answer is ASCII, and this is on the per-request path.
        cleaned = text.lower().translate(_ASCII_TABLE)
    else:
        decomposed = unicodedata.normalize("NFKD", text)
        folded = "".join(c for c in decomposed if not unicodedata.combining(c)).lower()
        cleaned = "".join(
            " " if c in _SPACERS else c
            for c in folded
            if c in _SPACERS or not unicodedata.category(c).startswith("P")
        )
    return " ".join(_ARTICLES.sub(" ", cleaned).split())
