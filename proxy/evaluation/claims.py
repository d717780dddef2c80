"""Multi-claim answers judged sentence by sentence: which claim a sentence states, whether
it is right, and the scores the proxy gives it.

A multi-claim question (:class:`~proxy.evaluation.datasets.Question` with ``claims``)
asks for several facts, "Tell me about Ghana: its capital, its currency and its
continent.", and expects an answer of several sentences. Each sentence is one labelled
example, as the proxy judges it with ``granularity: sentence``:

**Splitting** is the proxy's own (:func:`proxy.sentences.split`); code blocks are not
judged and not labelled.

**Which claim a sentence states** (:func:`assign`), on the normalised text
(:func:`proxy.evaluation.grading.normalize`), whole words:

1. by keyword: every claim one of whose keywords the sentence holds ("capital";
   "currency"; "continent"; "symbol"; "atomic number" or "number"; "discovered",
   "discoverer" or "discovery"; a dataset may name its own per claim, and an unknown
   ``about`` is its own keyword, underscores read as spaces);
2. a sentence with no keyword but a *weak* one ("in", "located": "It is in Africa.")
   states the continent, provided the question asks for one;
3. a sentence with neither takes, in text order, the first claim (in the question's
   order) that no sentence has stated: "Accra. The cedi. Africa." is read in order;
4. what is left states no claim asked for.

**Grading** (:func:`grade`): a sentence is right when the grader (the same one as for
single answers, :mod:`proxy.evaluation.grading`) accepts it for *every* claim it states
("Its capital is Accra and its currency is the euro." is half wrong, so not right). A
sentence that states no claim asked for is graded wrong and counted: a fact nobody asked
for is not a right answer, and the proxy judges it like any other sentence, so leaving
it out would flatter the calibration. Two sentences may state the same claim (a base
model repeats itself); each is graded against it.

**Scores** (:func:`sentence_scores`) are those of the live path, computed by the same
functions: the tokens of the choice's text (:func:`proxy.confidence.logprobs.token_texts`)
and :func:`proxy.confidence.spans.segment_scores` over every token of the sentence
(``context="all"``, the proxy's rule). For the comparison only, the rule that reads only
the claim's tokens: ``context="prompt"`` (the prompt's words given, as
:func:`proxy.confidence.spans.context_words` of :func:`proxy.protocol.prompt_texts` of
the very request sent), ``"question"`` (only the question's words given, not the
few-shot frame's) and ``"none"`` (function words and punctuation given). A calibration
for the proxy must be fitted on ``all``.

Pure of the web framework: numpy and the evaluation modules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from proxy.confidence.logprobs import token_logprobs, token_texts
from proxy.confidence.spans import context_words, segment_scores
from proxy.evaluation.calibrate import Labelled
from proxy.evaluation.datasets import Claim, Question
from proxy.evaluation.grading import Grader, normalize
from proxy.evaluation.prompts import Template
from proxy.evaluation.runner import Generation
from proxy.protocol import Kind, prompt_texts
from proxy.sentences import Segment, split

#: The words that say a sentence states a claim, by the claim's ``about``.
KEYWORDS: Mapping[str, tuple[str, ...]] = {
    "capital": ("capital",),
    "currency": ("currency", "currencies"),
    "continent": ("continent",),
    "symbol": ("symbol",),
    "atomic_number": ("atomic number", "number"),
    "discoverer": ("discovered", "discoverer", "discovery"),
}
#: Words that say so only when no claim's keyword is in the sentence.
WEAK_KEYWORDS: Mapping[str, tuple[str, ...]] = {"continent": ("in", "located")}

#: How a sentence got its claims.
How = Literal["keyword", "weak", "order", "none"]
#: Which of a sentence's tokens are scored (see the module docstring).
Context = Literal["prompt", "question", "none", "all"]


def keywords(claim: Claim) -> tuple[str, ...]:
    """The claim's keywords, normalised like the sentences they are looked for in."""
    words = claim.keywords or KEYWORDS.get(claim.about) or (claim.about.replace("_", " "),)
    return tuple(w for w in (normalize(k) for k in words) if w)


def _holds(padded: str, words: Sequence[str]) -> bool:
    return any(f" {w} " in padded for w in words)


