"""The sentence splitter: where answers are cut, and that streaming can trust the cuts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sentences import complete, marker_length, split


def parts(text: str) -> list[tuple[str, str]]:
    return [(text[s.start : s.end], s.kind) for s in split(text)]


def texts(text: str) -> list[str]:
    return [t for t, _ in parts(text)]


def test_three_sentences() -> None:
    text = "Peru is in South America. Its capital is Lima. Its currency is the peseta."
    assert texts(text) == [
        "Peru is in South America.",
        "Its capital is Lima.",
        "Its currency is the peseta.",
    ]


def test_abbreviations_initials_and_numbers_do_not_end_sentences() -> None:
    text = "Dr. Smith paid 3.50 dollars, e.g. in cash. J. R. R. Tolkien wrote it in 1954."
    assert texts(text) == [
        "Dr. Smith paid 3.50 dollars, e.g. in cash.",
        "J. R. R. Tolkien wrote it in 1954.",
    ]


def test_a_one_letter_answer_ends_its_sentence_when_a_sentence_follows() -> None:
    text = "Its chemical symbol is B. Its atomic number is 5. By J. Smith."
    assert texts(text) == ["Its chemical symbol is B.", "Its atomic number is 5.", "By J. Smith."]


def test_other_terminators_quotes_and_brackets() -> None:
    text = 'He said "Go." Then (again) he went! Really? Yes… Fine.'
    assert texts(text) == ['He said "Go."', "Then (again) he went!", "Really?", "Yes…", "Fine."]


def test_a_lower_case_word_after_a_dot_does_not_start_a_sentence() -> None:
    assert texts("It costs 5 ft. of rope. or more") == ["It costs 5 ft. of rope. or more"]


def test_list_lines_are_one_part_each_and_keep_their_marker_length() -> None:
    text = "Facts:\n- Capital: Lima.\n- Currency: sol. Not the peseta.\n2) Two\n# Head"
    got = parts(text)
    assert got == [
        ("Facts:", "sentence"),
        ("- Capital: Lima.", "line"),
        ("- Currency: sol. Not the peseta.", "line"),
        ("2) Two", "line"),
        ("# Head", "line"),
    ]
    line = split(text)[1]
    assert marker_length(text, line.start, line.end) == 2


def test_code_blocks_are_one_unjudged_part() -> None:
    text = "Run this:\n```python\nx = 1. \nprint(x)\n```\nDone. Next."
    got = split(text)
    assert [(text[s.start : s.end], s.judged) for s in got] == [
        ("Run this:", True),
        ("```python\nx = 1. \nprint(x)\n```", False),
        ("Done.", True),
        ("Next.", True),
    ]


def test_unclosed_code_runs_to_the_end() -> None:
    assert parts("```\nunclosed. Code") == [("```\nunclosed. Code", "code")]


def test_cjk_full_stops() -> None:
    assert texts("日本の首都は東京です。通貨は円です。") == [
        "日本の首都は東京です。",
        "通貨は円です。",
    ]


def test_segments_have_no_outer_white_space_and_empty_text_has_none() -> None:
    assert split("") == []
    assert split("  \n\t ") == []
    text = "  One.   Two.  \n\n  Three.  "
    assert texts(text) == ["One.", "Two.", "Three."]


def test_complete_holds_back_the_part_that_may_go_on() -> None:
    assert [s.end for s in complete("One. Two")] == [4]
    assert complete("One.") == []  # the next sentence has not begun
    assert len(complete("One. Two.\n")) == 2  # a line break closes the last one
    assert complete("```\ncode\n") == []  # a code block open until its fence
    assert len(complete("```\ncode\n```\n")) == 1


_ALPHABET = st.sampled_from(
    [*'ab A.!? \n-1`。"', "Dr.", "e.g.", "```", "3.5", "é", " B.", " It", "s", " Its "]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_ALPHABET, max_size=40).map("".join))
def test_prefix_stable(text: str) -> None:
    """What complete() says of any prefix is what the whole text gives: streaming may
    send a part as soon as it is complete."""
    whole = split(text)
    for cut in range(len(text) + 1):
        done = complete(text[:cut])
        assert done == whole[: len(done)], (text, cut)


@settings(max_examples=300, deadline=None)
@given(st.lists(_ALPHABET, max_size=40).map("".join))
def test_segments_are_ordered_disjoint_and_cover_every_non_space(text: str) -> None:
    segments = split(text)
    covered = set()
    last = 0
    for s in segments:
        assert last <= s.start < s.end <= len(text)
        assert not text[s.start].isspace() and not text[s.end - 1].isspace()
        covered.update(range(s.start, s.end))
        last = s.end
    assert {i for i, c in enumerate(text) if not c.isspace()} <= covered


@settings(max_examples=300, deadline=None)
@given(st.lists(_ALPHABET, max_size=40).map("".join))
def test_splitting_on_from_a_sentence_end_cuts_as_the_whole_text(text: str) -> None:
    """A stream splits only what follows its last decided sentence; that must give what
    splitting everything again would (the property that keeps a stream linear)."""
    whole = split(text)
    for end in {s.end for s in whole if s.kind == "sentence"} | {0}:
        assert split(text, end) == [s for s in whole if s.start >= end], (text, end)
        for cut in range(end, len(text) + 1):
            after = [s for s in complete(text[:cut]) if s.start >= end]
            assert complete(text[:cut], end) == after, (text, end, cut)
