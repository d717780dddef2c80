"""Fit on one set, judge on others: do the answer-text inputs survive a shift? (issue 12.4-5)

    .venv/bin/python benchmarks/shift_eval.py [--model-url URL] [--seeds 20] [--prior 2]

1. Reads the reference model's answers (Gemma 3 270M, started here unless
   ``--model-url`` names a running one; answers cached under ~/.cache/abstain/generations,
   shared with the other benchmarks, so a rerun asks nothing) to facts-dev through the
   shipped ``qa-fewshot`` prompt (the fit set), and to four judged sets: facts-extra
   through the same prompt (in-domain: the same tables, never fitted on); facts-extra as
   a ``chat`` request (the local server frames it with the same few-shot prompt, so this
   is the same wording through another endpoint); facts-extra through *another few-shot
   wording* (an instruction line, other shots, ``Question:`` / ``Answer:`` labels:
   :data:`REWORDED`); and NQ-open (real search questions through the shipped prompt).
2. Fits four logistic calibrations on all of facts-dev, exactly as ``abstain calibrate``
   fits the shipped one (:func:`proxy.confidence.fitting.fit_logistic`): over the
   shipped inputs (``LOGISTIC_FEATURES``), and with the answer-text inputs of
   :mod:`proxy.confidence.shift_scores` added (``question_overlap``;
   ``answer_min_logprob``; both).
3. For every calibration and judged set: AUROC, ECE (10 equal-mass bins, beside the
   noise floor a perfectly calibrated model would show on the same answers), and at
   t = 0.5 and 0.75 the wrong-among-answered rate, the coverage and the penalised score
   (right +1, wrong −t/(1−t), abstained 0). facts-dev itself is judged out of fold
   (5 folds), as the fit's in-domain reference.
4. The same after feedback recalibration: 200 labels of the judged set fed through the
   proxy's own refit rule (:func:`benchmarks.recalibration_eval.simulate`, with the
   policy's settings), judged on the remaining answers, over ``--seeds`` shuffles.
5. ``target_error`` 0.25 at confidence 0.9 (``risk_control.choose_threshold``): the
   threshold chosen from the calibration's in-domain labels (its out-of-fold P(correct)
   on facts-dev: labels no fold was fitted on), applied to each
   judged set; the same threshold on the recalibrated P (what the proxy does when a rule
   has both); and the threshold chosen from the 200 feedback labels themselves, applied
   to the rest (what the proxy does once a tenant has sent ``recalibrate_min_labels``
   labels: :func:`proxy.feedback_risk.choose_from_feedback`, the same test on the same P).
6. Paired bootstrap intervals (answers resampled, 1000 draws) of each added input's
   change in AUROC, log loss and Brier against the shipped inputs.

Prints the tables as markdown and writes them to ``benchmarks/results/shift.md`` (and
the numbers to ``shift.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    # Run as a script (python benchmarks/shift_eval.py): the sibling benchmarks are
    # imported as the ``benchmarks`` package, from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import calibration_eval, recalibration_eval
from proxy import local_model
from proxy.confidence import fitting, recalibration, selective
from proxy.confidence.calibration import load_calibration
from proxy.confidence.features import LOGISTIC_FEATURES, TEXT_SCORES
from proxy.confidence.recalibration import Recalibration, RecalibrationRule
from proxy.confidence.risk_control import RiskChoice, choose_threshold
from proxy.evaluation import datasets
from proxy.evaluation.calibrate import Labelled
from proxy.evaluation.prompts import Template, get_template

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BINS = 10
THRESHOLDS = (0.5, 0.75)
FEEDBACK = recalibration_eval.FEEDBACK
TARGET_ERROR, TARGET_CONFIDENCE = 0.25, 0.9
#: The price a wrong answer has under the target: t = 1 − target (3 points at 0.25).
TARGET_PRICE_T = 1.0 - TARGET_ERROR
BOOTSTRAP = 1000

#: The calibrations compared: the shipped inputs, then the answer-text inputs added.
INPUTS: Mapping[str, tuple[str, ...]] = {
    "shipped inputs": LOGISTIC_FEATURES,
    "+ overlap": (*LOGISTIC_FEATURES, "question_overlap"),
    "+ answer min": (*LOGISTIC_FEATURES, "answer_min_logprob"),
    "+ overlap + answer min": (*LOGISTIC_FEATURES, *TEXT_SCORES),
}

#: The other few-shot wording's shots: general knowledge of none of the sets' kinds.
OTHER_SHOTS = (
    ("Which planet is known as the Red Planet?", "Mars"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("At what temperature in Celsius does water boil at sea level?", "100 degrees"),
    ("What is the tallest animal in the world?", "The giraffe"),
)
INSTRUCTION = "Answer each question with a short phrase."


@dataclass(frozen=True)
class Reworded(Template):
    """Another few-shot wording for base models: an instruction, other shots, other labels."""

    def prompt(self, question: str) -> str:
        shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in OTHER_SHOTS)
        return f"{INSTRUCTION}\n\n{shots}Question: {question}\nAnswer:"


REWORDED = Reworded("reworded", "completions", "instruction + four other shots, Question:/Answer:")

#: (question set, template, label) of every judged set; the first is in-domain.
JUDGED = (
    ("facts-extra", get_template("qa-fewshot"), "facts-extra (in-domain)"),
    ("facts-extra", get_template("chat"), "facts-extra, chat request"),
    ("facts-extra", REWORDED, "facts-extra, another wording"),
    ("nq-open", get_template("qa-fewshot"), "NQ-open"),
)
FIT_SET = "facts-dev"
ALL_INPUTS = tuple(dict.fromkeys(n for names in INPUTS.values() for n in names))


def _matrix(data: Labelled) -> tuple[np.ndarray, np.ndarray]:
    """(every input of every calibration, correct) over the answers that have them all,
    so that the calibrations are compared on the same answers."""
    missing = [n for n in ALL_INPUTS if n not in data.features]
    if missing:
        raise SystemExit(f"answers lack {missing}: are the cached answers' token texts gone?")
    X = np.column_stack([data.features[n] for n in ALL_INPUTS])
    keep = ~np.isnan(X).any(axis=1)
    return X[keep], data.correct[keep]


def _columns(X: np.ndarray, names: Sequence[str]) -> np.ndarray:
    return X[:, [ALL_INPUTS.index(n) for n in names]]


def _at(p: np.ndarray, y: np.ndarray, t: float) -> dict[str, Any]:
    return outcome(p > t, y, t)


def outcome(answered: np.ndarray, y: np.ndarray, t: float) -> dict[str, Any]:
    """Wrong among answered, coverage and the score at t's price, of these decisions."""
    wrong = int((answered & (y == 0)).sum())
    n_ans = int(answered.sum())
    return {
        "answered": n_ans,
        "wrong": wrong,
        "risk": wrong / n_ans if n_ans else None,
        "coverage": n_ans / y.size,
        "score": selective.penalised_score(answered, y, t),
    }


