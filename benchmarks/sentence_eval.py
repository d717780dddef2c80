"""Calibration for sentences (issue 13): fit on facts-multi-dev, judge facts-multi-test.

    .venv/bin/python benchmarks/sentence_eval.py [--model-url URL] [--live] [--no-write]

1. Asks the reference model (Gemma 3 270M, started here on a free port unless
   ``--model-url`` names a running one) every question of ``facts-multi-dev`` and
   ``facts-multi-test`` (``benchmarks/facts_multi.py``) through the ``sentences-fewshot``
   prompt, directly. Answers go through the answer cache ``abstain calibrate`` uses
   (~/.cache/abstain/generations), so a rerun asks nothing.
2. Fits the shipped sentence calibration on dev only, with ``abstain calibrate
   --dataset facts-multi-dev --calibrators logistic`` (a logistic model over the
   answer-level inputs less the first token's two: each sentence is a labelled example,
   scored on all of its tokens, exactly as the proxy scores it), and prints every
   candidate's 5-fold CV numbers on dev beside it.
3. Compares which tokens to score, fitted on dev and measured on test: the claim's tokens
   (the prompt's words, or the question's, given), the sentence's tokens less function
   words and punctuation, and all of the sentence's tokens (the proxy's rule).
4. Judges the test split through the proxy itself (the in-process app of ``abstain eval
   --policy policies/default.yaml``, every rule at ``granularity: sentence`` with the new
   calibration): by default the upstream replays the cached direct answers (the same
   text and logprobs, so nothing is generated twice on a 2-core machine); ``--live`` asks
   the model again through the proxy. Checks that the proxy's per-sentence P(correct)
   equals the calibration applied offline, and reports claim-level AUROC, ECE (10
   equal-mass bins), Brier and the abstain / right / wrong table; at t = 0.5 the share of
   right sentences kept and of wrong ones withheld, with the labels each rests on and 95 %
   intervals from a bootstrap over questions (sentences of one answer are not
   independent).
5. Stores the test split's (P(correct), correct) pairs as the calibration's
   ``validation`` block (so ``target_error`` works with it) and, unless ``--no-write``,
   writes the report to ``benchmarks/results/sentences/`` and
   ``benchmarks/results/sentences.md``. The shipped file and report are those of the
   default run (replayed answers: reproducible from the cache); ``--live`` is the check
   that the real model behind the real proxy gives the same numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from proxy import local_model
from proxy.cli import main as abstain
from proxy.confidence import fitting, selective
from proxy.confidence.calibration import Calibration, load_calibration
from proxy.confidence.features import LOGPROB_SCORES, SENTENCE_LOGISTIC_FEATURES
from proxy.confidence.risk_control import choose_threshold
from proxy.evaluation import claims, claims_eval, datasets, inproc, runner
from proxy.evaluation.calibrate import Labelled, fit_method, ranking_table
from proxy.evaluation.commands import DEFAULT_CACHE
from proxy.evaluation.evaluate import draw_charts
from proxy.evaluation.grading import MatchGrader
from proxy.evaluation.prompts import get_template
from proxy.evaluation.reports import to_markdown, write_report

ROOT = Path(__file__).resolve().parent.parent
DEV, TEST = "facts-multi-dev", "facts-multi-test"
SHIPPED = ROOT / "policies" / "calibration" / "gemma-3-270m-sentence.json"
POLICY = ROOT / "policies" / "default.yaml"
RESULTS = ROOT / "benchmarks" / "results"
MODEL = local_model.MODEL_ALIAS
TEMPLATE = get_template("sentences-fewshot")
CACHE = DEFAULT_CACHE
BINS = 10
THRESHOLDS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)
GRADER = MatchGrader()
VARIANTS: tuple[tuple[claims.Context, str], ...] = (
    ("prompt", "claim tokens, prompt words given"),
    ("question", "claim tokens, only the question's words given (not the shots')"),
    ("none", "sentence less function words and punctuation, no prompt words given"),
    ("all", "all of the sentence's tokens (the proxy's rule)"),
)


def _asked(name: str, url: str) -> tuple[list[datasets.Question], list[runner.Generation]]:
    """Every question of a set, asked of the model directly (through the cache)."""
    questions = datasets.load_questions(name)
    cache = runner.GenerationCache(CACHE / f"{datasets.dataset_name(name)}--{MODEL}.jsonl")
    gens = asyncio.run(
        runner.ask_all(questions, TEMPLATE, base_url=url, model=MODEL, cache=cache, label=name)
    )
    failed = [g.id for g in gens if g.error]
    if failed:
        raise SystemExit(f"{len(failed)} requests failed ({failed[:3]}); run again")
    return questions, gens


def _rows(data: Labelled, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    X = np.column_stack([data.features[n] for n in names])
    keep = ~np.isnan(X).any(axis=1)
    return X, keep


def _apply(cal: Calibration, labels: Sequence[claims.SentenceLabel]) -> np.ndarray:
    return np.array(
        [np.nan if (p := cal(lab.scores)) is None else p for lab in labels], dtype=np.float64
    )


def _clusters(labels: Sequence[claims.SentenceLabel]) -> np.ndarray:
    ids = {q: i for i, q in enumerate(dict.fromkeys(lab.question for lab in labels))}
    return np.array([ids[lab.question] for lab in labels])


def _bootstrap(
    p: np.ndarray, y: np.ndarray, groups: np.ndarray, stat: Any, draws: int = 1000
) -> tuple[float, float]:
    """95 % interval of ``stat(p, y)`` resampling whole answers (questions)."""
    rng = np.random.default_rng(0)
    members = [np.nonzero(groups == g)[0] for g in range(int(groups.max()) + 1)]
    values = []
    for _ in range(draws):
        pick = rng.integers(0, len(members), len(members))
        rows = np.concatenate([members[i] for i in pick])
        value = stat(p[rows], y[rows])
        if not np.isnan(value):
            values.append(value)
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def right_model_ece(dev: Labelled, test: Labelled, draws: int = 200) -> tuple[np.ndarray, int]:
    """What held-out ECE a model family that is exactly right would show on these sentences.

    The labels are drawn from the shipped logistic's own P(correct), on dev and on test,
    so the family is right by construction. The logistic is refitted on dev's drawn
    labels, and the ECE is read against test's. Returns every draw's ECE and the number of
    dev sentences fitted on. The draws are independent given P; real sentences of one
    answer are not, which would only widen the spread.
    """
    names = SENTENCE_LOGISTIC_FEATURES
    (Xd, kd), (Xt, kt) = _rows(dev, names), _rows(test, names)
    Xd, Xt = Xd[kd], Xt[kt]
    truth = fitting.fit_logistic(Xd, dev.correct[kd], names)
    pd, pt = fitting.predict(truth, names, Xd), fitting.predict(truth, names, Xt)
    rng = np.random.default_rng(0)
    eces = []
    for _ in range(draws):
        yd, yt = rng.random(pd.size) < pd, rng.random(pt.size) < pt
        refit = fitting.fit_logistic(Xd, yd, names)
        eces.append(selective.ece(fitting.predict(refit, names, Xt), yt, BINS))
    return np.array(eces), int(pd.size)


def _variant_table(
    dev_q: Sequence[datasets.Question],
    dev_g: Sequence[runner.Generation],
    test_q: Sequence[datasets.Question],
    test_g: Sequence[runner.Generation],
) -> list[str]:
    """Which tokens to score: a logistic model fitted on dev, measured on test."""
    lines = [
        "| tokens scored | dev sentences | test sentences | best raw score on test (AUROC) "
        "| logistic AUROC | ECE | Brier | t = 0.5: right kept / wrong withheld "
        "| continent sentences' AUROC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, what in VARIANTS:
        fit, _ = claims.label(dev_q, dev_g, GRADER, TEMPLATE, MODEL, context=mode)
        held, _ = claims.label(test_q, test_g, GRADER, TEMPLATE, MODEL, context=mode)
        X, keep = _rows(fit, SENTENCE_LOGISTIC_FEATURES)
        model = fitting.fit_logistic(X[keep], fit.correct[keep], SENTENCE_LOGISTIC_FEATURES)
        Xt, keep_t = _rows(held, SENTENCE_LOGISTIC_FEATURES)
        p = fitting.predict(model, SENTENCE_LOGISTIC_FEATURES, Xt[keep_t])
        y = held.correct[keep_t]
        raw = {
            s: selective.auroc(held.features[s], held.correct)
            for s in LOGPROB_SCORES
            if s in held.features
        }
        best = max(raw, key=lambda s: raw[s])
        kept, held, _, _ = claims_eval.kept_and_withheld(p, y, 0.5)
        labels, _ = claims.label_all(test_q, test_g, GRADER, TEMPLATE, MODEL, context=mode)
        continent = np.array([lab.claims == ("continent",) for lab in labels])[keep_t]
        lines.append(
            f"| {what} | {int(keep.sum())} | {int(keep_t.sum())} | {best} {raw[best]:.3f} "
            f"| {selective.auroc(p, y):.3f} | {selective.ece(p, y, BINS):.3f} "
            f"| {selective.brier(p, y):.3f} | {_pct(kept)} / {_pct(held)} "
            f"| {selective.auroc(p[continent], y[continent]):.3f} ({int(continent.sum())}) |"
        )
    return lines


def _replay(gens: Sequence[runner.Generation]) -> httpx.MockTransport:
    """An upstream that answers each prompt with its cached direct answer."""
    by_prompt: dict[str, runner.Generation] = {}
    questions = {q.id: q for q in datasets.load_questions(TEST)}
    for g in gens:
        by_prompt[str(TEMPLATE.prompt(questions[g.id].question))] = g

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        gen = by_prompt.get(str(body.get("prompt")))
        if gen is None:
            return httpx.Response(404, json={"error": {"message": "not a cached question"}})
        choice = {
            "index": 0,
            "text": claims.raw_text(gen),
            "finish_reason": gen.finish_reason,
            "logprobs": gen.logprobs,
        }
        response = {"id": f"replay-{gen.id}", "object": "text_completion", "model": MODEL}
        return httpx.Response(200, json={**response, "choices": [choice]})

    return httpx.MockTransport(handle)


async def _through_proxy(
    questions: Sequence[datasets.Question],
    direct: Sequence[runner.Generation],
    url: str,
    live: bool,
) -> list[runner.Generation]:
    """The test split through the in-process proxy, every rule at granularity sentence."""
    data = inproc.derived_policy(
        POLICY, model=MODEL, calibration=SHIPPED, upstream_url=url, granularity="sentence"
    )
    upstream = None if live else _replay(direct)
    tag = inproc.policy_tag(data) + ("" if live else ":replay")
    cache = runner.GenerationCache(CACHE / f"{TEST}--{MODEL}--proxy.jsonl" if live else None)
    async with inproc.proxy_transport(data, upstream_transport=upstream) as transport:
        return await runner.ask_all(
            questions,
            TEMPLATE,
            base_url="http://abstain-proxy.inproc/v1",
            model=MODEL,
            transport=transport,
            tag=tag,
            cache=cache,
            label=f"{TEST} (proxy{'' if live else ', replayed'})",
        )


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-url", help="a running reference model (default: start one)")
    parser.add_argument("--live", action="store_true", help="ask the model again via the proxy")
    no_write = "write no report (the calibration and its validation block are written)"
    parser.add_argument("--no-write", action="store_true", help=no_write)
    args = parser.parse_args()

    with local_model.serving(args.model_url) as url:
        dev_q, dev_g = _asked(DEV, url)
        test_q, test_g = _asked(TEST, url)
        fit_args = ["calibrate", "--dataset", DEV, "--model", MODEL, "--base-url", url]
        fit_args += ["--cache-dir", str(CACHE), "--calibrators", "logistic", "--quiet"]
        if abstain([*fit_args, "--out", str(SHIPPED)]) != 0:
            return 1
        via_proxy = asyncio.run(_through_proxy(test_q, test_g, url, args.live))

    dev, dev_stats = claims.label(dev_q, dev_g, GRADER, TEMPLATE, MODEL)
    every = fit_method(
        dev, "logprobs", kinds=(*fitting.KINDS, "logistic"), base_inputs=SENTENCE_LOGISTIC_FEATURES
    )
    test, test_stats = claims.label(test_q, test_g, GRADER, TEMPLATE, MODEL)
    right_eces, right_n = right_model_ece(dev, test)
    cal = load_calibration(SHIPPED)

    report, arrays, proxied = claims_eval.evaluate(
        test_q, via_proxy, GRADER, TEMPLATE, mode="proxy", model=MODEL, dataset=TEST,
        thresholds=THRESHOLDS, ece_bins=BINS,
        meta={"policy": str(POLICY.relative_to(ROOT)), "calibration": SHIPPED.name,
              "upstream": "live" if args.live else "replayed direct answers"},
    )  # fmt: skip
    p = np.array([np.nan if lab.confidence is None else lab.confidence for lab in proxied])
    y = np.array([1.0 if lab.correct else 0.0 for lab in proxied])
    groups = _clusters(proxied)
    # The calibration applied offline to the scores recomputed from the logprobs the
    # proxy returned: the live path must give the very same P(correct).
    gap = float(np.nanmax(np.abs(p - _apply(cal, proxied))))
    direct_text = {g.id: g.text for g in test_g}
    changed = sum(g.text != direct_text[g.id] for g in via_proxy)

    auroc, ece, brier = selective.auroc(p, y), selective.ece(p, y, BINS), selective.brier(p, y)
    floor = selective.ece_noise_floor(p, BINS)
    auroc_ci = _bootstrap(p, y, groups, selective.auroc)
    ece_ci = _bootstrap(p, y, groups, lambda a, b: selective.ece(a, b, BINS))
    kept, held, n_right, n_wrong = claims_eval.kept_and_withheld(p, y, 0.5)
    right_rows, wrong_rows = y == 1, y == 0
    kept_ci = _bootstrap(p[right_rows], y[right_rows], groups[right_rows],
                         lambda a, _b: float(np.mean(a > 0.5)))  # fmt: skip
    held_ci = _bootstrap(p[wrong_rows], y[wrong_rows], groups[wrong_rows],
                         lambda a, _b: float(np.mean(~(a > 0.5))))  # fmt: skip
    risk = choose_threshold(p.tolist(), y.tolist(), target_error=0.25, source=TEST)

    ranked = [c for c, _ in every]
    lines = [
        f"Dev ({DEV}): " + "; ".join(dev_stats.lines()) + ".",
        f"Test ({TEST}): " + "; ".join(test_stats.lines()) + ".",
        "",
        "Candidates, 5-fold CV on dev (the shipped file is the logistic row):",
        "",
        "```",
        ranking_table(ranked, "brier"),
        "```",
        "",
        "Which tokens to score (fitted on dev, measured on test, logistic over "
        f"{', '.join(SENTENCE_LOGISTIC_FEATURES)}):",
        "",
        *_variant_table(dev_q, dev_g, test_q, test_g),
        "",
        f"Through the proxy ({'live' if args.live else 'upstream replaying the cached answers'}"
        f"), test split: {len(proxied)} sentences of {len(test_q)} questions, {n_right} right, "
        f"{n_wrong} wrong. The proxy's P(correct) against the calibration applied offline: "
        f"largest difference {gap:.2g}. Answers that differ from the direct ones: {changed} "
        f"of {len(via_proxy)}.",
        "",
        f"- claim-level AUROC {auroc:.3f} (95 % CI {auroc_ci[0]:.3f}–{auroc_ci[1]:.3f}, "
        f"bootstrap over questions; {n_right} right × {n_wrong} wrong sentences)",
        f"- ECE {ece:.3f} over {BINS} equal-mass bins (CI {ece_ci[0]:.3f}–{ece_ci[1]:.3f}; "
        f"a perfectly calibrated model would show {floor:.3f} on these {len(p)} sentences)",
        f"- a logistic model exactly right for these sentences (labels drawn from its own P), "
        f"fitted on {right_n} dev sentences: held-out ECE {np.mean(right_eces):.3f} on "
        f"average, ≤ 0.05 in {np.mean(right_eces <= 0.05):.0%} of {right_eces.size} draws, "
        f"≥ the {ece:.3f} measured in {np.mean(right_eces >= ece):.0%}",
        f"- Brier {brier:.3f}",
        f"- t = 0.5: right sentences kept {_pct(kept)} of {n_right} (CI {_pct(kept_ci[0])}–"
        f"{_pct(kept_ci[1])}); wrong sentences withheld {_pct(held)} of {n_wrong} "
        f"(CI {_pct(held_ci[0])}–{_pct(held_ci[1])})",
        f"- target_error 0.25 at 95 %: threshold {risk.threshold}, error bound "
        f"{'n/a' if risk.bound is None else f'{risk.bound:.3f}'}, answers "
        f"{risk.coverage:.1%} of {len(p)} labelled sentences"
        + ("" if risk.threshold is not None else f" ({risk.reason})"),
        "",
        to_markdown(report),
    ]
    targets = {
        "claim-level AUROC >= 0.80 (held out)": auroc >= 0.80,
        "claim-level ECE <= 0.05 (held out)": ece <= 0.05,
        "t = 0.5: >= 80 % of right sentences kept": kept >= 0.80,
        "t = 0.5: >= 50 % of wrong sentences withheld": held >= 0.50,
    }
    verdicts = [f"- {'met' if ok else 'NOT met'}: {name}" for name, ok in targets.items()]
    text = "\n".join([*lines, "Targets:", *verdicts]) + "\n"
    print("\n" + text)

    validation = {
        "source": TEST,
        "note": (
            f"the {len(p)} sentences of the {len(test_q)} facts-multi-test questions "
            "(benchmarks/facts_multi.py), never fitted on, judged through the proxy at "
            "granularity sentence (benchmarks/sentence_eval.py); confidence is this file's "
            "P(correct), correct the match grader's label of the sentence's claim"
        ),
        "n": len(p),
        "confidence": [round(float(v), 6) for v in p],
        "correct": [bool(v) for v in y],
    }
    dataclasses.replace(cal, validation=validation).save(SHIPPED)
    if args.no_write:
        return 0
    out = RESULTS / "sentences"
    write_report(report, out)
    records = claims_eval.answer_records(test_q, via_proxy, proxied)
    (out / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    draw_charts(arrays, out, thresholds=[t for t in THRESHOLDS if t > 0], ece_bins=BINS,
                title=f"{MODEL} sentences on {TEST}")  # fmt: skip
    (RESULTS / "sentences.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
