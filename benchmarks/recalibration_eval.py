"""Does online recalibration learn shifted traffic from 200 feedback labels? (issue 12.2)

    .venv/bin/python benchmarks/recalibration_eval.py [--generate] [--model-url URL] [--seeds 20]
        [--prior 2] [--out DIR]

For each set, every answer gets the shipped calibration's P(correct) (the policy's
``policies/calibration/gemma-3-270m.json``) and its grade. A seeded shuffle makes the
first 200 answers the feedback stream, fed label by label through exactly the proxy's
rule (:func:`proxy.confidence.recalibration.refit`: first fit at ``min_labels``, a refit
every ``refit_every`` labels, swapped in only when better on the newest ``holdout``
share); the map in service after 200 labels then judges the *remaining* answers, which
no fit saw. Reported over ``--seeds`` shuffles: ECE (10 equal-mass bins) before and
after, with the ECE a perfectly calibrated model would show on the same answers (the
noise floor), and the wrong-among-answered rate and coverage at t = 0.5 and 0.75, pooled
over the shuffles (wrong answers delivered / answers delivered).

Sets:

* ``nq-open``: real search-engine questions, the reference model via the shipped
  ``qa-fewshot`` prompt (real answers and grades);
* ``facts-extra/chat``: the held-out facts questions asked through the ``chat`` prompt,
  a wording the calibration never saw (real);
* ``facts-extra``: the in-domain control, the shipped prompt (real,
  ``benchmarks/results/answers.jsonl``, the answers the calibration was judged on):
  recalibration should change little;
* ``facts-extra, re-asked``: the same questions and prompt asked again of the local
  model as this tree serves it (the calibration was fitted on answers of an earlier
  server build; about 16 % of the re-asked answers differ from answers.jsonl).

The answer cache is shared by every benchmark: its answers come from whichever local
server asked first (same weights, greedy decoding).
* ``facts-extra, overconfident`` / ``underconfident``: facts-extra's real scores with
  labels drawn (anew for each shuffle) from a known distortion of the shipped map,
  sigmoid(0.5·logit(p) − 0.8) and sigmoid(1.6·logit(p) + 0.4) (**synthetic**). Under the
  first no answer is right more than 59 % of the time, so at t = 0.75 the right
  behaviour is to answer nothing.
* ``facts-multi-test sentences`` and its two distortions: the same for a rule judged by
  sentence, whose labels are feedback on single sentences. Every sentence of the
  held-out multi-fact answers with the shipped sentence calibration's P(correct) and its
  grade (``benchmarks/results/sentences/answers.jsonl``, written by
  ``benchmarks/sentence_eval.py``); the in-domain control for sentences.
* ``facts-multi-test sentences, another wording``: the same questions asked through a
  prompt the sentence calibration never saw (an instruction, ``Question:``/``Answer:``,
  and shots whose sentences name the entity: "The capital of Japan is Tokyo. Japan uses
  the Japanese yen."), labelled sentence by sentence as ``abstain calibrate`` labels a
  multi-fact set (real, generated with ``--generate``).

Real answers are read from the answer cache that ``benchmarks/calibration_eval.py``
shares (~/.cache/abstain/generations); ``--generate`` asks the questions missing from it
(the local model, started here unless ``--model-url`` names one). A set with too few
cached answers is skipped and said so.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from proxy import local_model
from proxy.confidence import selective
from proxy.confidence.calibration import Calibration, load_calibration
from proxy.confidence.recalibration import DEFAULT_PRIOR, Recalibration, RecalibrationRule, refit
from proxy.evaluation import claims, datasets, runner
from proxy.evaluation.commands import DEFAULT_CACHE
from proxy.evaluation.grading import MatchGrader
from proxy.evaluation.prompts import Template, get_template

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "policies" / "calibration" / "gemma-3-270m.json"
ANSWERS = ROOT / "benchmarks" / "results" / "answers.jsonl"
SENTENCES = ROOT / "benchmarks" / "results" / "sentences" / "answers.jsonl"
SENTENCE_CALIBRATION = ROOT / "policies" / "calibration" / "gemma-3-270m-sentence.json"
RESULTS = ROOT / "benchmarks" / "results"
MODEL = local_model.MODEL_ALIAS
FEEDBACK = 200
THRESHOLDS = (0.5, 0.75)
#: The policy's settings (policies/default.yaml).
RULE = RecalibrationRule(min_labels=100, refit_every=25, holdout=0.3, prior_strength=DEFAULT_PRIOR)
#: The known distortions of the synthetic sets: the truth is sigmoid(a·logit(p) + b).
DISTORTIONS = {"overconfident": (0.5, -0.8), "underconfident": (1.6, 0.4)}


@dataclass
class Labelled:
    name: str
    kind: str  # "real" or "synthetic"
    base: np.ndarray  # the shipped calibration's P(correct)
    correct: np.ndarray
    #: synthetic sets: the true P(correct); each shuffle draws its own labels from it
    truth: np.ndarray | None = None


#: The other wording's shots: the shipped sentence prompt's entities (which the
#: multi-fact sets leave out), each fact in a sentence that names the entity.
REWORDED_SENTENCE_SHOTS = (
    (
        "Tell me about Japan: its capital, its currency and its continent.",
        "The capital of Japan is Tokyo. Japan uses the Japanese yen. Japan lies in Asia.",
    ),
    (
        "Tell me about Hydrogen: its chemical symbol, its atomic number and who discovered it.",
        "The symbol of Hydrogen is H. Hydrogen has atomic number 1. Henry Cavendish "
        "discovered Hydrogen.",
    ),
    (
        "Tell me about Peru: its capital, its currency and its continent.",
        "The capital of Peru is Lima. Peru uses the Peruvian sol. Peru lies in South America.",
    ),
    (
        "Tell me about Oxygen: its chemical symbol, its atomic number and who discovered it.",
        "The symbol of Oxygen is O. Oxygen has atomic number 8. Carl Wilhelm Scheele "
        "discovered Oxygen.",
    ),
)


@dataclass(frozen=True)
class RewordedSentences(Template):
    """Another few-shot wording of the multi-fact questions, for base models."""

    def prompt(self, question: str) -> str:
        shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in self.shots)
        return f"Answer with one short sentence per fact.\n\n{shots}Question: {question}\nAnswer:"


SENTENCES_REWORDED = RewordedSentences(
    "sentences-reworded",
    "completions",
    "instruction + the sentence shots reworded, Question:/Answer:",
    shots=REWORDED_SENTENCE_SHOTS,
    max_tokens=64,
)


def _cache_path(dataset: str, template: str) -> Path:
    suffix = "" if template == "qa-fewshot" else f"--{template}"
    return DEFAULT_CACHE / f"{dataset}{suffix}--{MODEL}.jsonl"


def _generations(
    dataset: str, template: Template, url: str | None
) -> tuple[list[datasets.Question], list[runner.Generation]]:
    """The set's questions, and the answers cached for them (every one asked, given a
    URL of the model: the cache then fills what it lacks)."""
    path = datasets.resolve(dataset)
    questions = datasets.load_questions(path)
    cache = runner.GenerationCache(_cache_path(datasets.dataset_name(path), template.name))
    if url is not None:
        gens = asyncio.run(
            runner.ask_all(questions, template, base_url=url, model=MODEL, cache=cache,
                           label=f"{dataset} ({template.name})")
        )  # fmt: skip
        return questions, gens
    gens = []
    for q in questions:
        key = runner.request_key("direct", template.path, template.body(q.question, MODEL))
        hit = cache.get(key)
        if hit is not None:
            gens.append(runner.Generation(**{**hit.to_dict(), "id": q.id}))
    return questions, gens


def _real(
    dataset: str, template: str, cal: Calibration, url: str | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """(base P, correct, questions) for the answers cached (or generated, given a URL)."""
    questions, gens = _generations(dataset, get_template(template), url)
    gold = {q.id: q.answers for q in questions}
    grader = MatchGrader()
    base, correct = [], []
    for g in gens:
        if g.error is not None:
            continue
        p = cal(g.scores)
        if p is not None:
            base.append(p)
            correct.append(1.0 if grader(g.text, gold[g.id]) else 0.0)
    return np.array(base), np.array(correct), len(questions)


def _real_sentences(
    dataset: str, template: Template, url: str | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """(shipped sentence P, correct, sentences) of the answers cached (or generated)."""
    cal = load_calibration(SENTENCE_CALIBRATION)
    questions, gens = _generations(dataset, template, url)
    labels, _ = claims.label_all(questions, gens, MatchGrader(), template, MODEL)
    base, correct = [], []
    for lab in labels:
        p = cal(lab.scores)
        if p is not None:
            base.append(p)
            correct.append(1.0 if lab.correct else 0.0)
    return np.array(base), np.array(correct), len(labels)


def _answers_file(cal: Calibration) -> tuple[np.ndarray, np.ndarray]:
    rows = [json.loads(line) for line in ANSWERS.read_text().splitlines() if line.strip()]
    base, correct = [], []
    for row in rows:
        if row.get("error"):
            continue
        p = cal(row["scores"])
        if p is not None:
            base.append(p)
            correct.append(1.0 if row["correct"] else 0.0)
    return np.array(base), np.array(correct)


def _sentences_file() -> tuple[np.ndarray, np.ndarray]:
    """(shipped P, correct) of every graded sentence of the held-out multi-fact answers."""
    rows = [json.loads(line) for line in SENTENCES.read_text().splitlines() if line.strip()]
    base, correct = [], []
    for row in rows:
        for sentence in row.get("sentences") or ():
            p, right = sentence.get("confidence"), sentence.get("correct")
            if p is not None and isinstance(right, bool):
                base.append(p)
                correct.append(1.0 if right else 0.0)
    return np.array(base), np.array(correct)


def simulate(
    base: np.ndarray, correct: np.ndarray, seed: int, rule: RecalibrationRule = RULE
) -> dict[str, Any]:
    """One shuffle: 200 labels through the proxy's refit rule, judged on the rest."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(base.size)
    fb, rest = order[:FEEDBACK], order[FEEDBACK:]
    current: Recalibration | None = None
    last = 0
    fits = swaps = 0
    for n in range(1, FEEDBACK + 1):
        if n >= rule.min_labels and n - last >= rule.refit_every:
            last = n
            fits += 1
            out = refit(base[fb[:n]], correct[fb[:n]], current, min_labels=rule.min_labels,
                        holdout=rule.holdout, prior_strength=rule.prior_strength,
                        window=rule.window)  # fmt: skip
            if out.swapped:
                current, swaps = out.recalibration, swaps + 1
    p0, y = base[rest], correct[rest]
    p1 = current.apply(p0) if current is not None else p0
    result: dict[str, Any] = {
        "fits": fits,
        "swaps": swaps,
        "slope": None if current is None else current.slope,
        "intercept": None if current is None else current.intercept,
        "n_rest": int(rest.size),
    }
    for tag, p in (("shipped", p0), ("recal", p1)):
        result[f"ece_{tag}"] = selective.ece(p, y, 10)
        result[f"floor_{tag}"] = selective.ece_noise_floor(p, 10, draws=100, seed=seed)
        for t in THRESHOLDS:
            answered = p > t
            result[f"answered_{tag}_{t}"] = int(answered.sum())
            result[f"wrong_{tag}_{t}"] = int((answered & (y == 0)).sum())
            result[f"ids_{tag}_{t}"] = {int(i) for i in rest[answered]}
    return result


