"""``abstain eval`` of a multi-claim set: every sentence graded, with the verdict the
proxy gave it, and the report.

:func:`evaluate` grades the answers of a multi-claim set sentence by sentence
(:mod:`proxy.evaluation.claims` labels them): answered directly, each sentence gets the
raw scores; through the proxy, each gets the confidence and decision of the verdict's
``sentences``, at the offsets of the text the client received. The report is the usual
one (:class:`~proxy.evaluation.reports.EvalReport`) with a sentence a row, plus the share
of right sentences kept and wrong ones withheld per threshold.

Pure of the web framework: numpy and the evaluation modules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from proxy.confidence import selective
from proxy.confidence.features import LOGPROB_SCORES
from proxy.evaluation.claims import (
    ClaimStats,
    SentenceLabel,
    count_claims,
    label_all,
    label_sentences,
    raw_text,
    sentence_scores,
)
from proxy.evaluation.datasets import Question
from proxy.evaluation.evaluate import confidence_metrics
from proxy.evaluation.grading import Grader
from proxy.evaluation.prompts import Template
from proxy.evaluation.reports import EvalReport, table_rows
from proxy.evaluation.runner import Generation
from proxy.sentences import Segment, split


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else None


def _verdict_parts(gen: Generation) -> list[Mapping[str, Any]] | None:
    parts = (gen.abstention or {}).get("sentences")
    if not isinstance(parts, list):
        return None
    return [p for p in parts if isinstance(p, dict) and p.get("kind") != "code"]


def judged_by_proxy(
    question: Question,
    gen: Generation,
    grader: Grader,
    stats: ClaimStats,
) -> tuple[list[SentenceLabel], bool]:
    """The sentences of an answer that came through the proxy, with its verdicts; and
    whether they were withheld (their text is not in the response, so not gradable).

    The proxy's sentence offsets are offsets into the text the client got; with
    ``action: annotate`` (``abstain eval --policy``) that is the model's text. An answer
    judged whole (no sentence verdicts) gets its sentences from the splitter, each with
    the answer's confidence: that is what the client was told about each of them. The
    raw scores are recomputed from the logprobs the response kept, as the proxy scores
    them, for the raw scores' AUROC beside the proxy's confidence.
    """
    verdict = gen.abstention or {}
    text = raw_text(gen)
    parts = _verdict_parts(gen)
    if parts is None:
        stats.judged_whole += 1
        segments = split(text)
        labels = label_sentences(question, text, segments, grader)
        p = _number(verdict.get("confidence"))
        decision = verdict.get("decision")
        return [_with(lab, p, decision) for lab in labels], False
    withheld = verdict.get("decision") == "abstain" or any(
        p.get("decision") == "abstain" for p in parts
    )
    if withheld:
        labels = [
            SentenceLabel(question.id, -1, -1, "", (), "none", False, {}, None, None) for _ in parts
        ]
        return [
            _with(lab, _number(p.get("confidence")), p.get("decision"))
            for lab, p in zip(labels, parts, strict=True)
        ], True
    segments = [
        Segment(int(p["start"]), int(p["end"]), "line" if p.get("kind") == "line" else "sentence")
        for p in parts
    ]
    own = split(text)
    recomputed = sentence_scores(gen, own, text)
    by_span = {(s.start, s.end): sc for s, sc in zip(own, recomputed or [], strict=False)}
    scores = [by_span.get((s.start, s.end), {}) for s in segments]
    labels = label_sentences(question, text, segments, grader, scores)
    return [
        _with(lab, _number(p.get("confidence")), p.get("decision"))
        for lab, p in zip(labels, parts, strict=True)
    ], False


def _with(lab: SentenceLabel, confidence: float | None, decision: Any) -> SentenceLabel:
    return SentenceLabel(
        lab.question,
        lab.start,
        lab.end,
        lab.text,
        lab.claims,
        lab.how,
        lab.correct,
        lab.scores,
        confidence,
        decision if isinstance(decision, str) else None,
    )


def kept_and_withheld(
    confidence: np.ndarray, correct: np.ndarray, t: float
) -> tuple[float, float, int, int]:
    """(share of right sentences kept, share of wrong ones withheld, #right, #wrong) at t."""
    kept = selective.answered_at(confidence, t)
    right, wrong = correct == 1, correct == 0
    n_right, n_wrong = int(right.sum()), int(wrong.sum())
    share_kept = float(np.mean(kept[right])) if n_right else float("nan")
    share_withheld = float(np.mean(~kept[wrong])) if n_wrong else float("nan")
    return share_kept, share_withheld, n_right, n_wrong


def evaluate(
    questions: Sequence[Question],
    generations: Sequence[Generation],
    grader: Grader,
    template: Template,
    *,
    mode: str,
    model: str,
    dataset: str,
    thresholds: Sequence[float],
    target_error: float = 0.25,
    ece_bins: int = 10,
    meta: Mapping[str, Any] | None = None,
) -> tuple[EvalReport, dict[str, np.ndarray], list[SentenceLabel]]:
    """The sentence-level report (every row a sentence), the chart arrays, the labels."""
    by_id = {q.id: q for q in questions}
    stats = ClaimStats(questions=len(generations))
    labels: list[SentenceLabel] = []
    hidden: list[bool] = []
    if mode == "direct":
        labels, stats = label_all(questions, generations, grader, template, model)
        hidden = [False] * len(labels)
    else:
        if not any(g.abstention for g in generations if g.error is None):
            raise ValueError(
                "no response carried an 'abstention' object: is the base URL a proxy? "
                "(use --direct to evaluate a model on its own)"
            )
        for gen in generations:
            if gen.error is not None:
                stats.failed += 1
                continue
            q = by_id[gen.id]
            answer_labels, not_shown = judged_by_proxy(q, gen, grader, stats)
            stats.truncated += gen.finish_reason == "length"
            if not not_shown:
                count_claims(stats, q, answer_labels)
            labels += answer_labels
            hidden += [not_shown] * len(answer_labels)
    correct = np.array([1.0 if lab.correct else 0.0 for lab in labels], dtype=np.float64)
    metrics: dict[str, float | int | None] = {
        "questions": stats.questions,
        "failed requests": stats.failed,
        "sentences": len(labels),
        "right sentences": int(correct.sum()),
        "accuracy (always answer)": float(np.mean(correct)) if labels else None,
        "claims asked": stats.claims,
        "claims stated": stats.claims_stated,
        "sentences stating no claim asked for (graded wrong)": stats.unmatched,
        "sentences stating several claims": stats.several,
        "sentences assigned by order": stats.by_order,
        "answers of one sentence per claim": stats.one_per_claim,
        "answers cut by the token budget": stats.truncated,
    }
    for name in LOGPROB_SCORES:
        raw = np.array([lab.scores.get(name, np.nan) for lab in labels], dtype=np.float64)
        if raw.size and not np.isnan(raw).all():
            metrics[f"AUROC of raw {name}"] = selective.auroc(raw, correct)
    arrays = {"correct": correct}
    confidence = None
    withheld = np.array(hidden, dtype=bool)
    if mode != "direct":
        confidence = np.array(
            [np.nan if lab.confidence is None else lab.confidence for lab in labels],
            dtype=np.float64,
        )
        arrays["confidence"] = confidence
        metrics.update(confidence_metrics(confidence, correct, ece_bins, target_error))
        metrics.update(
            {
                "sentences without a confidence": int(np.sum(np.isnan(confidence))),
                "answers judged whole": stats.judged_whole,
                "withheld sentences (not gradable)": int(withheld.sum()),
            }
        )
        if not withheld.any():
            for t in thresholds:
                if t > 0:
                    kept, held, _, _ = kept_and_withheld(confidence, correct, t)
                    metrics[f"t={t:g}: right sentences kept"] = kept
                    metrics[f"t={t:g}: wrong sentences withheld"] = held
    alone, proxy = table_rows(correct, thresholds, confidence, withheld)
    report = EvalReport(
        dataset=dataset,
        model=model,
        mode=mode,
        n=len(labels),
        thresholds=tuple(thresholds),
        alone=alone,
        proxy=proxy,
        metrics=metrics,
        meta={**(meta or {}), "granularity": "sentence"},
        unit="sentences",
    )
    return report, arrays, labels


def answer_records(
    questions: Sequence[Question],
    generations: Sequence[Generation],
    labels: Sequence[SentenceLabel],
) -> list[dict[str, Any]]:
    """One line per question for ``answers.jsonl``: the answer and each sentence's label."""
    by_question: dict[str, list[SentenceLabel]] = {}
    for lab in labels:
        by_question.setdefault(lab.question, []).append(lab)
    by_id = {q.id: q for q in questions}
    out = []
    for g in generations:
        q = by_id[g.id]
        out.append(
            {
                "id": g.id,
                "question": q.question,
                "claims": [{"about": c.about, "answers": list(c.answers)} for c in q.claims],
                "answer": g.text,
                "sentences": [
                    {
                        "text": lab.text,
                        "claims": list(lab.claims),
                        "how": lab.how,
                        "correct": lab.correct,
                        "confidence": lab.confidence,
                        "decision": lab.decision,
                    }
                    for lab in by_question.get(g.id, [])
                ],
                "error": g.error,
            }
        )
    return out
