"""Multi-claim questions: the row format, which claim a sentence states, per-sentence grading
and scores (proxy/evaluation/claims.py)."""

from __future__ import annotations

import json

import pytest

from proxy.confidence.spans import context_words, segment_scores
from proxy.evaluation import claims
from proxy.evaluation.datasets import Claim, DatasetError, Question, is_multi_claim, parse_questions
from proxy.evaluation.grading import MatchGrader
from proxy.evaluation.prompts import get_template
from proxy.evaluation.runner import Generation
from proxy.protocol import prompt_texts
from proxy.sentences import split

GRADER = MatchGrader()
GHANA = Question(
    "q1",
    "Tell me about Ghana: its capital, its currency and its continent.",
    (),
    "country",
    (
        Claim("capital", ("Accra",)),
        Claim("currency", ("Ghanaian cedi",)),
        Claim("continent", ("Africa",)),
    ),
)
SCANDIUM = Question(
    "q2",
    "Tell me about Scandium: its chemical symbol, its atomic number and who discovered it.",
    (),
    "element",
    (
        Claim("symbol", ("Sc",)),
        Claim("atomic_number", ("21",)),
        Claim("discoverer", ("Lars Fredrik Nilson",)),
    ),
)


def _row(**extra: object) -> str:
    return json.dumps({"id": "a", "question": "Tell me about X.", **extra})


def test_a_row_with_claims_parses_into_one_gold_list_per_claim() -> None:
    claim_rows = [
        {"about": "capital", "answers": ["Accra"]},
        {"about": "population", "answers": ["34 million"], "keywords": ["people", "inhabitants"]},
    ]
    (q,) = parse_questions([_row(claims=claim_rows, kind="country")])
    assert q.answers == () and q.kind == "country"
    assert q.claims == (
        Claim("capital", ("Accra",)),
        Claim("population", ("34 million",), ("people", "inhabitants")),
    )
    assert is_multi_claim([q])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"claims": []}, "'claims' must be a non-empty list"),
        ({"claims": [{"answers": ["x"]}]}, "needs a non-empty string 'about'"),
        ({"claims": [{"about": "capital", "answers": []}]}, "'answers' must be a non-empty"),
        ({"claims": [{"about": "c", "answers": ["x"], "keywords": "c"}]}, "'keywords' must"),
        ({"claims": [{"about": "c", "answers": ["x"]}], "answers": ["x"]}, "not both"),
    ],
)
def test_malformed_claims_are_refused_with_the_line(extra: dict[str, object], message: str) -> None:
    with pytest.raises(DatasetError, match=message) as info:
        parse_questions([_row(**extra)], "set.jsonl")
    assert "set.jsonl:1" in str(info.value)


def test_a_set_mixing_single_and_multi_claim_rows_is_refused() -> None:
    single = json.dumps({"id": "b", "question": "Capital of X?", "answers": ["Y"]})
    with pytest.raises(DatasetError, match="mixes multi-claim"):
        parse_questions([_row(claims=[{"about": "c", "answers": ["x"]}]), single])


def test_sentences_are_assigned_by_keyword_in_any_order() -> None:
    sentences = ["It is in Africa.", "Its currency is the cedi.", "Its capital is Accra."]
    assert claims.assign(sentences, GHANA.claims) == [
        ((2,), "weak"),
        ((1,), "keyword"),
        ((0,), "keyword"),
    ]
    element = ["Its atomic number is 21.", "It was discovered by Nilson.", "Its symbol is Sc."]
    assert [c for c, _ in claims.assign(element, SCANDIUM.claims)] == [(1,), (2,), (0,)]


def test_the_weak_keyword_yields_to_a_real_one() -> None:
    # "in" would say continent, but "capital" says what the sentence is about.
    assert claims.assign(["Its capital is in Kumasi."], GHANA.claims) == [((0,), "keyword")]


def test_sentences_without_keywords_take_the_claims_left_in_order() -> None:
    sentences = ["Its currency is the Ghanaian cedi.", "Accra.", "Africa."]
    assert claims.assign(sentences, GHANA.claims) == [
        ((1,), "keyword"),
        ((0,), "order"),
        ((2,), "order"),
    ]


def test_a_sentence_left_over_states_no_claim() -> None:
    sentences = ["Its capital is Accra.", "Its currency is the cedi.", "It is in Africa."]
    out = claims.assign([*sentences, "Ghana is a lovely country."], GHANA.claims)
    assert out[-1] == ((), "none")


def test_a_sentence_may_state_several_claims_and_must_be_right_on_each() -> None:
    both = "Its capital is Accra and its currency is the Ghanaian cedi."
    half = "Its capital is Accra and its currency is the euro."
    (assigned,) = claims.assign([both], GHANA.claims)
    assert assigned == ((0, 1), "keyword")
    stated = [GHANA.claims[0], GHANA.claims[1]]
    assert claims.grade(both, stated, GRADER)
    assert not claims.grade(half, stated, GRADER)
    assert not claims.grade("Accra.", [], GRADER)  # states nothing asked for: wrong


def test_a_dataset_may_name_its_own_keywords() -> None:
    pop = Claim("population", ("34 million",), ("inhabitants",))
    assert claims.assign(["It has 34 million inhabitants."], [GHANA.claims[0], pop]) == [
        ((1,), "keyword")
    ]
    # An unknown claim without keywords is its own keyword.
    assert claims.keywords(Claim("head_of_state", ("x",))) == ("head of state",)


