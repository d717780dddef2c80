"""The answer-text inputs (issue 12.4): the question read from a request, how much of the
answer it already holds, and the logprobs of the tokens that carry the answer."""

from __future__ import annotations

import math

import pytest

from proxy.confidence.features import SCORES, TEXT_SCORES, reads_text, uncalibrated
from proxy.confidence.logprobs import MalformedLogprobs
from proxy.confidence.question import MAX_PROMPT_CHARS, prompt_question, question_of
from proxy.confidence.shift_scores import (
    question_overlap,
    question_words,
    text_scores,
    text_scores_of_choice,
    token_roles,
    words,
)
from proxy.evaluation import datasets
from proxy.evaluation.calibrate import label
from proxy.evaluation.grading import MatchGrader
from proxy.evaluation.prompts import TEMPLATES
from proxy.evaluation.runner import Generation

TOKELAU = "What is the capital of Tokelau?"
YEAR = [" ", "1", "9", "4", "5"]
YEAR_LPS = [-0.5, -0.01, -0.05, -0.9, -0.3]


# --- the question ------------------------------------------------------------------------


def test_chat_question_is_the_last_user_message() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris"},
            {"role": "user", "content": "  And of Italy?  "},
            {"role": "assistant", "content": ""},
        ]
    }
    assert question_of("chat", body) == "And of Italy?"


def test_chat_question_joins_the_text_parts_and_skips_images() -> None:
    parts = [
        {"type": "text", "text": "Who painted"},
        {"type": "image_url", "image_url": {"url": "data:,"}},
        {"type": "text", "text": "this?"},
    ]
    assert question_of("chat", {"messages": [{"role": "user", "content": parts}]}) == (
        "Who painted this?"
    )


@pytest.mark.parametrize(
    "messages",
    [[{"role": "system", "content": "hi"}], "not a list", None, [{"role": "user", "content": 3}]],
)
def test_chat_without_a_user_text_has_no_question(messages: object) -> None:
    assert question_of("chat", {"messages": messages}) is None


def test_completions_question_is_the_text_after_the_last_q_label() -> None:
    prompt = "Q: Who wrote Hamlet?\nA: Shakespeare\nQ: What is the capital of Tokelau?\nA:"
    assert question_of("completions", {"prompt": prompt}) == TOKELAU
    assert prompt_question("Question: How far is the Moon?\nAnswer:") == "How far is the Moon?"
    assert prompt_question("q: one line? a:") == "one line?"


def test_completions_without_a_label_read_the_last_line_that_is_not_an_answer_cue() -> None:
    assert prompt_question("Translate to French:\ncheese\n\nAnswer:\n") == "cheese"
    assert prompt_question("just a statement") == "just a statement"
    assert prompt_question("") == ""
    assert prompt_question("\n\nA:") == ""


def test_only_the_end_of_a_long_prompt_is_read() -> None:
    prompt = "Q: an early shot?\n" + "x" * (2 * MAX_PROMPT_CHARS) + "\nQ: the real one?\nA:"
    assert prompt_question(prompt) == "the real one?"


@pytest.mark.parametrize(
    ("prompt", "question"),
    [(["Q: only one?\nA:"], "only one?"), (["Q: a?\nA:", "Q: b?\nA:"], None), ([1, 2, 3], None)],
)
def test_a_batch_of_prompts_has_a_question_only_when_it_holds_one(
    prompt: object, question: str | None
) -> None:
    assert question_of("completions", {"prompt": prompt}) == question


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("dataset", ["facts-dev", "facts-extra", "nq-open"])
def test_the_proxy_reads_the_shipped_templates_question_back(dataset: str, template: str) -> None:
    # Offline fitting (label) uses the question's text; the live proxy reads it from the
    # request: the two must agree for a calibration to mean the same in both places.
    tpl = TEMPLATES[template]
    for q in datasets.load_questions(datasets.resolve(dataset)):
        assert question_of(tpl.endpoint, tpl.body(q.question, "m")) == q.question.strip()


# --- words and overlap ---------------------------------------------------------------


def test_words_fold_case_and_accents_and_keep_numbers_whole() -> None:
    assert [w.value for w in words("São Tomé, 1,000 and 17.5%")] == [
        "sao", "tome", "1000", "and", "17.5",
    ]  # fmt: skip
    # Offsets are those of the original text, accents included.
    w = words("Ångström")[0]
    assert (w.start, w.end, w.value) == (0, 8, "angstrom")


@pytest.mark.parametrize(
    ("answer", "question", "share"),
    [
        ("Tokelau", TOKELAU, 1.0),
        ("Paris", "What is the capital of France?", 0.0),
        ("Treaty of Versailles", "what was the treaty that allowed russia to withdraw", 0.5),
        ("17.5 to 20", "when did VAT change from 17.5 to 20?", 1.0),
        ("Sao Tome", "What is the capital of São Tomé?", 1.0),
        ("1,000", "is it 1000?", 1.0),
        ("San Salvador", "What is the capital of El Salvador?", 0.5),
        ("", TOKELAU, 0.0),
        ("the of", TOKELAU, 0.0),  # only function words: nothing copied
        ("...", TOKELAU, 0.0),
    ],
)
def test_question_overlap_by_hand(answer: str, question: str, share: float) -> None:
    assert question_overlap(answer, question_words(question)) == pytest.approx(share)