def assign(sentences: Sequence[str], claims: Sequence[Claim]) -> list[tuple[tuple[int, ...], How]]:
    """For each sentence, the indexes of the claims it states and how that was decided."""
    padded = [f" {normalize(s)} " for s in sentences]
    out: list[tuple[tuple[int, ...], How]] = []
    for text in padded:
        strong = tuple(i for i, c in enumerate(claims) if _holds(text, keywords(c)))
        if strong:
            out.append((strong, "keyword"))
            continue
        weak = [i for i, c in enumerate(claims) if _holds(text, WEAK_KEYWORDS.get(c.about, ()))]
        out.append(((weak[0],), "weak") if weak else ((), "none"))
    stated = {i for claimed, _ in out for i in claimed}
    free = [i for i in range(len(claims)) if i not in stated]
    for k, (claimed, _) in enumerate(out):
        if not claimed and free:
            out[k] = ((free.pop(0),), "order")
    return out


def grade(sentence: str, claims: Sequence[Claim], grader: Grader) -> bool:
    """Right iff the sentence states at least one claim and is right for each it states."""
    return bool(claims) and all(grader(sentence, c.answers) for c in claims)


@dataclass(frozen=True)
class SentenceLabel:
    """One judged sentence of one answer: where it is, what it states, whether it is right."""

    question: str  # the question's id
    start: int
    end: int
    text: str
    claims: tuple[str, ...]  # the ``about`` of each claim it states (empty: none asked for)
    how: How
    correct: bool
    scores: Mapping[str, float] = field(default_factory=dict)
    #: P(correct) the proxy gave it (proxy modes), its decision
    confidence: float | None = None
    decision: str | None = None


def label_sentences(
    question: Question,
    text: str,
    segments: Sequence[Segment],
    grader: Grader,
    scores: Sequence[Mapping[str, float]] | None = None,
) -> list[SentenceLabel]:
    """The judged segments of ``text``, each assigned to its claims and graded."""
    judged = [(k, s) for k, s in enumerate(segments) if s.judged]
    texts = [text[s.start : s.end] for _, s in judged]
    out = []
    for (k, segment), sentence, (claimed, how) in zip(
        judged, texts, assign(texts, question.claims), strict=True
    ):
        stated = [question.claims[i] for i in claimed]
        out.append(
            SentenceLabel(
                question=question.id,
                start=segment.start,
                end=segment.end,
                text=sentence,
                claims=tuple(c.about for c in stated),
                how=how,
                correct=grade(sentence, stated, grader),
                scores=dict(scores[k]) if scores is not None else {},
            )
        )
    return out


def raw_text(gen: Generation) -> str:
    """The choice's text as received; for caches written before it was kept, the text its
    tokens spell (or the trimmed answer when they carry no texts)."""
    if gen.raw_text is not None:
        return gen.raw_text
    tokens = token_texts(gen.logprobs)
    return "".join(tokens) if tokens is not None else gen.text


def prompt_context(template: Template, question: Question, model: str) -> frozenset[str]:
    """The words the live path reads from this question's request as given."""
    kind: Kind = "completions" if template.endpoint == "completions" else "chat"
    return context_words(prompt_texts(kind, template.body(question.question, model)))


def sentence_scores(
    gen: Generation, segments: Sequence[Segment], text: str, context: frozenset[str] | None = None
) -> list[dict[str, float]] | None:
    """Each segment's scores as the proxy computes them (None: the tokens do not spell
    the text, and the proxy would judge the answer whole)."""
    tokens = token_texts(gen.logprobs)
    lps, tops = token_logprobs(gen.logprobs)
    if tokens is None or len(tokens) != len(lps):
        return None
    # As proxy.evidence keeps them: top-k lists only when every token has one.
    tops = tops if len(tops) == len(lps) else []
    return segment_scores(segments, text, tokens, lps, tops, context)


def _context_for(mode: Context, prompt: frozenset[str], question: str) -> frozenset[str] | None:
    """The words given under ``mode``; None (the proxy's rule): every token is read."""
    if mode == "prompt":
        return prompt
    if mode == "question":
        return context_words([question])
    if mode == "none":
        return frozenset()
    return None