def test_each_judged_sentence_is_graded_against_its_claim() -> None:
    text = " Its capital is Accra. Its currency is the Ghanaian peso. It is in West Africa."
    labels = claims.label_sentences(GHANA, text, split(text), GRADER)
    assert [(lab.text, lab.claims, lab.correct) for lab in labels] == [
        ("Its capital is Accra.", ("capital",), True),
        ("Its currency is the Ghanaian peso.", ("currency",), False),
        ("It is in West Africa.", ("continent",), True),
    ]
    assert text[labels[1].start : labels[1].end] == labels[1].text


def test_a_repeated_claim_is_graded_each_time_and_extra_sentences_are_wrong() -> None:
    text = "Its capital is Accra. Its capital is Kumasi. It is in Africa. Ghana has gold."
    labels = claims.label_sentences(GHANA, text, split(text), GRADER)
    assert [lab.correct for lab in labels] == [True, False, True, False]
    # The cedi was never stated, so the leftover sentence takes it by order.
    assert labels[3].claims == ("currency",) and labels[3].how == "order"
    stats = claims.ClaimStats()
    claims.count_claims(stats, GHANA, labels)
    assert stats.repeated == 1 and stats.by_order == 1 and stats.claims_stated == 3
    assert stats.one_per_claim == 0 and stats.sentences == 4 and stats.right == 2


def test_code_is_neither_judged_nor_labelled() -> None:
    text = "Its capital is Accra.\n```\nprint('Accra')\n```\nIt is in Africa."
    labels = claims.label_sentences(GHANA, text, split(text), GRADER)
    assert [lab.text for lab in labels] == ["Its capital is Accra.", "It is in Africa."]


def _generation(text: str, tokens: list[str], lps: list[float]) -> Generation:
    content = [
        {"token": t, "logprob": lp, "top_logprobs": [{"token": t, "logprob": lp}]}
        for t, lp in zip(tokens, lps, strict=True)
    ]
    return Generation("q1", "k", text=text.strip(), logprobs={"content": content}, raw_text=text)


TOKENS = [" Its", " capital", " is", " Acc", "ra", ".", " It", " is", " in", " Asia", "."]
LPS = [-0.01, -0.02, -0.01, -1.5, -0.1, -0.01, -0.2, -0.01, -0.01, -0.9, -0.01]


def test_sentence_scores_are_the_live_paths_with_the_prompts_words_given() -> None:
    template = get_template("sentences-fewshot")
    text = "".join(TOKENS)
    gen = _generation(text, TOKENS, LPS)
    words = claims.prompt_context(template, GHANA, "m")
    # The request the proxy would see carries the shots: "Asia" is one of their words.
    body = template.body(GHANA.question, "m")
    assert words == context_words(prompt_texts("completions", body)) and "asia" in words
    segments = split(text)
    scores = claims.sentence_scores(gen, segments, text, words)
    tops = [[lp] for lp in LPS]
    assert scores == segment_scores(segments, text, TOKENS, LPS, tops, words)
    assert scores is not None
    capital, continent = scores
    # "Accra" is the claim: two tokens, the first the least sure.
    assert capital["first_logprob"] == -1.5 and capital["log_length"] == pytest.approx(0.6931, 1e-3)
    # Every word of "It is in Asia." is given, so the sentence falls back to its tokens.
    assert continent["mean_logprob"] == pytest.approx(sum(LPS[6:]) / 5)


def test_label_all_counts_one_sentence_per_claim_and_scores_each_sentence() -> None:
    template = get_template("sentences-fewshot")
    tokens = [*TOKENS[:6], " Its", " currency", " is", " the", " cedi", ".", *TOKENS[6:]]
    lps = [*LPS[:6], -0.01, -0.01, -0.01, -0.01, -2.0, -0.01, *LPS[6:]]
    gen = _generation("".join(tokens), tokens, lps)
    failed = Generation("q9", "k9", error="HTTPError: boom")
    other = Question("q9", "Tell me about Togo.", (), "country", GHANA.claims)
    labels, stats = claims.label_all([GHANA, other], [gen, failed], GRADER, template, "m")
    assert [lab.correct for lab in labels] == [True, False, False]  # "cedi" alone is not gold
    assert labels[1].scores["min_logprob"] == -2.0
    assert stats.failed == 1 and stats.sentences == 3 and stats.one_per_claim == 1
    data, _ = claims.label([GHANA, other], [gen, failed], GRADER, template, "m")
    assert data.n == 3 and data.failed == 1 and list(data.correct) == [1.0, 0.0, 0.0]
    # One answer's sentences: cross-validation keeps them in one fold.
    assert data.groups is not None and list(data.groups) == [GHANA.id] * 3


def test_the_comparison_contexts_score_more_of_the_sentence() -> None:
    template = get_template("sentences-fewshot")
    text = "".join(TOKENS)
    gen = _generation(text, TOKENS, LPS)
    lengths = {}
    for mode in ("prompt", "none", "all"):
        (labels, _) = claims.label_all([GHANA], [gen], GRADER, template, "m", context=mode)
        lengths[mode] = labels[0].scores["log_length"]
    # "Its capital is Accra.": claim tokens (2) < less function words (3: capital, Acc, ra)
    # < all tokens (6, with the full stop).
    assert lengths["prompt"] < lengths["none"] < lengths["all"]


def test_misaligned_tokens_leave_the_sentences_unscored() -> None:
    template = get_template("sentences-fewshot")
    gen = _generation(" Its capital is Accra.", ["zzzz", "yyyy", "xxxx"], [-1.0, -1.0, -1.0])
    labels, stats = claims.label_all([GHANA], [gen], GRADER, template, "m")
    assert labels[0].scores == {} and stats.judged_whole == 1
