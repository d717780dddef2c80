"""Reading the proxy's decision log back as labelled scores, for ``calibrate --from-log``.

The log is JSON Lines of :class:`~proxy.decision_records.DecisionRecord` and
:class:`~proxy.decision_records.FeedbackRecord`, joined on ``(id, choice)``.

A decision without feedback is unlabelled and left out; when feedback for one answer
arrives more than once, the last word counts (a user may correct a hasty click).

``sentences=True`` reads the labels of single sentences instead: feedback that names a
``sentence`` is joined, on ``(id, choice, sentence)``, to that part's raw scores in the
decision's ``sentence_scores``; feedback on whole answers is then counted and left out,
as sentence feedback is when reading answers (an answer is right only when all its
sentences are, which labels none of them). Lines
that are not valid JSON are counted and skipped rather than fatal: a log written by a
process that was killed mid-line must still be usable.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy.decision_records import DecisionRecord, FeedbackRecord, parse_record


@dataclass
class LoggedLabels:
    """Scores of the answers that received feedback, and what happened to the rest."""

    features: dict[str, npt.NDArray[np.float64]]
    correct: npt.NDArray[np.float64]
    #: each row's response and choice, so that one answer's sentences share a fold
    groups: npt.NDArray[np.object_] | None = None
    models: Counter[str] = field(default_factory=Counter)
    methods: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)


def parse_log(
    lines: Iterable[str], *, model: str | None = None, sentences: bool = False
) -> LoggedLabels:
    """Join decisions with their feedback; only ``model``'s decisions when given; the
    labels of single sentences with ``sentences``."""
    counts: Counter[str] = Counter()
    decisions: dict[tuple[str, int], DecisionRecord] = {}
    verdicts: dict[tuple[str, int, int | None], bool] = {}
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            counts["malformed"] += 1
            continue
        parsed = parse_record(record)
        if isinstance(parsed, DecisionRecord):
            if model is not None and parsed.model != model:
                counts["other_model"] += 1
                continue
            decisions[(parsed.id, parsed.choice)] = parsed
        elif isinstance(parsed, FeedbackRecord):
            if (parsed.sentence is not None) != sentences:
                # A sentence's label says nothing of the whole answer, nor the reverse.
                counts["answer_feedback" if sentences else "sentence_feedback"] += 1
                continue
            verdicts[(parsed.id, parsed.choice, parsed.sentence)] = parsed.correct
        else:
            counts["malformed"] += 1
    counts["decisions"] = len(decisions)
    counts["feedback"] = len(verdicts)
    counts["feedback_without_decision"] = 0  # reported even when there is none
    # (label key, the decision, the scores labelled): the answer's, or one part's.
    joined: list[tuple[tuple[str, int, int | None], DecisionRecord, Mapping[str, Any]]] = []
    for key in verdicts:
        record = decisions.get(key[:2])
        if record is None:
            counts["feedback_without_decision"] += 1
        elif key[2] is None:
            joined.append((key, record, record.scores))
        elif record.sentence_scores is not None and key[2] < len(record.sentence_scores):
            joined.append((key, record, record.sentence_scores[key[2]]))
        else:
            counts["feedback_without_sentence"] += 1
    counts["labelled"] = len(joined)
    counts["unlabelled"] = len(decisions) - len({key[:2] for key, _, _ in joined})
    names = sorted({n for _, _, scores in joined for n in scores})
    features = {
        n: np.array([_num(scores.get(n)) for _, _, scores in joined], dtype=np.float64)
        for n in names
    }
    correct = np.array([1.0 if verdicts[key] else 0.0 for key, _, _ in joined])
    groups = np.array([f"{key[0]}#{key[1]}" for key, _, _ in joined], dtype=object)
    models = Counter(record.model for _, record, _ in joined)
    methods = Counter(record.method for _, record, _ in joined)
    return LoggedLabels(features, correct, groups, models, methods, counts)


def _num(value: Any) -> float:
    return (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else np.nan
    )


def read_log(
    path: str | Path, *, model: str | None = None, sentences: bool = False
) -> LoggedLabels:
    """:func:`parse_log` on a file; ``OSError`` propagates with the path in it."""
    with Path(path).open(encoding="utf-8") as f:
        return parse_log(f, model=model, sentences=sentences)