# --- the answer-token logprobs -------------------------------------------------------


def test_a_numbers_leading_space_is_skipped() -> None:
    asked = question_words("In which year did the war end?")
    carries = [c for c, _ in token_roles(YEAR, asked)]
    assert carries == [False, True, True, True, True]
    s = text_scores(YEAR, [-2.0, -0.01, -0.05, -0.9, -0.3], asked)
    assert s["answer_min_logprob"] == -0.9  # the least likely digit, not the space
    assert s["question_overlap"] == 0.0


def test_an_answer_copied_whole_reads_its_carrying_tokens_and_overlaps_fully() -> None:
    s = text_scores([" Tok", "el", "au", "."], [-0.3, -0.01, -0.02, -2.0], question_words(TOKELAU))
    assert s == {
        "answer_min_logprob": -0.3,  # nothing new: the carrying tokens, never the "."
        "question_overlap": 1.0,
    }


def test_the_min_reads_only_what_the_answer_adds() -> None:
    asked = question_words("What is the capital of El Salvador?")
    s = text_scores([" San", " Salvador"], [-0.8, -0.05], asked)
    assert s["answer_min_logprob"] == -0.8
    s = text_scores([" El", " Salvador", " City"], [-0.01, -0.02, -1.5], asked)
    assert s["answer_min_logprob"] == -1.5
    assert s["question_overlap"] == pytest.approx(2 / 3)


def test_a_token_is_copied_only_if_every_word_it_touches_is() -> None:
    # "elau City" touches "Tokelau" (copied) and "City" (new): it is not a copy.
    s = text_scores([" Tok", "elau City"], [-0.1, -1.2], question_words(TOKELAU))
    assert s["answer_min_logprob"] == -1.2


def test_function_word_tokens_do_not_carry_the_answer() -> None:
    s = text_scores([" The", " Nile"], [-0.9, -0.2], question_words("Which river?"))
    assert s["answer_min_logprob"] == -0.2


def test_without_a_carrying_token_the_tokens_with_text_are_read() -> None:
    # A stream's stop tokens arrive as empty text: they never count.
    s = text_scores([".", "!", ""], [-0.4, -0.7, -5.0], question_words(TOKELAU))
    assert s == {"answer_min_logprob": -0.7, "question_overlap": 0.0}
    s = text_scores([" Paris", ""], [-0.2, -5.0], question_words(TOKELAU))
    assert s["answer_min_logprob"] == -0.2


def test_without_a_question_nothing_is_given() -> None:
    assert text_scores(YEAR, YEAR_LPS, None) == {}


@pytest.mark.parametrize(
    ("texts", "lps"), [([], []), (["a"], []), (["a", "b"], [-0.1]), ([], [-0.1])]
)
def test_no_scores_without_aligned_tokens(texts: list[str], lps: list[float]) -> None:
    assert text_scores(texts, lps, question_words(TOKELAU)) == {}


def test_both_wire_shapes_give_the_same_scores() -> None:
    chat = {
        "content": [
            {"token": t, "logprob": lp, "top_logprobs": [{"token": t, "logprob": lp}]}
            for t, lp in zip(YEAR, YEAR_LPS, strict=True)
        ]
    }
    completions = {
        "tokens": ["<echo>", *YEAR],
        "token_logprobs": [None, *YEAR_LPS],
        "top_logprobs": [None, *({t: lp} for t, lp in zip(YEAR, YEAR_LPS, strict=True))],
    }
    expected = text_scores(YEAR, YEAR_LPS, question_words("When?"))
    assert text_scores_of_choice(chat, "When?") == expected
    assert text_scores_of_choice(completions, "When?") == expected
    assert text_scores_of_choice(None, "When?") == {}
    # Logprobs without token texts: nothing can be said about which token is which.
    assert text_scores_of_choice({"token_logprobs": [-0.1]}, "When?") == {}
    with pytest.raises(MalformedLogprobs):
        text_scores_of_choice({"content": [{"token": "a", "logprob": 5.0}]}, "When?")


# --- the vocabulary, and fitting offline ----------------------------------------------


def test_text_scores_are_registered_as_logistic_inputs_only() -> None:
    assert set(TEXT_SCORES) == {"question_overlap", "answer_min_logprob"}
    assert all(SCORES[n].source == "text" and not SCORES[n].rankable for n in TEXT_SCORES)
    assert reads_text(["min_logprob", "question_overlap"])
    assert not reads_text(["min_logprob", "first_logprob"])
    assert uncalibrated("answer_min_logprob", math.log(0.5)) == pytest.approx(0.5)


def test_labelled_answers_carry_the_text_scores_of_their_question() -> None:
    q = datasets.Question("q1", TOKELAU, ("Fakaofo",))
    logprobs = {"content": [{"token": " Tok", "logprob": -0.3}, {"token": "elau", "logprob": -0.1}]}
    data = label([q], [Generation("q1", "k", text="Tokelau", logprobs=logprobs)], MatchGrader())
    assert data.features["question_overlap"].tolist() == [1.0]
    assert data.features["answer_min_logprob"].tolist() == [-0.3]
    assert data.features["min_logprob"].tolist() == [-0.3]
    assert data.correct.tolist() == [0.0]