def plain(p: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The calibration as fitted, on every judged answer."""
    return {
        "n": int(y.size),
        "accuracy": float(y.mean()),
        "auroc": selective.auroc(p, y),
        "ece": selective.ece(p, y, BINS),
        "floor": selective.ece_noise_floor(p, BINS),
        "log_loss": selective.log_loss(p, y),
        "brier": selective.brier(p, y),
        **{f"t{t}": _at(p, y, t) for t in THRESHOLDS},
    }


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The feedback stream and the rest, as :func:`recalibration_eval.simulate` draws them."""
    order = np.random.default_rng(seed).permutation(n)
    return order[:FEEDBACK], order[FEEDBACK:]


def _pool(parts: Sequence[dict[str, Any]], t: float) -> dict[str, Any]:
    """Wrong among answered, coverage and score pooled over shuffles."""
    answered = sum(p["answered"] for p in parts)
    wrong = sum(p["wrong"] for p in parts)
    total = sum(p["n"] for p in parts)
    right = answered - wrong
    return {
        "answered": answered,
        "wrong": wrong,
        "questions": len(set().union(*(p["ids"] for p in parts))),
        "risk": wrong / answered if answered else None,
        "coverage": answered / total if total else 0.0,
        "score": (right - wrong * selective.penalty(t)) / total if total else float("nan"),
    }


def _outcome(p: np.ndarray, y: np.ndarray, ids: np.ndarray, t: float | None) -> dict[str, Any]:
    """Counts at threshold t (None: no threshold qualified, every answer refused)."""
    answered = p > t if t is not None else np.zeros(p.size, dtype=bool)
    return {
        "answered": int(answered.sum()),
        "wrong": int((answered & (y == 0)).sum()),
        "n": int(p.size),
        "ids": {int(i) for i in ids[answered]},
    }


def with_feedback(
    p: np.ndarray,
    y: np.ndarray,
    seeds: int,
    in_domain: RiskChoice,
    rule: RecalibrationRule = recalibration_eval.RULE,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(recalibrated after 200 labels, target_error with and after feedback), per shuffle
    through the proxy's refit rule, pooled over the shuffles."""
    runs = [recalibration_eval.simulate(p, y, seed, rule) for seed in range(seeds)]
    # The ceiling of a two-parameter map: fitted on every answer of the set (no prior,
    # in sample), judged on each shuffle's rest like the map learnt from 200 labels.
    best = Recalibration(*recalibration.fit(p, y, prior_strength=0.0))
    best_eces = [selective.ece(best.apply(p[rest]), y[rest], BINS)
                 for rest in (_split(p.size, seed)[1] for seed in range(seeds))]  # fmt: skip
    recal: dict[str, Any] = {
        "n_rest": runs[0]["n_rest"],
        "seeds": seeds,
        "swapped_runs": sum(1 for r in runs if r["swaps"]),
        "ece": float(np.mean([r["ece_recal"] for r in runs])),
        "floor": float(np.mean([r["floor_recal"] for r in runs])),
        "ece_best_map": float(np.mean(best_eces)),
        "best_map": [best.slope, best.intercept],
    }
    for t in THRESHOLDS:
        parts = [
            {"answered": r[f"answered_recal_{t}"], "wrong": r[f"wrong_recal_{t}"],
             "n": r["n_rest"], "ids": r[f"ids_recal_{t}"]}
            for r in runs
        ]  # fmt: skip
        recal[f"t{t}"] = _pool(parts, t)
    t_in = in_domain.threshold
    on_recal, chosen_parts, thresholds = [], [], []
    for seed, run in enumerate(runs):
        fb, rest = _split(p.size, seed)
        assert rest.size == run["n_rest"]  # the same shuffle as simulate's
        current = (
            Recalibration(run["slope"], run["intercept"]) if run["slope"] is not None else None
        )
        p_rest = current.apply(p[rest]) if current is not None else p[rest]
        on_recal.append(_outcome(p_rest, y[rest], rest, t_in))
        choice = choose_threshold(p[fb].tolist(), y[fb].tolist(), target_error=TARGET_ERROR,
                                  target_confidence=TARGET_CONFIDENCE)  # fmt: skip
        thresholds.append(choice.threshold)
        chosen_parts.append(_outcome(p[rest], y[rest], rest, choice.threshold))
    found = [t for t in thresholds if t is not None]
    target = {
        "in_domain_on_recalibrated": _pool(on_recal, TARGET_PRICE_T),
        "from_feedback": _pool(chosen_parts, TARGET_PRICE_T),
        "feedback_found": len(found),
        "feedback_threshold_median": float(np.median(found)) if found else None,
    }
    return recal, target


def _bootstrap(
    p0: np.ndarray, p1: np.ndarray, y: np.ndarray, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """Change (p1 − p0) in AUROC, log loss and Brier, with 95 % paired bootstrap bounds."""
    rng = np.random.default_rng(seed)

    def deltas(idx: np.ndarray) -> tuple[float, float, float]:
        a, b, t = p0[idx], p1[idx], y[idx]
        return (
            selective.auroc(b, t) - selective.auroc(a, t),
            selective.log_loss(b, t) - selective.log_loss(a, t),
            selective.brier(b, t) - selective.brier(a, t),
        )

    point = deltas(np.arange(y.size))
    draws = np.array([deltas(rng.integers(0, y.size, y.size)) for _ in range(BOOTSTRAP)])
    out = {}
    for k, name in enumerate(("auroc", "log_loss", "brier")):
        lo, hi = np.nanquantile(draws[:, k], [0.025, 0.975])
        out[name] = (point[k], float(lo), float(hi))
    return out


def _f(v: float | None, digits: int = 3, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _risk(cell: Mapping[str, Any]) -> str:
    """Wrong among answered, with how many answers it rests on."""
    rests = f"{cell['answered']}"
    if "questions" in cell:
        rests += f" answers, {cell['questions']} questions"
    return f"{_f(cell['risk'])} ({rests})"


def table_plain(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| judged on | inputs | n | accuracy | AUROC | ECE (floor) | wrong among answered, "
        "t = 0.5 (answers) | coverage | score | wrong among answered, t = 0.75 (answers) "
        "| coverage | score |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r.get("plain")
        if m is None:
            continue
        cells = [r["set"], r["inputs"], str(m["n"]), f"{m['accuracy']:.1%}", _f(m["auroc"]),
                 f"{_f(m['ece'])} ({_f(m['floor'])})"]  # fmt: skip
        for t in THRESHOLDS:
            c = m[f"t{t}"]
            cells += [_risk(c), f"{c['coverage']:.1%}", _f(c["score"], signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def table_recal(rows: Sequence[dict[str, Any]], seeds: int) -> list[str]:
    lines = [
        f"| judged on | inputs | answers judged ({seeds} shuffles × rest) | swapped "
        "| ECE (floor) | ECE, best map | wrong among answered, t = 0.5 | coverage | score "
        "| wrong among answered, t = 0.75 | coverage | score |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r.get("recal")
        if m is None:
            continue
        cells = [r["set"], r["inputs"], f"{seeds} × {m['n_rest']}",
                 f"{m['swapped_runs']}/{seeds}", f"{_f(m['ece'])} ({_f(m['floor'])})",
                 _f(m["ece_best_map"])]  # fmt: skip
        for t in THRESHOLDS:
            c = m[f"t{t}"]
            cells += [_risk(c), f"{c['coverage']:.1%}", _f(c["score"], signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def table_target(rows: Sequence[dict[str, Any]], seeds: int) -> list[str]:
    lines = [
        "| judged on | inputs | in-domain threshold (bound, labels) | wrong among answered "
        "(answers) | coverage | score | same threshold, recalibrated P | coverage | score "
        f"| threshold from {FEEDBACK} feedback labels: found, median t | wrong among answered "
        "| coverage | score |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "target_in_domain" not in r:
            continue
        c, m = r["target_in_domain"], r.get("target")
        cells = [
            r["set"],
            r["inputs"],
            f"{_f(c['threshold'], 2)} ({_f(c['bound'])}, {c['labels']})",
            _risk(c),
            f"{c['coverage']:.1%}",
            _f(c["score"], signed=True),
        ]
        if m is None:
            cells += ["", "", "", "", "", "", ""]
        else:
            rc, fb = m["in_domain_on_recalibrated"], m["from_feedback"]
            cells += [
                _risk(rc),
                f"{rc['coverage']:.1%}",
                _f(rc["score"], signed=True),
                f"{m['feedback_found']}/{seeds}, {_f(m['feedback_threshold_median'], 2)}",
                _risk(fb),
                f"{fb['coverage']:.1%}",
                _f(fb["score"], signed=True),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def table_deltas(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| judged on | inputs | Δ AUROC [95 %] | Δ log loss [95 %] | Δ Brier [95 %] |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        d = r.get("delta")
        if d is None:
            continue

        def ci(name: str, d: Mapping[str, tuple[float, float, float]] = d) -> str:
            point, lo, hi = d[name]
            return f"{point:+.3f} [{lo:+.3f}, {hi:+.3f}]"

        lines.append(
            f"| {r['set']} | {r['inputs']} | {ci('auroc')} | {ci('log_loss')} | {ci('brier')} |"
        )
    return lines


def _target_at(choice: RiskChoice, p: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    t = choice.threshold
    answered = p > t if t is not None else np.zeros(p.size, dtype=bool)
    wrong = int((answered & (y == 0)).sum())
    n_ans = int(answered.sum())
    return {
        "threshold": t,
        "bound": choice.bound,
        "labels": choice.labels,
        "answered": n_ans,
        "wrong": wrong,
        "risk": wrong / n_ans if n_ans else None,
        "coverage": n_ans / p.size,
        "score": selective.penalised_score(answered, y, TARGET_PRICE_T),
    }


def run(
    fit: Labelled,
    judged: Mapping[str, Labelled],
    seeds: int,
    rule: RecalibrationRule = recalibration_eval.RULE,
) -> list[dict[str, Any]]:
    X_fit, y_fit = _matrix(fit)
    sets = {name: _matrix(data) for name, data in judged.items()}
    rows: list[dict[str, Any]] = []
    fitted, oof = {}, {}
    for label, names in INPUTS.items():
        X = _columns(X_fit, names)
        fitted[label] = fitting.fit_logistic(X, y_fit, names)
        fit_one = fitting.fitter("logistic", names)
        oof[label] = fitting.cross_validate(X, y_fit, names, fit_one, 5, 0)
    choices = {
        label: choose_threshold(oof[label].tolist(), y_fit.tolist(), target_error=TARGET_ERROR,
                                target_confidence=TARGET_CONFIDENCE, source=f"{FIT_SET} OOF")
        for label in INPUTS
    }  # fmt: skip
    # The first calibration is the shipped one refitted on the same answers: say how close.
    shipped = load_calibration(calibration_eval.SHIPPED)
    names = INPUTS["shipped inputs"]
    first = next(iter(sets.values()))[0]
    same = fitting.predict(shipped.calibrator, names, _columns(first, names))
    refit = fitting.predict(fitted["shipped inputs"], names, _columns(first, names))
    for label in INPUTS:
        rows.append(
            {
                "set": f"{FIT_SET} (fit set, out of fold)",
                "vs_shipped_file": float(np.max(np.abs(same - refit))),
                "inputs": label,
                "weights": dict(zip(fitted[label].features, fitted[label].weights, strict=True)),
                "plain": plain(oof[label], y_fit),
                "target_in_domain": _target_at(choices[label], oof[label], y_fit),
            }
        )
    for set_name, (X_all, y) in sets.items():
        base_p = None
        for label, names in INPUTS.items():
            p = fitting.predict(fitted[label], names, _columns(X_all, names))
            recal, target = with_feedback(p, y, seeds, choices[label], rule)
            row = {
                "set": set_name,
                "inputs": label,
                "plain": plain(p, y),
                "recal": recal,
                "target_in_domain": _target_at(choices[label], p, y),
                "target": target,
            }
            if base_p is None:
                base_p = p
            else:
                row["delta"] = _bootstrap(base_p, p, y)
            rows.append(row)
    return rows


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if k != "ids"}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, set):
        return len(obj)
    if isinstance(obj, float | np.floating):
        return None if np.isnan(obj) else round(float(obj), 5)
    return obj


def report(
    rows: Sequence[dict[str, Any]],
    seeds: int,
    fit: Labelled,
    rule: RecalibrationRule = recalibration_eval.RULE,
) -> list[str]:
    weights = [
        f"- {r['inputs']}: " + ", ".join(f"{n} {w:+.2f}" for n, w in r["weights"].items())
        for r in rows
        if "weights" in r
    ]
    gap = rows[0]["vs_shipped_file"]
    return [
        f"Fitted on {FIT_SET} ({fit.n} answers, {fit.correct.mean():.1%} right, shipped "
        "qa-fewshot prompt): logistic over the shipped inputs (the shipped calibration "
        f"refitted: its P(correct) differs from policies/calibration/gemma-3-270m.json's by "
        f"at most {gap:.1e}), and with the answer-text inputs added. Standardised weights:",
        "",
        *weights,
        "",
        "A. As fitted, on every answer of each judged set (facts-dev: out of fold).",
        "",
        *table_plain(rows),
        "",
        f"B. After feedback recalibration: {FEEDBACK} labels of the judged set through the "
        f"proxy's refit rule (min_labels {rule.min_labels}, refit_every "
        f"{rule.refit_every}, prior {rule.prior_strength:g}, swap on held-out log loss), "
        f"judged on the rest; {seeds} shuffles, counts pooled (answers, distinct questions). "
        "'ECE, best map': the ceiling of a two-parameter recalibration, the map fitted "
        "without a prior on every answer of the set (in sample), judged on the same rests.",
        "",
        *table_recal(rows, seeds),
        "",
        f"C. target_error {TARGET_ERROR} at confidence {TARGET_CONFIDENCE} (19 grid thresholds, "
        "Bonferroni, Clopper-Pearson). In-domain threshold: chosen on the calibration's "
        f"out-of-fold P on {FIT_SET}. Score at the target's price (t = {TARGET_PRICE_T}: a "
        "wrong answer costs 3). No threshold found: every answer refused (–). The "
        f"{FIT_SET} rows are the labels the threshold was chosen on.",
        "",
        *table_target(rows, seeds),
        "",
        f"D. Each added input against the shipped inputs, same answers: paired bootstrap "
        f"({BOOTSTRAP} resamples of the answers). Lower log loss and Brier are better.",
        "",
        *table_deltas(rows),
    ]


def ask_sets(model_url: str | None) -> tuple[Labelled, dict[str, Labelled]]:
    """(the fit set, every judged set by label): the model's answers, through the cache."""
    with local_model.serving(model_url) as url:
        fit = calibration_eval._asked(datasets.resolve(FIT_SET), url)
        judged = {
            label: calibration_eval._asked(datasets.resolve(name), url, template)
            for name, template, label in JUDGED
        }
    return fit, judged


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-url", help="a running reference model (default: start one)")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument(
        "--prior",
        type=float,
        default=recalibration_eval.RULE.prior_strength,
        help="recalibrate_prior of the simulated refits (default: the policy's, %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    fit, judged = ask_sets(args.model_url)
    rule = dataclasses.replace(recalibration_eval.RULE, prior_strength=args.prior)
    rows = run(fit, judged, args.seeds, rule)
    lines = report(rows, args.seeds, fit, rule)
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shift.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (args.out / "shift.json").write_text(json.dumps(_jsonable(rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
