"""Reading the proxy's decision log back as labelled scores, for ``calibrate --from-log``.

The log is JSON Lines with two record types joined on ``(id, choice)``::

    {"type": "decision", "id": "cmpl-1", "choice": 0, "model": "m", "scores": {...}, ...}
    {"type": "feedback", "id": "cmpl-1", "choice": 0, "correct": true}

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


@dataclass
class LoggedLabels:
    """Scores of the answers that received feedback, and what happened to the rest."""

    features: dict[str, npt.NDArray[np.float64]]
    correct: npt.NDArray[np.float64]
    models: Counter[str] = field(default_factory=Counter)
    methods: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)


def _key(record: dict[str, Any]) -> tuple[str, int] | None:
    rid, choice = record.get("id"), record.get("choice", 0)
    if not isinstance(rid, str) or not isinstance(choice, int):
        return None
    return rid, choice


def parse_log(lines: Iterable[str], *, model: str | None = None) -> LoggedLabels:
    """Join decisions with their feedback; only ``model``'s decisions when given."""
    counts: Counter[str] = Counter()
    decisions: dict[tuple[str, int], dict[str, Any]] = {}
    verdicts: dict[tuple[str, int], bool] = {}
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            counts["malformed"] += 1
            continue
        key = _key(record) if isinstance(record, dict) else None
        if key is None:
            counts["malformed"] += 1
        elif record.get("type") == "decision" and isinstance(record.get("scores"), dict):
            if model is not None and record.get("model") != model:
                counts["other_model"] += 1
                continue
            decisions[key] = record
        elif record.get("type") == "feedback" and isinstance(record.get("correct"), bool):
            verdicts[key] = record["correct"]
        else:
            counts["malformed"] += 1
    counts["decisions"] = len(decisions)
    counts["feedback"] = len(verdicts)
    joined = [k for k in decisions if k in verdicts]
    counts["labelled"] = len(joined)
    counts["unlabelled"] = len(decisions) - len(joined)
    counts["feedback_without_decision"] = sum(1 for k in verdicts if k not in decisions)
    names = sorted({n for k in joined for n in decisions[k]["scores"]})
    features = {
        n: np.array([_num(decisions[k]["scores"].get(n)) for k in joined], dtype=np.float64)
        for n in names
    }
    correct = np.array([1.0 if verdicts[k] else 0.0 for k in joined])
    models = Counter(str(decisions[k].get("model")) for k in joined)
    methods = Counter(str(decisions[k].get("method") or "logprobs") for k in joined)
    return LoggedLabels(features, correct, models, methods, counts)


def _num(value: Any) -> float:
    return (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else np.nan
    )


def read_log(path: str | Path, *, model: str | None = None) -> LoggedLabels:
    """:func:`parse_log` on a file; ``OSError`` propagates with the path in it."""
    with Path(path).open(encoding="utf-8") as f:
        return parse_log(f, model=model)
