"""The ``abstain calibrate`` workflow: graded answers in, a calibration file out.

Answers (asked by :mod:`proxy.evaluation.runner`, with agreement features from
:mod:`proxy.evaluation.offline_samples` for the sampling methods, or read back from the proxy's
decision log) are turned into one array per raw score plus a right/wrong array; every
requested (score, calibrator) pair is judged on held-out folds by
:func:`proxy.confidence.fitting.select`; the best one, refitted on every answer, becomes
the file the proxy loads. The hybrid is one logistic model over logprob and agreement
features (:func:`fit_hybrid`). The file's ``metrics`` are the held-out (out-of-fold) ones,
never the in-sample fit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy.confidence.calibration import Calibration, Calibrator, Logistic
from proxy.confidence.drift import Reference, build_reference
from proxy.confidence.features import (
    AGREEMENT_SCORES,
    HYBRID_FEATURES,
    LOGISTIC_FEATURES,
    LOGPROB_SCORES,
)
from proxy.confidence.features import HYBRID_AGREEMENT_FEATURES as AGREEMENT_FEATURES
from proxy.confidence.features import HYBRID_LOGPROB_FEATURES as LOGPROB_FEATURES
from proxy.confidence.fitting import KINDS, Candidate, candidate, select
from proxy.evaluation.datasets import Question
from proxy.evaluation.grading import Grader
from proxy.evaluation.runner import Generation

Array = npt.NDArray[np.float64]


@dataclass
class Labelled:
    """Raw scores (NaN where an answer lacks one) and 0/1 correctness, row by row."""

    features: dict[str, Array]
    correct: Array
    failed: int = 0  # questions whose request failed (left out)
    #: rows that are parts of one answer share an id (sentences: the question's), so that
    #: cross-validation keeps them in one fold; None: every row its own answer
    groups: npt.NDArray[Any] | None = None

    @property
    def n(self) -> int:
        return int(self.correct.size)


def label(
    questions: Sequence[Question],
    generations: Sequence[Generation],
    grader: Grader,
    features: Mapping[str, Mapping[str, float]] | None = None,
) -> Labelled:
    """Grade every answered question and collect every score the proxy computes.

    Without ``features``, each answer's logprob scores and the scores of its token texts
    against its question (:mod:`proxy.confidence.shift_scores`; the question as the proxy
    reads it from the shipped templates' requests, which is the question's text).
    ``features`` (by question id) replaces them, for scores that need more than the
    answer (agreement with samples); an answer without an entry there is left out and
    counted as failed.
    """
    gold = {q.id: q.answers for q in questions}
    asked = {q.id: q.question for q in questions}
    ok = [g for g in generations if g.error is None and (features is None or g.id in features)]
    scores = [
        g.scores | g.text_scores(asked[g.id]) if features is None else features[g.id] for g in ok
    ]
    names = sorted({n for s in scores for n in s})
    columns = {n: np.array([s.get(n, np.nan) for s in scores], dtype=np.float64) for n in names}
    correct = np.array([1.0 if grader(g.text, gold[g.id]) else 0.0 for g in ok])
    return Labelled(columns, correct, failed=len(generations) - len(ok))


def build_calibration(
    best: Candidate,
    calibrator: Calibrator,
    *,
    method: str,
    model: str | None,
    fitted_on: Mapping[str, Any],
    folds: int,
    data: Labelled | None = None,
) -> Calibration:
    """The calibration file's content, with held-out metrics before and after fitting.

    With ``data`` (the answers fitted on), the file also records the reference
    distribution of the calibration's inputs over them (:mod:`proxy.confidence.drift`),
    which the proxy's drift monitor and out-of-distribution test compare live answers to.
    """
    metrics: dict[str, Any] = {
        **best.after.to_dict(),
        "held_out": True,
        "folds": folds,
        "before": best.before.to_dict(),
    }
    if best.features:
        metrics["features"] = list(best.features)
    calibration = Calibration(
        score=best.score,
        calibrator=calibrator,
        method=method,
        model=model,
        fitted_on={"date": datetime.now(UTC).strftime("%Y-%m-%d"), "n": best.n, **fitted_on},
        metrics=metrics,
    )
    if data is None:
        return calibration
    source = f"{fitted_on.get('dataset', 'the fitting data')}: the {best.n} answers fitted on"
    reference = fitted_reference(data, calibration.inputs, source=source)
    return dataclasses.replace(calibration, reference=reference)


def fitted_reference(data: Labelled, inputs: Sequence[str], *, source: str) -> Reference | None:
    """The reference distribution of ``inputs`` over the answers that have all of them.

    Those are the answers the calibration can judge (and was fitted on); None when there
    are none or an input is missing from ``data``.
    """
    if not inputs or any(n not in data.features for n in inputs):
        return None
    X = np.column_stack([data.features[n] for n in inputs])
    rows = ~np.isnan(X).any(axis=1)
    if not rows.any():
        return None
    columns = {n: data.features[n][rows].tolist() for n in inputs}
    return build_reference(columns, inputs, source=source)


def unfit_reason(data: Labelled, names: Sequence[str], folds: int) -> str | None:
    """Why ``names`` cannot be fitted on ``data`` with ``folds`` folds, or None if they can."""
    missing = [n for n in names if n not in data.features]
    if missing or not names:
        return f"no score {missing or list(names)} in the {data.n} labelled answers"
    X = np.column_stack([data.features[n] for n in names])
    y = data.correct[~np.isnan(X).any(axis=1)]
    if y.size < 2 * folds or len(np.unique(y)) < 2:
        return f"{y.size} labelled answers with {', '.join(names)}, {int(y.sum())} right"
    return None


def fit_hybrid(
    data: Labelled, *, folds: int, seed: int, ece_bins: int
) -> list[tuple[Candidate, Calibrator]]:
    """The hybrid logistic model first, then the same model on each half of its features.

    The halves are there to be printed beside it: they show what each kind of evidence
    adds, and a hybrid that does no better than a half says the samples (or the matcher)
    carry little the other half lacks.
    """
    return [
        candidate(
            "logistic",
            data.features,
            data.correct,
            names=names,
            folds=folds,
            seed=seed,
            ece_bins=ece_bins,
            groups=data.groups,
        )
        for names in (HYBRID_FEATURES, LOGPROB_FEATURES, AGREEMENT_FEATURES)
    ]


#: The scores each method's calibration chooses among (the hybrid has fixed inputs).
METHOD_SCORES = {"logprobs": LOGPROB_SCORES, "consistency": AGREEMENT_SCORES}


def fit_method(
    data: Labelled,
    method: str,
    *,
    score: str | None = None,
    kinds: Sequence[str] = KINDS,
    criterion: str = "brier",
    folds: int = 5,
    seed: int = 0,
    ece_bins: int = 10,
    extra_inputs: Sequence[str] = (),
    base_inputs: Sequence[str] | None = None,
) -> list[tuple[Candidate, Calibrator]]:
    """Candidates for ``method``'s calibration, the one to write first.

    ``hybrid`` (without ``score``) is :func:`fit_hybrid`; otherwise every (score,
    calibrator) pair, the scores being ``score`` or those of the method that ``data`` can
    fit, ranked by :func:`~proxy.confidence.fitting.select`. ``extra_inputs`` are added
    to the logistic candidate's (the text scores, ``abstain calibrate --text-scores``);
    ``base_inputs`` replace its default ones (sentences: ``SENTENCE_LOGISTIC_FEATURES``).
    ``ValueError`` says why nothing can be fitted.
    """
    if method == "hybrid" and not score:
        problem = unfit_reason(data, HYBRID_FEATURES, folds)
        if problem:
            raise ValueError(problem)
        return fit_hybrid(data, folds=folds, seed=seed, ece_bins=ece_bins)
    wanted = [score] if score else list(METHOD_SCORES.get(method, LOGPROB_SCORES))
    problems = {s: unfit_reason(data, [s], folds) for s in wanted}
    fittable = [s for s, problem in problems.items() if problem is None]
    if not fittable:
        raise ValueError(next(p for p in problems.values() if p))
    combined = logistic_inputs(data, method, fittable, extra_inputs, base_inputs)
    if score or unfit_reason(data, combined, folds):
        # One score alone makes the logistic model a Platt scaling: nothing to add.
        kinds = [k for k in kinds if k != "logistic"]
    return select(
        data.features,
        data.correct,
        scores=fittable,
        kinds=kinds,
        criterion=criterion,
        folds=folds,
        seed=seed,
        ece_bins=ece_bins,
        logistic_features=combined,
        groups=data.groups,
    )


def logistic_inputs(
    data: Labelled,
    method: str,
    fittable: Sequence[str],
    extra: Sequence[str] = (),
    base: Sequence[str] | None = None,
) -> list[str]:
    """The multi-score logistic candidate's inputs (plus ``extra``): those every scored
    answer has.

    A feature some answers lack (``first_margin`` without top-k logprobs) would leave those
    answers without a P(correct) in the proxy, and would judge the candidate on fewer rows
    than its rivals; it is dropped instead.
    """
    if base is None:
        base = LOGISTIC_FEATURES if method == "logprobs" else fittable
    wanted = [*base, *extra]
    scored = ~np.isnan(data.features[fittable[0]])
    return [
        f for f in wanted if f in data.features and not np.isnan(data.features[f][scored]).any()
    ]


def hybrid_warning(calibrator: Logistic) -> str | None:
    """A warning when more agreement among samples would *lower* the hybrid's P(correct)."""
    # The agreement features rise together (more agreement, less entropy), so their
    # weights are judged together: collinear features may split one effect into a
    # positive and a negative part, which is harmless while the sum stays positive.
    pairs = zip(calibrator.features, calibrator.weights, strict=True)
    total = sum(w for n, w in pairs if n in AGREEMENT_FEATURES)
    if total > 0:
        return None
    return (
        f"the agreement features' weights sum to {total:+.2f}: with the logprob features "
        "fixed, agreeing samples lower P(correct). The matcher may be splitting answers "
        "that state the same thing (a full sentence against a short answer); try "
        "--matcher embedding"
    )


