"""Splitting an answer into the parts judged one by one: sentences, list lines, code.

:func:`split` cuts a text into :class:`Segment` s, each a ``[start, end)`` range of
character (code point) offsets with no white space at either end; the white space
between segments is left out of every segment, so a rewrite can keep it verbatim.

The rules, in order:

* a fenced code block (a line opening with three backticks, up to the closing fence or
  the end of the text) is one ``code`` segment, passed through unjudged: code is not a
  claim a token probability can vouch for;
* a line break always ends a segment; a line that opens with a list marker (``-``,
  ``*``, ``•``, ``1.``, ``2)``, ``a)``) or a heading mark (``#``) is one ``line``
  segment, whatever punctuation it holds: a list item is one claim;
* elsewhere, a sentence ends at ``.``, ``!``, ``?`` or ``…`` (repeated, and followed by
  closing quotes or brackets) when white space follows and then something that can open
  a sentence (an upper-case letter, a digit, a quote or an opening bracket). Not after a
  known abbreviation ("Dr.", "e.g.", "U.S."), nor after a single capital letter
  (an initial: "J. R. R. Tolkien") unless a word such as "It" or "The" follows ("Its
  symbol is B. Its atomic number is 5."). A dot between digits ("3.14") has no white space
  after it and never ends a sentence. ``。``, ``！`` and ``？`` end a sentence with no
  space after them.

Limits, stated plainly: it is a rule-based splitter for English prose as chat models
write it. It does not know every abbreviation ("approx." is known, "Ps." is not), splits
"He moved to the U.S. Then…" in the wrong place when an abbreviation really ends a
sentence, keeps a hard-wrapped sentence as two lines, and treats text with no sentence
punctuation (Thai, for one) as one sentence per line.

Prefix-stable, which is what streaming needs: where the text is cut is decided by the
text up to the first character of the next segment, so every segment but the last one of
a prefix is final (:func:`complete`).

Pure: standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

#: ``sentence``: prose, judged; ``line``: a list item or heading, judged; ``code``: a
#: fenced code block, not judged.
SegmentKind = Literal["sentence", "line", "code"]


@dataclass(frozen=True, slots=True)
class Segment:
    """One part of an answer: ``text[start:end]``, with no white space at either end."""

    start: int
    end: int
    kind: SegmentKind

    @property
    def judged(self) -> bool:
        """Whether the part gets a verdict of its own (code does not)."""
        return self.kind != "code"


#: Words that end with a dot without ending a sentence (lower case, without the dot).
ABBREVIATIONS = frozenset(
    {
        *("mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "ft", "vs", "etc"),
        *("e.g", "i.e", "cf", "approx", "vol", "fig", "inc", "ltd", "corp", "dept"),
        *("jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec"),
        *("u.s", "u.k", "u.n", "a.m", "p.m", "sgt", "rev", "univ"),
    }
)
# Words that are abbreviations often enough to matter but also end sentences ("no",
# "est") are left out: a missed split costs one sentence judged with its neighbour,
# a wrong split cuts a claim in two.

_FENCE = re.compile(r"[ \t]*```")
_LIST_MARK = re.compile(r"[ \t]*(?:[-*•+]|\d{1,3}[.)]|[a-zA-Z][)]|#{1,6})[ \t]")
# A candidate end: terminators, closing quotes/brackets, white space, then an opener.
_END = re.compile(
    r"[.!?…]+[\"'”’)\]]*(?=\s+[\"'“‘(\[A-Z0-9À-ÖØ-Þ])"
    # Chinese and Japanese full stops need no space after them.
    r"|[。！？]+[」』）]*(?=[^\s。！？」』）])"
)
_WORD_BEFORE = re.compile(r"(\S+)$")
#: How far back the word before a dot is looked for: longer than any abbreviation.
_LOOK_BACK = 32
_NEXT_WORD = re.compile(r"\s+(\w+)")
#: Words that open sentences and are never a surname, so a capital letter and a dot
#: before one of them is the end of a sentence rather than an initial.
_OPENERS = frozenset(
    {
        *("the", "its", "it", "this", "that", "these", "those", "there", "then", "he"),
        *("she", "they", "we", "his", "her", "their", "our", "in", "a", "an", "and"),
        *("but", "so", "also", "which", "what", "one", "both", "each", "is", "was"),
    }
)


def _ends_sentence(text: str, match: re.Match[str]) -> bool:
    """Whether a candidate end really ends the sentence (not "Dr." nor "J.")."""
    if match.group().startswith(".") and len(match.group().rstrip("\"'”’)]")) == 1:
        # A bounded look back: searching from 0 made splitting quadratic in the text (10k
        # sentences took 10 s). A word longer than the window is no abbreviation nor an
        # initial, and its last _LOOK_BACK characters say so as well as the whole word.
        before = _WORD_BEFORE.search(text, max(0, match.start() - _LOOK_BACK), match.start())
        word = before.group(1).lstrip("\"'“‘([") if before else ""
        if word.lower() in ABBREVIATIONS:
            return False
        if len(word) == 1 and word.isupper():
            # An initial ("J. R. R. Tolkien"), unless a word that opens sentences and
            # never a name follows: "Its symbol is B. Its atomic number is 5."
            return _next_word(text, match.end()) in _OPENERS
    return True


def _next_word(text: str, pos: int) -> str | None:
    """The lower-cased word after the white space at ``pos``; None while it may go on
    (it reaches the end of the text, so more of it may be on its way)."""
    found = _NEXT_WORD.match(text, pos)
    if found is None or found.end() >= len(text):
        return None
    return found.group(1).lower()


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _prose(text: str, start: int, end: int, out: list[Segment]) -> None:
    """Cut one line of prose into sentences."""
    cursor = start
    for match in _END.finditer(text, start, end):
        if _ends_sentence(text, match):
            s, e = _strip(text, cursor, match.end())
            if s < e:
                out.append(Segment(s, e, "sentence"))
            cursor = match.end()
    s, e = _strip(text, cursor, end)
    if s < e:
        out.append(Segment(s, e, "sentence"))


def split(text: str, start: int = 0) -> list[Segment]:
    """Every segment of ``text``, in order; from ``start`` on, when given.

    ``start`` is the start of a line, or the end of a sentence inside a prose line (a
    cut this function made): the segments are then exactly those :func:`split` finds
    after it in the whole text, without cutting again what comes before, so a stream
    can split only what is new.
    """
    out: list[Segment] = []
    pos = start
    n = len(text)
    if 0 < pos < n and text[pos - 1] != "\n":
        # Inside a prose line: the rest of it is prose, cut as the whole line would be.
        eol = text.find("\n", pos)
        line_end = n if eol < 0 else eol
        _prose(text, pos, line_end, out)
        pos = line_end + 1
    while pos < n:
        eol = text.find("\n", pos)
        line_end = n if eol < 0 else eol
        if _FENCE.match(text, pos, line_end):
            close = _closing_fence(text, line_end)
            s, e = _strip(text, pos, close)
            out.append(Segment(s, e, "code"))
            pos = close
            continue
        if _LIST_MARK.match(text, pos, line_end):
            s, e = _strip(text, pos, line_end)
            out.append(Segment(s, e, "line"))
        else:
            _prose(text, pos, line_end, out)
        pos = line_end + 1
    return out


def _closing_fence(text: str, after: int) -> int:
    """The end of the line that closes the fence opened before ``after`` (or the text's end)."""
    pos = after + 1
    while pos < len(text):
        eol = text.find("\n", pos)
        line_end = len(text) if eol < 0 else eol
        if _FENCE.match(text, pos, line_end):
            return line_end
        pos = line_end + 1
    return len(text)


def marker_length(text: str, start: int, end: int) -> int:
    """How many characters of ``text[start:end]`` are a list marker (and the space after)."""
    match = _LIST_MARK.match(text, start, end)
    return match.end() - start if match else 0


def complete(text: str, start: int = 0) -> list[Segment]:
    """The segments of a text still being written that no later text can change (from
    ``start`` on, as :func:`split` takes it).

    All segments but the last: the last may go on (a sentence without its end yet, or an
    end whose next sentence has not begun), unless a line break closed it. At the end of
    the stream, use :func:`split`.
    """
    segments = split(text, start)
    if segments and text.endswith("\n") and not _open_code(text, segments[-1]):
        return segments
    return segments[:-1]


def _open_code(text: str, segment: Segment) -> bool:
    """A code segment whose closing fence has not come yet."""
    if segment.kind != "code":
        return False
    last_line = text.rfind("\n", segment.start, segment.end)
    return last_line < 0 or not _FENCE.match(text, last_line + 1, segment.end)
