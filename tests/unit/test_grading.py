"""Grading: normalisation and the match / exact rules."""

from __future__ import annotations

import pytest

from proxy.evaluation.grading import MatchGrader, get_grader, normalize


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Ukrainian hryvnia.", "ukrainian hryvnia"),
        ("São Tomé", "sao tome"),
        ("Port-au-Prince", "port au prince"),
        ("U.S. dollar", "us dollar"),
        ("  A   cat, an owl!  ", "cat owl"),
        ("Theodore", "theodore"),  # an article only as a whole word
        ("Côte d’Ivoire", "cote divoire"),
    ],
)
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_match_accepts_equality_and_whole_phrase_containment() -> None:
    grade = MatchGrader()
    assert grade("Santiago", ["Santiago"])
    assert grade("the Ukrainian hryvnia", ["Ukrainian hryvnia"])
    assert grade("Paris, France", ["Paris"])


def test_match_refuses_partial_words_and_partial_phrases() -> None:
    grade = MatchGrader()
    assert not grade("Nigeriana", ["Nigeria"])
    assert not grade("hryvnia", ["Ukrainian hryvnia"])
    assert not grade("Lyon", ["Paris"])


def test_any_gold_alias_counts() -> None:
    assert MatchGrader()("USD", ["United States dollar", "USD"])


def test_empty_answers_and_empty_golds_never_match() -> None:
    grade = MatchGrader()
    assert not grade("", ["Paris"])
    assert not grade("...", ["..."])
    assert not grade("the", ["The"])


def test_exact_grader_refuses_containment() -> None:
    exact = get_grader("exact")
    assert exact.name == "exact"
    assert exact("the Pacific Ocean", ["Pacific Ocean"])
    assert not exact("Paris, France", ["Paris"])


def test_unknown_grader_is_refused_with_the_known_names() -> None:
    with pytest.raises(ValueError, match="match"):
        get_grader("llm")
