"""Reproduce the shipped calibration's held-out numbers and the evaluation table.

    .venv/bin/python benchmarks/calibration_eval.py [--model-url URL] [--refit] [--nq FILE]

1. Asks the reference model (Gemma 3 270M, started here on a free port unless
   ``--model-url`` names a running one) every question of facts-dev through the
   ``qa-fewshot`` template. Answers are cached (~/.cache/abstain), so a rerun asks nothing.
2. Splits the set as ``abstain calibrate/eval --split`` do (40 % held out, stratified by
   kind, seed 0). ``--refit`` rewrites the shipped calibration from the fit part with
   ``abstain calibrate`` (choice by 5-fold cross-validated log loss on the fit part only).
3. Prints every score × calibrator fitted on the fit part and measured on the held-out
   part, then the shipped calibration's held-out ECE / AUROC / Brier, and the ECE a
   perfectly calibrated model would show on a sample of that size.
4. Repeats the whole procedure (select by CV on the fit part, measure on the held-out
   part) over 20 different splits, because one split of 220 questions is a noisy judge.
   With ``--nq``, also checks by cross-validation on the fit part whether adding the
   NQ-open sample to the fit data would help (it did not: see benchmarks/results).
5. Runs ``abstain eval`` on the held-out part through the in-process proxy with the
   shipped calibration, writing the table and both charts to ``benchmarks/results/``,
   and prints which of the issue's targets were met.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from proxy import local_model
from proxy.cli import main as abstain
from proxy.confidence import fitting
from proxy.confidence.calibration import Calibrator, load_calibration
from proxy.confidence.logprobs import SCORES, as_probability
from proxy.evaluation import datasets, runner, selective
from proxy.evaluation.calibrate import Labelled, label
from proxy.evaluation.grading import MatchGrader
from proxy.evaluation.prompts import get_template

ROOT = Path(__file__).resolve().parent.parent
# The shared data sits beside the project checkout (../shared/data), on CI as here.
DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "facts-dev.jsonl"
SHIPPED = ROOT / "policies" / "calibration" / "gemma-3-270m.json"
RESULTS = ROOT / "benchmarks" / "results"
POLICY = ROOT / "policies" / "default.yaml"
MODEL = local_model.MODEL_ALIAS
CACHE = Path.home() / ".cache" / "abstain" / "generations"
HELD_OUT, SEED, BINS, KINDS = 0.4, 0, 10, ("isotonic", "platt", "histogram")


def _generations(
    dataset: Path, url: str
) -> tuple[list[datasets.Question], dict[str, runner.Generation]]:
    questions = datasets.load_questions(dataset)
    cache = runner.GenerationCache(CACHE / f"{datasets.dataset_name(dataset)}--{MODEL}.jsonl")
    gens = asyncio.run(
        runner.ask_all(questions, get_template("qa-fewshot"), base_url=url, model=MODEL,
                       cache=cache, label="facts (direct)")
    )  # fmt: skip
    return questions, {g.id: g for g in gens}


def _labels(qs: Sequence[datasets.Question], by_id: dict[str, runner.Generation]) -> Labelled:
    return label(qs, [by_id[q.id] for q in qs], MatchGrader())


def _apply(cal: Calibrator, score: str, data: Labelled) -> tuple[np.ndarray, np.ndarray]:
    x = data.features[score]
    keep = ~np.isnan(x)
    p = np.array([cal({score: float(v)}) for v in x[keep]], dtype=float)
    return p, data.correct[keep]


def _held_out_table(fit: Labelled, held: Labelled) -> list[str]:
    """Every score × calibrator fitted on the fit part, measured on the held-out part."""
    lines = [
        "| score | calibrator | AUROC | ECE before | ECE after | Brier before | Brier after |",
        "|---|---|---|---|---|---|---|",
    ]
    for score in SCORES:
        x = held.features[score]
        raw = np.array([as_probability(score, float(v)) for v in x[~np.isnan(x)]])
        keep = ~np.isnan(fit.features[score])
        for kind in KINDS:
            cal = fitting.FITTERS[kind](fit.features[score][keep], fit.correct[keep], score)
            p, y = _apply(cal, score, held)
            lines.append(
                f"| {score} | {kind} | {selective.auroc(p, y):.3f} "
                f"| {selective.ece(raw, y, BINS):.3f} | {selective.ece(p, y, BINS):.3f} "
                f"| {selective.brier(raw, y):.3f} | {selective.brier(p, y):.3f} |"
            )
    return lines


def _over_splits(qs: list[datasets.Question], by_id: dict[str, runner.Generation]) -> str:
    """The selection procedure judged on 20 different held-out parts."""
    eces, aurocs, floors, chosen = [], [], [], Counter[str]()
    for seed in range(20):
        fit_q, held_q = datasets.split(qs, HELD_OUT, seed)
        fit, held = _labels(fit_q, by_id), _labels(held_q, by_id)
        (best, cal), *_ = fitting.select(fit.features, fit.correct, scores=SCORES, kinds=KINDS)
        p, y = _apply(cal, best.score, held)
        chosen[f"{best.kind} on {best.score}"] += 1
        eces.append(selective.ece(p, y, BINS))
        aurocs.append(selective.auroc(p, y))
        floors.append(selective.ece_noise_floor(p, BINS, draws=200))
    e = np.array(eces)
    return (
        f"Over 20 random 60/40 splits (select by CV on the fit part, measure on the held-out "
        f"part): held-out ECE median {np.median(e):.3f} (range {e.min():.3f}–{e.max():.3f}, "
        f"≤ 0.05 in {int(np.sum(e <= 0.05))}/20); the ECE a perfectly calibrated model shows "
        f"at this size: median {np.median(floors):.3f}; AUROC median {np.median(aurocs):.3f} "
        f"(range {min(aurocs):.3f}–{max(aurocs):.3f}); chosen: {dict(chosen)}."
    )


def _nq_helps(fit: Labelled, nq_path: Path, url: str) -> str:
    """Does adding the NQ sample to the fit data help? Judged by CV on the facts fit part
    only (NQ always in the training folds), so the held-out part stays unseen."""
    nq_questions, nq_by_id = _generations(nq_path, url)
    nq = _labels(nq_questions, nq_by_id)
    folds = fitting.stratified_folds(fit.correct, 5, 0)
    lines = [f"NQ sample: {nq.n} answers, {nq.correct.mean():.1%} right. CV on the facts fit part:"]
    for score in ("mean_logprob", "min_logprob"):
        for kind in KINDS:
            cells = []
            for extra in (None, nq):
                oof = np.full(fit.n, np.nan)
                for test in folds:
                    train = np.setdiff1d(np.arange(fit.n), test)
                    x, y = fit.features[score][train], fit.correct[train]
                    if extra is not None:
                        x, y = np.r_[x, extra.features[score]], np.r_[y, extra.correct]
                    cal = fitting.FITTERS[kind](x[~np.isnan(x)], y[~np.isnan(x)], score)
                    oof[test] = [cal({score: float(v)}) for v in fit.features[score][test]]
                cells.append(
                    f"Brier {selective.brier(oof, fit.correct):.4f} "
                    f"ECE {selective.ece(oof, fit.correct, BINS):.3f}"
                )
            lines.append(f"- {kind} on {score}: facts only {cells[0]}; with NQ {cells[1]}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-url", help="a running reference model (default: start one)")
    parser.add_argument("--dataset", type=Path, default=DATASET)
    parser.add_argument("--refit", action="store_true", help="rewrite the shipped calibration")
    parser.add_argument("--nq", type=Path, help="also test whether this NQ sample helps the fit")
    args = parser.parse_args()

    with local_model.serving(args.model_url) as url:
        common = ["--dataset", str(args.dataset), "--model", MODEL, "--cache-dir", str(CACHE)]
        common += ["--held-out-fraction", str(HELD_OUT), "--split-seed", str(SEED)]
        if args.refit:
            refit = ["calibrate", *common, "--split", "fit", "--base-url", url]
            if abstain([*refit, "--out", str(SHIPPED)]) != 0:
                return 1
        questions, by_id = _generations(args.dataset, url)
        fit_q, held_q = datasets.split(questions, HELD_OUT, SEED)
        fit, held = _labels(fit_q, by_id), _labels(held_q, by_id)
        lines = [
            f"Fit part: {fit.n} answers ({fit.correct.mean():.1%} right); held-out part: "
            f"{held.n} ({held.correct.mean():.1%} right). ECE over {BINS} equal-mass bins.",
            "",
            *_held_out_table(fit, held),
            "",
        ]
        shipped = load_calibration(SHIPPED)
        p, y = _apply(shipped.calibrator, shipped.score, held)
        x = held.features[shipped.score]
        held_ece = selective.ece(p, y, BINS)
        raw_auroc = selective.auroc(x[~np.isnan(x)], y)
        lines += [
            f"Shipped calibration ({shipped.calibrator.kind} on {shipped.score}) on the held-out "
            f"part, direct answers: ECE {held_ece:.3f} (a perfectly calibrated model would show "
            f"{selective.ece_noise_floor(p, BINS):.3f}), AUROC {raw_auroc:.3f}, "
            f"Brier {selective.brier(p, y):.3f}.",
            "",
            _over_splits(questions, by_id),
        ]
        if args.nq is not None:
            lines += ["", _nq_helps(fit, args.nq, url)]
        print("\n" + "\n".join(lines) + "\n")

        ev = ["eval", *common, "--split", "held-out", "--policy", str(POLICY)]
        ev += ["--calibration", str(SHIPPED), "--upstream-url", url, "--out", str(RESULTS)]
        if abstain(ev) != 0:
            return 1

    report = json.loads((RESULTS / "eval.json").read_text())
    row = next(r for r in report["table"] if r["threshold"] == 0.75)
    proxy_ece = next(v for k, v in report["metrics"].items() if k.startswith("ECE ("))
    targets = {
        "held-out ECE <= 0.05 (direct answers)": held_ece <= 0.05,
        "held-out ECE <= 0.05 (through the proxy)": proxy_ece <= 0.05,
        "best logprob score AUROC >= 0.80": raw_auroc >= 0.80,
        "t=0.75: wrong of answered <= 25%": (row["proxy"]["wrong_of_answered"] or 0) <= 0.25,
        "t=0.75: score > always answer": row["proxy"]["penalised_score"]
        > row["alone"]["penalised_score"],
        "t=0.75: score > always abstain (0)": row["proxy"]["penalised_score"] > 0.0,
    }
    verdicts = [f"- {'met' if ok else 'NOT met'}: {name}" for name, ok in targets.items()]
    (RESULTS / "calibration.md").write_text("\n".join([*lines, "", "Targets:", *verdicts]) + "\n")
    print("\n".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
