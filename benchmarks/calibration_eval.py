"""Reproduce the shipped calibration's held-out numbers and the evaluation table.

    .venv/bin/python benchmarks/calibration_eval.py [--model-url URL] [--refit] [--nq SET]

1. Asks the reference model (Gemma 3 270M, started here on a free port unless
   ``--model-url`` names a running one) every question of facts-dev and of facts-extra
   (the facts questions facts-dev left out, built by ``benchmarks/facts_extra.py`` with
   facts-dev's own rules; both ship in ``proxy/data``) through the ``qa-fewshot``
   template. Answers are cached (~/.cache/abstain), so a rerun asks nothing.
2. ``--refit`` rewrites the shipped calibration from all of facts-dev with
   ``abstain calibrate --calibrators logistic`` (the shipped family: a logistic model
   over every logprob score, its 5-fold cross-validated numbers printed beside the
   single-score candidates'). facts-extra
   is never fitted on: it is the held-out set, 549 questions, so that its ECE is judged
   to about ±0.03 where one split of facts-dev (220 questions) judges it to ±0.05.
3. Prints every score × calibrator, and the logistic model over all logprob features,
   fitted on facts-dev and measured on facts-extra, and the shipped calibration's
   held-out ECE / AUROC / Brier beside the ECE a perfectly calibrated model would show.
4. Judges the procedure (choose by CV, fit, apply) once more, cross-fitted over both sets
   (5 outer folds, the choice made inside each training part, 5 seeds): every question
   is judged by a calibration that never saw it. With ``--nq nq-open`` (or another
   set's path), also checks by cross-validation whether adding the NQ-open sample to the
   fit data would help.
5. Runs ``abstain eval`` on facts-extra through the in-process proxy with the shipped
   calibration, writing the table and both charts to ``benchmarks/results/``, and prints
   which of the issue's targets were met.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from proxy import local_model
from proxy.cli import main as abstain
from proxy.confidence import fitting, selective
from proxy.confidence.calibration import Calibrator, load_calibration
from proxy.confidence.features import LOGISTIC_FEATURES, uncalibrated
from proxy.confidence.features import LOGPROB_SCORES as SCORES
from proxy.evaluation import datasets, runner
from proxy.evaluation.calibrate import Labelled, fit_method, label
from proxy.evaluation.commands import DEFAULT_CACHE
from proxy.evaluation.grading import MatchGrader
from proxy.evaluation.prompts import Template, get_template

ROOT = Path(__file__).resolve().parent.parent
# The packaged question sets (proxy/data): fitted on facts-dev, judged on facts-extra.
DATASET = datasets.resolve("facts-dev")
HELD_OUT = datasets.resolve("facts-extra")
SHIPPED = ROOT / "policies" / "calibration" / "gemma-3-270m.json"
RESULTS = ROOT / "benchmarks" / "results"
POLICY = ROOT / "policies" / "default.yaml"
MODEL = local_model.MODEL_ALIAS
#: The answers ``abstain calibrate/eval`` cache, shared so that both see the same ones.
CACHE = DEFAULT_CACHE
BINS, KINDS = 10, ("isotonic", "platt", "histogram")
#: The thresholds of the cross-fitted table (the eval table has these too).
THRESHOLDS = (0.1, 0.25, 0.5, 0.75)


def _asked(dataset: Path, url: str, template: Template | None = None) -> Labelled:
    """Every question of ``dataset`` asked of the model directly (cached), graded.

    ``template``: how to ask (default ``qa-fewshot``); another one's answers are cached
    in their own file, ``<set>--<template>--<model>.jsonl``, as the other benchmarks do.
    """
    template = template or get_template("qa-fewshot")
    questions = datasets.load_questions(dataset)
    name = datasets.dataset_name(dataset)
    suffix = "" if template.name == "qa-fewshot" else f"--{template.name}"
    cache = runner.GenerationCache(CACHE / f"{name}{suffix}--{MODEL}.jsonl")
    gens = asyncio.run(
        runner.ask_all(questions, template, base_url=url, model=MODEL,
                       cache=cache, label=f"{name} ({template.name}, direct)")
    )  # fmt: skip
    return label(questions, gens, MatchGrader())


def _apply(
    cal: Callable[[Mapping[str, float]], float | None], data: Labelled
) -> tuple[np.ndarray, np.ndarray]:
    """P(correct) for every answer the calibration can judge, with its label."""
    names = list(data.features)
    p, y = [], []
    for i in range(data.n):
        row = {n: float(data.features[n][i]) for n in names if not np.isnan(data.features[n][i])}
        value = cal(row)
        if value is not None:
            p.append(value)
            y.append(data.correct[i])
    return np.array(p, dtype=float), np.array(y, dtype=float)


def _subset(data: Labelled, rows: np.ndarray) -> Labelled:
    return Labelled({n: v[rows] for n, v in data.features.items()}, data.correct[rows])


def _concat(a: Labelled, b: Labelled) -> Labelled:
    names = set(a.features) & set(b.features)
    features = {n: np.concatenate([a.features[n], b.features[n]]) for n in sorted(names)}
    return Labelled(features, np.concatenate([a.correct, b.correct]))


def _choose(fit: Labelled) -> tuple[str, Calibrator]:
    """What ``abstain calibrate`` would write for ``fit``: (description, calibrator)."""
    (best, cal), *_ = fit_method(fit, "logprobs", kinds=(*KINDS, "logistic"))
    return (f"{best.kind} on {'+'.join(best.features) or best.score}", cal)


def _held_out_table(fit: Labelled, held: Labelled) -> list[str]:
    """Every candidate fitted on the fit part, measured on the held-out part."""
    lines = [
        "| score | calibrator | AUROC | ECE before | ECE after | Brier before | Brier after |",
        "|---|---|---|---|---|---|---|",
    ]
    for score in SCORES:
        x = held.features[score]
        raw = np.array([uncalibrated(score, float(v)) for v in x[~np.isnan(x)]])
        keep = ~np.isnan(fit.features[score])
        for kind in KINDS:
            cal = fitting.FITTERS[kind](fit.features[score][keep], fit.correct[keep], score)
            p, y = _apply(cal, held)
            lines.append(
                f"| {score} | {kind} | {selective.auroc(p, y):.3f} "
                f"| {selective.ece(raw, y, BINS):.3f} | {selective.ece(p, y, BINS):.3f} "
                f"| {selective.brier(raw, y):.3f} | {selective.brier(p, y):.3f} |"
            )
    X = np.column_stack([fit.features[n] for n in LOGISTIC_FEATURES])
    logistic = fitting.fit_logistic(X, fit.correct, LOGISTIC_FEATURES)
    p, y = _apply(logistic, held)
    lines.append(
        f"| {' + '.join(LOGISTIC_FEATURES)} | logistic | {selective.auroc(p, y):.3f} | | "
        f"{selective.ece(p, y, BINS):.3f} | | {selective.brier(p, y):.3f} |"
    )
    return lines


def _rates(p: np.ndarray, y: np.ndarray, t: float) -> str:
    answered = p > t
    right, wrong = np.mean(answered & (y == 1)), np.mean(answered & (y == 0))
    return f"{1 - answered.mean():.1%} / {right:.1%} / {wrong:.1%}"


def _cross_fitted(data: Labelled, seeds: int = 5, folds: int = 5) -> list[str]:
    """The procedure judged on every question, each by a calibration fitted without it."""
    rows = []
    for seed in range(seeds):
        p = np.full(data.n, np.nan)
        chosen = Counter[str]()
        for test in fitting.stratified_folds(data.correct, folds, seed=100 + seed):
            train = np.setdiff1d(np.arange(data.n), test)
            name, cal = _choose(_subset(data, train))
            chosen[name] += 1
            judged, _ = _apply(cal, _subset(data, test))
            # Every facts answer has every logprob score, so nothing is left unjudged.
            assert judged.size == test.size
            p[test] = judged
        y = data.correct
        rows.append((selective.ece(p, y, BINS), selective.auroc(p, y), selective.brier(p, y),
                     selective.ece_noise_floor(p, BINS, draws=200), p, chosen))  # fmt: skip
    ece, auc, brier, floor = (np.array([r[k] for r in rows]) for k in range(4))
    mid = int(np.argsort(ece)[len(ece) // 2])
    p, y = rows[mid][4], data.correct
    table = [
        "| t | model alone: right / wrong | calibrated: abstain / right / wrong |",
        "|---|---|---|",
        *(f"| {t} | {y.mean():.1%} / {1 - y.mean():.1%} | {_rates(p, y, t)} |" for t in THRESHOLDS),
    ]
    return [
        f"Cross-fitted over both sets, {data.n} questions ({folds} outer folds, the choice "
        f"made by CV inside each training part; {seeds} seeds): ECE median {np.median(ece):.3f} "
        f"(range {ece.min():.3f}–{ece.max():.3f}; a perfectly calibrated model shows "
        f"{np.median(floor):.3f} at this size), AUROC median {np.median(auc):.3f} "
        f"(range {auc.min():.3f}–{auc.max():.3f}), Brier median {np.median(brier):.4f}. "
        f"Chosen inside the folds: {dict(sum((r[5] for r in rows), Counter[str]()))}.",
        "",
        "The median seed's out-of-fold answers (abstain / right / wrong, share of all questions):",
        "",
        *table,
    ]


def _nq_helps(fit: Labelled, nq_path: Path, url: str) -> str:
    """Does adding the NQ sample to the fit data help? Judged by CV on facts-dev only (NQ
    always in the training folds), so facts-extra stays unseen."""
    nq = _asked(nq_path, url)
    folds = fitting.stratified_folds(fit.correct, 5, 0)
    lines = [f"NQ sample: {nq.n} answers, {nq.correct.mean():.1%} right. CV on facts-dev:"]
    options = [(k, [s]) for s in ("mean_logprob", "min_logprob") for k in KINDS]
    for kind, names in [*options, ("logistic", list(LOGISTIC_FEATURES))]:
        fit_one = fitting.fitter(kind, names)
        X = np.column_stack([fit.features[n] for n in names])
        X_nq = np.column_stack([nq.features[n] for n in names])
        keep_nq = ~np.isnan(X_nq).any(axis=1)
        cells = []
        for extra in (False, True):
            oof = np.full(fit.n, np.nan)
            for test in folds:
                train = np.setdiff1d(np.arange(fit.n), test)
                x, y = X[train], fit.correct[train]
                if extra:
                    x, y = np.r_[x, X_nq[keep_nq]], np.r_[y, nq.correct[keep_nq]]
                oof[test] = fitting.predict(fit_one(x, y), names, X[test])
            cells.append(
                f"Brier {selective.brier(oof, fit.correct):.4f} "
                f"ECE {selective.ece(oof, fit.correct, BINS):.3f}"
            )
        lines.append(f"- {kind} on {'+'.join(names)}: facts only {cells[0]}; with NQ {cells[1]}")
    return "\n".join(lines)


#: How this script reads "much lower error at a small cost in accuracy": in the paper's
#: table the abstaining model keeps 92 % of the other's accuracy (22 % against 24 %) and
#: makes 35 % of its errors (26 % against 75 %).
EFFECT = "some threshold keeps >= 75% of the right answers and makes <= 40% of the errors"


def _shows_effect(row: dict[str, Any]) -> bool:
    alone, proxy = row["alone"], row["proxy"]
    return bool(
        proxy["accuracy"] >= 0.75 * alone["accuracy"]
        and proxy["error_rate"] <= 0.40 * alone["error_rate"]
    )


def _effect(row: dict[str, Any]) -> str:
    alone, proxy = row["alone"], row["proxy"]
    return (
        f"- t={row['threshold']}: accuracy {alone['accuracy']:.1%} → {proxy['accuracy']:.1%} "
        f"(keeps {proxy['accuracy'] / alone['accuracy']:.0%}), error "
        f"{alone['error_rate']:.1%} → {proxy['error_rate']:.1%} "
        f"(makes {proxy['error_rate'] / alone['error_rate']:.0%} of the errors)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-url", help="a running reference model (default: start one)")
    parser.add_argument("--refit", action="store_true", help="rewrite the shipped calibration")
    parser.add_argument("--nq", help="also test whether this set (e.g. nq-open) helps the fit")
    args = parser.parse_args()
    try:
        nq = None if args.nq is None else datasets.resolve(args.nq)
    except datasets.DatasetError as exc:
        parser.error(str(exc))

    with local_model.serving(args.model_url) as url:
        common = ["--model", MODEL, "--cache-dir", str(CACHE)]
        if args.refit:
            # The shipped family, refitted: a logistic model over every logprob score.
            # Fixed rather than chosen again, because facts-dev alone chooses noisily (one
            # run's CV picked a histogram by 0.005 of Brier) while the cross-fitted check
            # below picks the logistic model in 24 of 25 fits.
            refit = ["calibrate", "--dataset", "facts-dev", *common, "--base-url", url,
                     "--calibrators", "logistic"]  # fmt: skip
            if abstain([*refit, "--out", str(SHIPPED)]) != 0:
                return 1
        fit, held = _asked(DATASET, url), _asked(HELD_OUT, url)
        lines = [
            f"Fitted on facts-dev: {fit.n} answers ({fit.correct.mean():.1%} right); held out: "
            f"facts-extra, {held.n} ({held.correct.mean():.1%} right). ECE over {BINS} "
            "equal-mass bins.",
            "",
            *_held_out_table(fit, held),
            "",
        ]
        shipped = load_calibration(SHIPPED)
        p, y = _apply(shipped, held)
        held_ece = selective.ece(p, y, BINS)
        raw = {s: selective.auroc(held.features[s], held.correct) for s in SCORES}
        best_raw = max(raw, key=lambda s: raw[s])
        lines += [
            f"Shipped calibration ({shipped.calibrator.kind} on {'+'.join(shipped.inputs)}) on "
            f"facts-extra, direct answers: ECE {held_ece:.3f} (a perfectly calibrated model "
            f"would show {selective.ece_noise_floor(p, BINS):.3f}), AUROC "
            f"{selective.auroc(p, y):.3f}, Brier {selective.brier(p, y):.3f}. Best single "
            f"raw score: {best_raw}, AUROC {raw[best_raw]:.3f}.",
            "",
            *_cross_fitted(_concat(fit, held)),
        ]
        if nq is not None:
            lines += ["", _nq_helps(fit, nq, url)]
        print("\n" + "\n".join(lines) + "\n")

        ev = ["eval", "--dataset", "facts-extra", *common, "--policy", str(POLICY)]
        ev += ["--calibration", str(SHIPPED), "--upstream-url", url, "--out", str(RESULTS)]
        if abstain(ev) != 0:
            return 1

    report = json.loads((RESULTS / "eval.json").read_text())
    by_t = {r["threshold"]: r for r in report["table"]}
    row = by_t[0.75]
    proxy_ece = next(v for k, v in report["metrics"].items() if k.startswith("ECE ("))
    proxy_auroc = report["metrics"]["AUROC"]
    effect = [_effect(r) for r in report["table"] if r["threshold"] > 0]
    lines += ["", "The paper's effect (behind the proxy against the model alone):", *effect]
    targets = {
        "held-out ECE <= 0.05 (direct answers)": held_ece <= 0.05,
        "held-out ECE <= 0.05 (through the proxy)": proxy_ece <= 0.05,
        # The shipped score combines logprob scores; the best single one is reported above.
        "best logprob score AUROC >= 0.80 (the shipped combination, through the proxy)": (
            proxy_auroc >= 0.80
        ),
        "t=0.75: wrong of answered <= 25%": (row["proxy"]["wrong_of_answered"] or 0) <= 0.25,
        "t=0.75: score > always answer": row["proxy"]["penalised_score"]
        > row["alone"]["penalised_score"],
        "t=0.75: score > always abstain (0)": row["proxy"]["penalised_score"] > 0.0,
        EFFECT: any(_shows_effect(r) for r in report["table"]),
    }
    verdicts = [f"- {'met' if ok else 'NOT met'}: {name}" for name, ok in targets.items()]
    (RESULTS / "calibration.md").write_text("\n".join([*lines, "", "Targets:", *verdicts]) + "\n")
    print("\n".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
