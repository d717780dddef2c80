"""Reading the proxy's decision log back as labelled scores, for ``calibrate --from-log``.

The log is JSON Lines of :class:`~proxy.decision_records.DecisionRecord` and
:class:`~proxy.decision_records.FeedbackRecord`, joined on ``(id, choice)``.

A decision without feedback is unlabelled and left out; when feedback for one answer
arrives more than once, the last word counts (a user may correct a hasty click). Lines
that are not valid JSON are counted and skipped rather than fatal: a log written by a
process that was killed mid-line must still be usable.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
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
    models: Counter[str] = field(default_factory=Counter)
    methods: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)


def parse_log(lines: Iterable[str], *, model: str | None = None) -> LoggedLabels:
    """Join decisions with their feedback; only ``model``'s decisions when given."""
    counts: Counter[str] = Counter()
    decisions: dict[tuple[str, int], DecisionRecord] = {}
    verdicts: dict[tuple[str, int], bool] = {}
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
            if parsed.sentence is not None:
                # A sentence's label says nothing of the whole answer.
                counts["sentence_feedback"] += 1
                continue
            verdicts[(parsed.id, parsed.choice)] = parsed.correct
        else:
            counts["malformed"] += 1
    counts["decisions"] = len(decisions)
    counts["feedback"] = len(verdicts)
    joined = [k for k in decisions if k in verdicts]
    counts["labelled"] = len(joined)
    counts["unlabelled"] = len(decisions) - len(joined)
    counts["feedback_without_decision"] = sum(1 for k in verdicts if k not in decisions)
    names = sorted({n for k in joined for n in decisions[k].scores})
    features = {
        n: np.array([_num(decisions[k].scores.get(n)) for k in joined], dtype=np.float64)
        for n in names
    }
    correct = np.array([1.0 if verdicts[k] else 0.0 for k in joined])
    models = Counter(decisions[k].model for k in joined)
    methods = Counter(decisions[k].method for k in joined)
    return LoggedLabels(features, correct, models, methods, counts)


def _num(value: Any) -> float:
    return (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else np.nan
    )


def read_log(path: str | Path, *, model: str | None = None) -> LoggedLabels:
    """:func:`parse_log` on a file; ``OSError`` propagates with the path in it."""
    with Path(path).open(encoding="utf-8") as f:
        return parse_log(f, model=model)