@dataclass
class ClaimStats:
    """What the sentences of a set's answers were, for the reports."""

    questions: int = 0
    failed: int = 0  # requests that failed
    claims: int = 0  # claims asked for, over the answered questions
    claims_stated: int = 0  # ... stated by at least one sentence
    sentences: int = 0  # judged sentences
    right: int = 0
    unmatched: int = 0  # sentences stating no claim asked for (graded wrong)
    several: int = 0  # sentences stating more than one claim
    by_order: int = 0  # sentences given their claim by order (no keyword)
    repeated: int = 0  # sentences stating a claim an earlier sentence stated
    one_per_claim: int = 0  # answers of exactly one sentence per claim, each claim once
    truncated: int = 0  # answers cut by the token budget (finish_reason length)
    judged_whole: int = 0  # answers the proxy could not split into scored sentences

    def lines(self) -> list[str]:
        asked = max(self.questions - self.failed, 1)
        return [
            f"{self.sentences} sentences in {self.questions - self.failed} answers "
            f"({self.failed} failed), {self.right} right",
            f"answers of one sentence per claim: {self.one_per_claim} "
            f"({self.one_per_claim / asked:.0%}); cut by the token budget: {self.truncated}",
            f"claims stated: {self.claims_stated} of {self.claims}; sentences stating no "
            f"claim asked for: {self.unmatched} (graded wrong); stating several: "
            f"{self.several}; assigned by order: {self.by_order}; repeating a claim: "
            f"{self.repeated}",
            *(
                [f"answers judged whole (tokens not aligned): {self.judged_whole}"]
                if self.judged_whole
                else []
            ),
        ]

    def to_dict(self) -> dict[str, int]:
        return dict(vars(self))


def count_claims(stats: ClaimStats, question: Question, labels: Sequence[SentenceLabel]) -> None:
    stats.claims += len(question.claims)
    seen: set[str] = set()
    for lab in labels:
        stats.sentences += 1
        stats.right += lab.correct
        stats.unmatched += not lab.claims
        stats.several += len(lab.claims) > 1
        stats.by_order += lab.how == "order"
        stats.repeated += bool(seen & set(lab.claims))
        seen.update(lab.claims)
    stats.claims_stated += len(seen)
    abouts = [lab.claims for lab in labels]
    if len(labels) == len(question.claims) and sorted(a for c in abouts for a in c) == sorted(
        c.about for c in question.claims
    ):
        stats.one_per_claim += all(len(c) == 1 for c in abouts)


def label_all(
    questions: Sequence[Question],
    generations: Sequence[Generation],
    grader: Grader,
    template: Template,
    model: str,
    *,
    context: Context = "all",
) -> tuple[list[SentenceLabel], ClaimStats]:
    """Every judged sentence of every answered question, with the proxy's scores."""
    by_id = {q.id: q for q in questions}
    stats = ClaimStats(questions=len(generations))
    out: list[SentenceLabel] = []
    for gen in generations:
        if gen.error is not None:
            stats.failed += 1
            continue
        q = by_id[gen.id]
        text = raw_text(gen)
        segments = split(text)
        words = _context_for(context, prompt_context(template, q, model), q.question)
        scores = sentence_scores(gen, segments, text, words)
        stats.judged_whole += scores is None and any(s.judged for s in segments)
        stats.truncated += gen.finish_reason == "length"
        labels = label_sentences(q, text, segments, grader, scores)
        count_claims(stats, q, labels)
        out += labels
    return out, stats


def labelled(labels: Sequence[SentenceLabel]) -> Labelled:
    """One row per sentence: its scores (NaN where missing) and 0/1 correctness, as
    :func:`proxy.evaluation.calibrate.fit_method` reads them."""
    names = sorted({n for lab in labels for n in lab.scores})
    columns = {
        n: np.array([lab.scores.get(n, np.nan) for lab in labels], dtype=np.float64) for n in names
    }
    correct = np.array([1.0 if lab.correct else 0.0 for lab in labels], dtype=np.float64)
    # A question's sentences are one answer's: cross-validation keeps them together.
    groups = np.array([lab.question for lab in labels], dtype=object)
    return Labelled(columns, correct, groups=groups)


def label(
    questions: Sequence[Question],
    generations: Sequence[Generation],
    grader: Grader,
    template: Template,
    model: str,
    *,
    context: Context = "all",
) -> tuple[Labelled, ClaimStats]:
    """The labelled sentences of a multi-claim set, ready to fit (see :func:`label_all`)."""
    labels, stats = label_all(questions, generations, grader, template, model, context=context)
    data = labelled(labels)
    data.failed = stats.failed
    return data, stats


# -- abstain eval ----------------------------------------------------------------------
