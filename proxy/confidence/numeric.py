"""Numeric answers: parse "1,000", "3.5 km", "$2 billion", "one thousand" into values.

Used by the numeric and embedding matchers of :mod:`proxy.confidence.consistency`: two
answers that are both numbers match when their values are equal, whatever the spelling.
The raw text is parsed, not the SQuAD-normalised one, because normalisation deletes the
decimal point ("3.5" would become "35").

Pure: standard library only.
"""

from __future__ import annotations

import math
import re

_SCALES = {"thousand": 1e3, "million": 1e6, "billion": 1e9, "trillion": 1e12}
_UNIT_ALIASES = {
    "%": "%",
    "percent": "%",
    "per cent": "%",
    "$": "dollar",
    "usd": "dollar",
    "€": "euro",
    "eur": "euro",
    "£": "pound",
    "gbp": "pound",
    "kilometer": "km",
    "kilometre": "km",
    "meter": "m",
    "metre": "m",
    "kilogram": "kg",
    "foot": "feet",
    "degree": "°",
}
_SMALL = [
    *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    *("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen"),
    *("seventeen", "eighteen", "nineteen"),
]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_WORD_VALUES = {w: i for i, w in enumerate(_SMALL)} | {w: 20 + 10 * i for i, w in enumerate(_TENS)}
_HEDGES = re.compile(r"^(?:about|approximately|approx|around|roughly|nearly|~|the)\s*")
_NUMERAL = re.compile(
    r"^(?P<sign>[-+−]?)\s*(?P<cur>[$€£]?)\s*"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?P<rest>.*)$"
)
_MAX_UNIT_WORDS = 3  # longer tails are sentences, not units
_UNIT_WORD = re.compile(r"^[a-z°%$€£²³]+$")
# A tail with one of these is a clause ("1879 in Ulm"), not a unit; "per" is allowed.
_NOT_UNIT = frozenset(
    ["in", "on", "at", "by", "from", "to", "and", "or", "of", "for", "since", "until"]
)


def _unit(words: list[str]) -> str:
    words = [w.strip(".,;:!?") for w in words]
    words = [w for w in words if w]
    if len(words) > _MAX_UNIT_WORDS or any(
        w in _NOT_UNIT or not _UNIT_WORD.match(w) for w in words
    ):
        raise ValueError("not a unit")
    joined = " ".join(words)
    if joined in _UNIT_ALIASES:
        return _UNIT_ALIASES[joined]
    # Plural and singular units are the same unit ("5 miles" = "5 mile").
    singular = [w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words]
    return " ".join(_UNIT_ALIASES.get(w, w) for w in singular)


def _words_number(words: list[str]) -> tuple[float, list[str]] | None:
    """Parse leading number words ("twenty-five thousand"); return value and the rest."""
    total, current, used, previous = 0.0, 0.0, 0, ""
    for word in words:
        if word in _WORD_VALUES:
            # Two value words in a row only as tens + units ("twenty five"); "nineteen
            # sixty" is a year said aloud, not 79, so parsing stops there.
            if previous in _WORD_VALUES and not (previous in _TENS and _WORD_VALUES[word] < 10):
                return None
            current += _WORD_VALUES[word]
        elif word == "hundred" and used:
            current *= 100
        elif word in _SCALES and used:
            total, current = total + current * _SCALES[word], 0.0
        elif not (word == "and" and used):
            break
        used += 1
        previous = word
    return (total + current, words[used:]) if used else None


def parse_number(text: str) -> tuple[float, str] | None:
    """An answer that is one number, as (value, unit); None for any other answer.

    Accepts "1,000", "3.5 km", "$2 billion", "50%", "about 1.2 million people" and number
    words ("one thousand", "twenty-five"); the unit is "" when none is given.
    """
    s = _HEDGES.sub("", text.strip().lower().rstrip(".!").strip())
    match = _NUMERAL.match(s)
    try:
        if match is not None:
            value = float(match["num"].replace(",", ""))
            if match["sign"] in ("-", "−"):
                value = -value
            rest = match["rest"].replace("%", " % ").split()
            if rest and rest[0] in _SCALES:
                value *= _SCALES[rest.pop(0)]
            unit = _unit(rest) if rest else ""
            return value, (_UNIT_ALIASES[match["cur"]] if match["cur"] else unit)
        parsed = _words_number(s.replace("-", " ").replace(",", " ").split())
        if parsed is None:
            return None
        value, rest = parsed
        return value, _unit(rest) if rest else ""
    except ValueError:
        return None


def numbers_equivalent(
    a: tuple[float, str] | None, b: tuple[float, str] | None, text_a: str, text_b: str
) -> bool:
    """Numeric equivalence when both are numbers, else equality of the normalised texts."""
    if a is None or b is None:
        return text_a == text_b
    (va, ua), (vb, ub) = a, b
    return math.isclose(va, vb, rel_tol=1e-9, abs_tol=1e-12) and (not ua or not ub or ua == ub)