def weights_line(calibrator: Logistic) -> str:
    """A logistic model's weights on standardised features, comparable with each other."""
    pairs = zip(calibrator.features, calibrator.weights, strict=True)
    return "weights (standardised): " + ", ".join(f"{n} {w:+.2f}" for n, w in pairs)


def ranking_table(ranked: Sequence[Candidate], criterion: str | None) -> str:
    """Every candidate's held-out metrics before → after calibration, best first.

    ``criterion=None``: the rows are in a fixed order, the first the one written (hybrid).
    """
    names = [c.score if not c.features else "+".join(c.features) for c in ranked]
    width = max([14, *map(len, names)])
    head = (
        f"{'score':<{width}} {'calibrator':<10} {'n':>5}  {'AUROC':>13}  {'ECE':>13}  "
        f"{'Brier':>13}  {'log loss':>13}"
    )
    lines = [head, "-" * len(head)]
    for c, name in zip(ranked, names, strict=True):

        def pair(metric: str, c: Candidate = c) -> str:
            return f"{getattr(c.before, metric):6.3f}→{getattr(c.after, metric):6.3f}"

        lines.append(
            f"{name:<{width}} {c.kind:<10} {c.n:>5}  {pair('auroc')}  {pair('ece')}  "
            f"{pair('brier')}  {pair('log_loss')}"
        )
    first = ranked[0].after.ece_bins if ranked else 0
    lines.append(
        f"held-out = out-of-fold; before = the proxy's uncalibrated mapping of the raw score; "
        f"ECE over {first} equal-mass bins; "
        + (f"ranked by held-out {criterion}." if criterion else "the first row is written.")
    )
    return "\n".join(lines)
