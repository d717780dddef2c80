"""The vocabulary of scores: every confidence input the proxy computes, in one table.

A *score* is a number about one answer, oriented so that higher means more confident.
Each :class:`Score` says what it is computed from (the answer's token logprobs, their
top-k alternatives, or the extra samples), and how it is put on the [0, 1] scale a
threshold lives on when no calibration is loaded. The policy check, the judge, fitting
and the benchmarks all read these names from here, so a new score is added in one
place (and computed in :mod:`.logprobs`, :mod:`.shift_scores` or :mod:`.consistency`).

Pure: standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

#: What a score is computed from: "text" scores read the answer's token texts with their
#: logprobs, and the request's question (:mod:`.shift_scores`).
Source = Literal["logprobs", "samples", "text"]


def _exp(value: float) -> float:
    # exp of a logprob is a token probability; exp of minus an entropy is the inverse
    # of the effective number of choices (1 when there is only one).
    return min(1.0, max(0.0, math.exp(min(value, 0.0))))


def _clip(value: float) -> float:
    return min(1.0, max(0.0, value))


def _logistic(value: float) -> float:
    # A margin between two logprobs: the chosen token's share of a two-way race.
    return 1.0 / (1.0 + math.exp(-max(-35.0, min(35.0, value))))


@dataclass(frozen=True, slots=True)
class Score:
    """One confidence input: its name, what it reads, and its uncalibrated 0-1 map."""

    name: str
    source: Source
    #: computed from each token's top-k alternatives, absent when ``top_logprobs`` is 0
    needs_top_k: bool
    #: the [0, 1] value used when no calibration is loaded (not a probability)
    to_unit: Callable[[float], float]
    #: a rule may judge on it alone; False for inputs that only inform a logistic model
    rankable: bool = True


SCORES: Mapping[str, Score] = {
    s.name: s
    for s in (
        Score("mean_logprob", "logprobs", needs_top_k=False, to_unit=_exp),
        Score("min_logprob", "logprobs", needs_top_k=False, to_unit=_exp),
        Score("sequence_prob", "logprobs", needs_top_k=False, to_unit=_clip),
        Score("mean_entropy", "logprobs", needs_top_k=True, to_unit=_exp),
        Score("first_logprob", "logprobs", needs_top_k=False, to_unit=_exp),
        Score("first_margin", "logprobs", needs_top_k=True, to_unit=_logistic),
        # log of the token count: ranks nothing alone, but tells a logistic model how
        # far to trust a mean over the tokens.
        Score("log_length", "logprobs", needs_top_k=False, to_unit=_clip, rankable=False),
        # The answer's words against the question's (issue 12.4): how much is copied, and
        # the least likely token of what the answer adds. Inputs of a logistic model
        # only; the proxy reads token texts and the question only for a calibration
        # that uses them.
        Score("question_overlap", "text", needs_top_k=False, to_unit=_clip, rankable=False),
        Score("answer_min_logprob", "text", needs_top_k=False, to_unit=_exp, rankable=False),
        Score("agreement", "samples", needs_top_k=False, to_unit=_clip),
        Score("agreement_smoothed", "samples", needs_top_k=False, to_unit=_clip),
        Score("majority_share", "samples", needs_top_k=False, to_unit=_clip),
        Score("semantic_entropy", "samples", needs_top_k=False, to_unit=_exp),
    )
}


def _names(source: Source) -> tuple[str, ...]:
    return tuple(s.name for s in SCORES.values() if s.source == source and s.rankable)


#: Scores a rule may name as ``score`` (from token logprobs).
LOGPROB_SCORES = _names("logprobs")
#: Scores a rule may name as ``consistency_score`` (from agreement among samples).
AGREEMENT_SCORES = _names("samples")

#: Inputs computed from the answer's token texts and the question (:mod:`.shift_scores`).
TEXT_SCORES = tuple(s.name for s in SCORES.values() if s.source == "text")

#: Inputs of the logistic calibration over logprob scores: every score that adds
#: information (sequence_prob is nearly a function of mean_logprob and the length) plus
#: the answer's length.
LOGISTIC_FEATURES = (
    "mean_logprob",
    "min_logprob",
    "mean_entropy",
    "first_logprob",
    "first_margin",
    "log_length",
)
#: The logistic calibration's inputs for sentences (granularity sentence): those of an
#: answer less the first token's two. A sentence's first token is its lead-in ("Its",
#: "It"), nearly always certain, so a model fitted on it learns a weight from a sliver of
#: variance and swings wildly on the rare sentence whose first token is not certain.
SENTENCE_LOGISTIC_FEATURES = ("mean_logprob", "min_logprob", "mean_entropy", "log_length")
#: The hybrid logistic model's inputs, in the order its weights are stored.
HYBRID_LOGPROB_FEATURES = ("mean_logprob", "min_logprob", "mean_entropy")
HYBRID_AGREEMENT_FEATURES = ("agreement", "semantic_entropy")
HYBRID_FEATURES = HYBRID_LOGPROB_FEATURES + HYBRID_AGREEMENT_FEATURES


def uncalibrated(name: str, value: float | None) -> float | None:
    """A raw score on the [0, 1] scale, for rules without a calibration file.

    Not a calibrated probability (verdicts say ``calibrated: false``); it only puts every
    score on the scale a threshold lives on. Unknown names pass through clipped.
    """
    if value is None:
        return None
    score = SCORES.get(name)
    return score.to_unit(value) if score is not None else _clip(value)


_TEXT = frozenset(TEXT_SCORES)


def reads_text(names: Iterable[str]) -> bool:
    """Whether any of ``names`` is a text score (the answer's token texts, the question).

    On every request's path (the proxy asks it of the rule's calibration): a set test.
    """
    return not _TEXT.isdisjoint(names)


def needing_top_k(names: Iterable[str]) -> list[str]:
    """The names, among ``names``, of scores that need the top-k alternatives."""
    return sorted({n for n in names if n in SCORES and SCORES[n].needs_top_k})