def summarise(data: Labelled, seeds: int, rule: RecalibrationRule = RULE) -> dict[str, Any]:
    def labels(seed: int) -> np.ndarray:
        if data.truth is None:
            return data.correct
        draw = np.random.default_rng(10_000 + seed).uniform(size=data.truth.size)
        return (draw < data.truth).astype(float)

    runs = [simulate(data.base, labels(s), s, rule) for s in range(seeds)]
    out: dict[str, Any] = {
        "set": data.name,
        "kind": data.kind,
        "n": int(data.base.size),
        "accuracy": float(data.correct.mean()),
        "auroc": selective.auroc(data.base, data.correct),
        "seeds": seeds,
        "swapped_runs": sum(1 for r in runs if r["swaps"]),
    }
    for tag in ("shipped", "recal"):
        eces = np.array([r[f"ece_{tag}"] for r in runs])
        out[f"ece_{tag}"] = float(eces.mean())
        out[f"ece_{tag}_p90"] = float(np.quantile(eces, 0.9))
        out[f"floor_{tag}"] = float(np.mean([r[f"floor_{tag}"] for r in runs]))
        for t in THRESHOLDS:
            answered = sum(r[f"answered_{tag}_{t}"] for r in runs)
            wrong = sum(r[f"wrong_{tag}_{t}"] for r in runs)
            total = sum(r["n_rest"] for r in runs)
            out[f"wrong_{tag}_{t}"] = wrong / answered if answered else None
            out[f"coverage_{tag}_{t}"] = answered / total
            out[f"answered_{tag}_{t}"] = answered
            out[f"questions_{tag}_{t}"] = len(set().union(*(r[f"ids_{tag}_{t}"] for r in runs)))
            per_run = [
                r[f"wrong_{tag}_{t}"] / r[f"answered_{tag}_{t}"]
                for r in runs
                if r[f"answered_{tag}_{t}"]
            ]
            out[f"runs_within_{tag}_{t}"] = sum(1 for w in per_run if w <= 1 - t) + (
                len(runs) - len(per_run)  # nothing answered: no wrong answer delivered
            )
    slopes = [r["slope"] for r in runs if r["slope"] is not None]
    intercepts = [r["intercept"] for r in runs if r["intercept"] is not None]
    out["slope"] = float(np.mean(slopes)) if slopes else None
    out["intercept"] = float(np.mean(intercepts)) if intercepts else None
    return out


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def table(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| set | data | n | accuracy | ECE shipped → recalibrated (noise floor) "
        "| wrong among answered, t = 0.5 (rests on) | t = 0.75 | coverage t = 0.5 | t = 0.75 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def wrong(t: float, r: dict[str, Any] = r) -> str:
            shipped, recal = r[f"wrong_shipped_{t}"], r[f"wrong_recal_{t}"]
            # How many answers (over every shuffle) and distinct questions it rests on.
            rests = f"{r[f'answered_recal_{t}']} answers, {r[f'questions_recal_{t}']} questions"
            return f"{_fmt(shipped)} → **{_fmt(recal)}** ({rests})"

        def cov(t: float, r: dict[str, Any] = r) -> str:
            return f"{r[f'coverage_shipped_{t}']:.1%} → {r[f'coverage_recal_{t}']:.1%}"

        lines.append(
            f"| {r['set']} | {r['kind']} | {r['n']} | {r['accuracy']:.1%} "
            f"| {r['ece_shipped']:.3f} → **{r['ece_recal']:.3f}** ({r['floor_recal']:.3f}) "
            f"| {wrong(0.5)} | {wrong(0.75)} | {cov(0.5)} | {cov(0.75)} |"
        )
    return lines


def targets(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        checks = [
            f"ECE {r['ece_recal']:.3f} ≤ 0.05: {'met' if r['ece_recal'] <= 0.05 else 'MISSED'}"
        ]
        for t in THRESHOLDS:
            w = r[f"wrong_recal_{t}"]
            ok = w is None or w <= 1 - t
            checks.append(f"wrong@{t} {_fmt(w)} ≤ {1 - t:.2f}: {'met' if ok else 'MISSED'} "
                          f"({r[f'runs_within_recal_{t}']}/{r['seeds']} shuffles)")  # fmt: skip
        lines.append(f"- {r['set']} ({r['kind']}): " + "; ".join(checks))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generate", action="store_true", help="ask questions not cached")
    parser.add_argument("--model-url", help="a running model server (with --generate)")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument(
        "--prior",
        type=float,
        default=RULE.prior_strength,
        help="recalibrate_prior of the simulated refits (default: the policy's, %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the report goes")
    parser.add_argument(
        "--min-answers",
        type=int,
        default=400,
        help="skip a real set with fewer answers (default %(default)s)",
    )
    args = parser.parse_args(argv)
    cal = load_calibration(SHIPPED)
    sets: list[Labelled] = []

    def real(url: str | None) -> None:
        for dataset, template, name in (
            ("nq-open", "qa-fewshot", "nq-open"),
            ("facts-extra", "chat", "facts-extra/chat"),
            ("facts-extra", "qa-fewshot", "facts-extra, re-asked"),
        ):
            base, correct, asked = _real(dataset, template, cal, url)
            if base.size < args.min_answers:
                print(f"skipped {name}: {base.size} of {asked} answers cached "
                      f"(run with --generate)", file=sys.stderr)  # fmt: skip
                continue
            sets.append(Labelled(name, "real", base, correct))
        name = "facts-multi-test sentences, another wording"
        base, correct, labelled = _real_sentences("facts-multi-test", SENTENCES_REWORDED, url)
        if base.size < args.min_answers:
            print(f"skipped {name}: {base.size} sentences with a P(correct) of {labelled} "
                  f"(run with --generate)", file=sys.stderr)  # fmt: skip
        else:
            sets.append(Labelled(name, "real", base, correct))

    if args.generate:
        with local_model.serving(args.model_url) as url:
            real(url)
    else:
        real(None)
    for label, (base, correct) in (
        ("facts-extra", _answers_file(cal)),
        ("facts-multi-test sentences", _sentences_file()),
    ):
        sets.append(Labelled(f"{label} (in-domain control)", "real", base, correct))
        for name, (a, b) in DISTORTIONS.items():
            truth = Recalibration(a, b).apply(base)
            drawn = (np.random.default_rng(12).uniform(size=base.size) < truth).astype(float)
            sets.append(Labelled(f"{label}, {name}", "synthetic", base, drawn, truth))

    rule = dataclasses.replace(RULE, prior_strength=args.prior)
    rows = [summarise(s, args.seeds, rule) for s in sets]
    lines = [
        f"Recalibration after {FEEDBACK} feedback labels ({args.seeds} shuffles; "
        f"min_labels {rule.min_labels}, refit_every {rule.refit_every}, holdout "
        f"{rule.holdout}, prior {rule.prior_strength:g}). Judged on the answers no fit saw.",
        "In the sentence rows an answer is one sentence, and 'questions' counts distinct "
        "sentences.",
        "",
        *table(rows),
        "",
        *targets(rows),
    ]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recalibration.md").write_text("\n".join(lines) + "\n")
    (args.out / "recalibration.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
