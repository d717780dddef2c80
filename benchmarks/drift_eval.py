"""Does the drift statistic separate in-domain traffic from shifted traffic?

    .venv/bin/python benchmarks/drift_eval.py [--model-url URL] [--no-model] [--write-reference]

1. Splits the 549 facts-extra answers of the reference model
   (``benchmarks/results/answers.jsonl``, scores and correctness, in-domain: facts-extra
   is drawn from the same tables as facts-dev, which the shipped calibration was fitted
   on) in two halves by question id, stratified by kind. A reference distribution of the
   shipped calibration's inputs is built from the first half, exactly as
   ``abstain calibrate`` builds one (:mod:`proxy.confidence.drift`).
2. Asks the reference model (Gemma 3 270M, started here unless ``--model-url`` names a
   running one; answers cached under ~/.cache/abstain, so a rerun asks nothing) the
   packaged NQ-open questions (real search questions) and facts-extra through the ``chat``
   template (another prompt wording), plus facts-extra through the usual ``qa-fewshot``
   template again (a control: the same traffic, today's model server).
3. Prints, for each traffic set against the first half's reference: PSI per input, its max
   and mean, the PSI two samples of one distribution would show at that size, and the
   share of answers the per-answer outside test flags (beyond the fitted min/max, and
   beyond the 1st/99th percentile). Then the same on windows of 200 answers (the live
   monitor's scale): the in-domain 95th percentile against the shifted sets' 5th.
   Table B repeats it with the reference built from the first half of facts-extra
   re-asked through today's server, so that a change of model server (which moves the
   scores too) cannot pass for a change of traffic.
   A labelled synthetic shift (the second half with every logprob input moved by 0.25 nat
   towards less confident) is always included, so the table exists without a model.
4. ``--write-reference`` adds the reference built from all 549 answers to the shipped
   calibration (``policies/calibration/gemma-3-270m.json``), leaving the rest untouched.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from proxy import local_model
from proxy.confidence import drift
from proxy.confidence.calibration import load_calibration
from proxy.evaluation import datasets, runner
from proxy.evaluation.commands import DEFAULT_CACHE
from proxy.evaluation.grading import MatchGrader
from proxy.evaluation.prompts import get_template

ROOT = Path(__file__).resolve().parent.parent
ANSWERS = ROOT / "benchmarks" / "results" / "answers.jsonl"
SHIPPED = ROOT / "policies" / "calibration" / "gemma-3-270m.json"
MODEL = local_model.MODEL_ALIAS
CACHE = DEFAULT_CACHE
WINDOW, RESAMPLES = 200, 200
#: The synthetic shift: logprob inputs this much less confident (nats).
SYNTHETIC_SHIFT = 0.25
REFERENCE_SOURCE = (
    "facts-extra: the 549 answers of benchmarks/results/answers.jsonl (in-domain, same "
    "tables and prompt as facts-dev; facts-dev's own answers were not kept)"
)

Row = dict[str, float]
#: A traffic set: rows of scores and accuracy (None for synthetic traffic).
Set = tuple[list[Row], float | None]


def _load_answers() -> tuple[list[str], dict[str, Row], dict[str, bool]]:
    ids, scores, correct = [], {}, {}
    for line in ANSWERS.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        a = json.loads(line)
        if a.get("error") or not a.get("scores"):
            continue
        ids.append(a["id"])
        scores[a["id"]] = {k: float(v) for k, v in a["scores"].items()}
        correct[a["id"]] = bool(a["correct"])
    return ids, scores, correct


def _asked(
    dataset: str, template: str, url: str, limit: int | None = None
) -> dict[str, tuple[Row, bool]]:
    """The questions of ``dataset`` (the first ``limit``) asked of the model directly
    (cached): scores and correctness by question id."""
    path = datasets.resolve(dataset)
    questions = datasets.load_questions(path)[:limit]
    name = datasets.dataset_name(path)
    suffix = "" if template == "qa-fewshot" else f"--{template}"
    cache = runner.GenerationCache(CACHE / f"{name}{suffix}--{MODEL}.jsonl")
    gens = asyncio.run(
        runner.ask_all(questions, get_template(template), base_url=url, model=MODEL,
                       cache=cache, label=f"{name} ({template})")
    )  # fmt: skip
    gold = {q.id: q.answers for q in questions}
    grader = MatchGrader()
    return {
        g.id: (dict(g.scores), grader(g.text, gold[g.id]))
        for g in gens
        if g.error is None and g.scores
    }


def _traffic(answers: Mapping[str, tuple[Row, bool]], ids: Sequence[str] | None = None) -> Set:
    """(rows, accuracy) of ``answers`` (those of ``ids`` only, when given)."""
    chosen = [answers[i] for i in (ids if ids is not None else answers) if i in answers]
    rows = [r for r, _ in chosen]
    return rows, (sum(ok for _, ok in chosen) / len(chosen) if chosen else None)


def _column(rows: Sequence[Row], name: str) -> list[float]:
    return [r[name] for r in rows if name in r]


def _stats(ref: drift.Reference, rows: Sequence[Row]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, r in ref.inputs.items():
        out[name] = drift.psi_of(r, _column(rows, name))
    values = [out[n] for n in ref.inputs]
    out["max"], out["mean"] = max(values), sum(values) / len(values)
    bins = max(r.bins for r in ref.inputs.values())
    n_ref = min(r.n for r in ref.inputs.values())
    out["null"] = drift.null_psi(bins, len(rows), n_ref)
    out["ood_range"] = sum(ref.outside(r, "range") for r in rows) / len(rows)
    out["ood_pct"] = sum(ref.outside(r, "percentile") for r in rows) / len(rows)
    return out


def _windows(ref: drift.Reference, rows: Sequence[Row], seed: int = 0) -> list[float]:
    """Max-over-inputs PSI of random windows of WINDOW answers."""
    rng = random.Random(seed)
    size = min(WINDOW, len(rows))
    found = []
    for _ in range(RESAMPLES):
        sample = rng.sample(list(rows), size)
        found.append(max(drift.psi_of(r, _column(sample, n)) for n, r in ref.inputs.items()))
    return sorted(found)


def _pct(values: Sequence[float], q: float) -> float:
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def _shifted(rows: Sequence[Row], by: float) -> list[Row]:
    """Every logprob input moved ``by`` nats towards less confident (synthetic)."""
    moved = ("mean_logprob", "min_logprob", "first_logprob", "mean_entropy")
    return [{k: (v - by if k in moved else v) for k, v in r.items()} for r in rows]


def _table(ref: drift.Reference, sets: Mapping[str, Set]) -> str:
    names = list(ref.inputs)
    head = ["traffic", "n", "accuracy", *names, "max", "mean", "null", "OOD min/max", "OOD p1/p99"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, (rows, accuracy) in sets.items():
        s = _stats(ref, rows)
        acc = "" if accuracy is None else f"{accuracy:.1%}"
        cells = [label, str(len(rows)), acc, *(f"{s[n]:.3f}" for n in names)]
        cells += [f"**{s['max']:.3f}**", f"{s['mean']:.3f}", f"{s['null']:.3f}"]
        cells += [f"{s['ood_range']:.1%}", f"{s['ood_pct']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _window_table(ref: drift.Reference, sets: Mapping[str, Set]) -> str:
    lines = [
        f"| traffic | windows of {WINDOW} | max PSI: 5th pct | median | 95th pct |",
        "|---|---|---|---|---|",
    ]
    for label, (rows, _) in sets.items():
        w = _windows(ref, rows)
        lines.append(
            f"| {label} | {RESAMPLES} | {_pct(w, 0.05):.3f} | {_pct(w, 0.5):.3f} "
            f"| {_pct(w, 0.95):.3f} |"
        )
    return "\n".join(lines)


#: Keys of the shipped file written with their lists on one line (long arrays of numbers).
_COMPACT = ("validation", "reference")


def _inline(obj: object, indent: int) -> str:
    if isinstance(obj, dict) and obj:
        pad = " " * (indent + 2)
        items = [f"{pad}{json.dumps(k)}: {_inline(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    return json.dumps(obj)


def _dump(data: Mapping[str, object]) -> str:
    """The file as ``json.dumps(indent=2)`` writes it, but with the lists of the
    :data:`_COMPACT` objects on one line each."""
    rest = {k: v for k, v in data.items() if k not in _COMPACT}
    text = json.dumps(rest, indent=2)[: -len("\n}")]
    for key in _COMPACT:
        if key in data:
            text += f',\n  "{key}": ' + _inline(data[key], 2)
    return text + "\n}\n"


def write_reference(scores: Mapping[str, Row]) -> None:
    """Add the reference of all answers to the shipped calibration, nothing else."""
    calibration = load_calibration(SHIPPED)
    rows = [r for r in scores.values() if all(n in r for n in calibration.inputs)]
    columns = {n: _column(rows, n) for n in calibration.inputs}
    ref = drift.build_reference(columns, calibration.inputs, source=REFERENCE_SOURCE)
    data = json.loads(SHIPPED.read_text(encoding="utf-8"))
    data["reference"] = ref.to_dict()
    SHIPPED.write_text(_dump(data), encoding="utf-8")
    print(f"wrote the reference of {len(rows)} answers to {SHIPPED}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-url", help="a running reference model (default: start one)")
    parser.add_argument("--no-model", action="store_true", help="only the synthetic shift")
    parser.add_argument("--write-reference", action="store_true")
    parser.add_argument("--limit", type=int, help="ask at most this many questions per set")
    parser.add_argument(
        "--sets", default="nq,chat,control", help="which asked sets (default %(default)s)"
    )
    parser.add_argument("--threads", type=int, help="model server threads (default: all)")
    args = parser.parse_args(argv)

    ids, scores, correct = _load_answers()
    if args.write_reference:
        write_reference(scores)
    inputs = load_calibration(SHIPPED).inputs
    questions = {q.id: q for q in datasets.load_questions(datasets.resolve("facts-extra"))}
    first, second = datasets.split([questions[i] for i in ids if i in questions], 0.5, seed=0)
    fit_rows = [scores[q.id] for q in first]
    held = [q.id for q in second]
    columns = {n: _column(fit_rows, n) for n in inputs}
    ref = drift.build_reference(columns, inputs, source="facts-extra, first half")

    def acc(qids: Sequence[str]) -> float:
        return sum(correct[i] for i in qids) / len(qids)

    # The reference model's answers to facts-extra, as shipped (scores and grade).
    held_rows = [scores[i] for i in held]
    sets: dict[str, Set] = {
        "facts-extra, held-out half (in-domain)": (held_rows, acc(held)),
        f"synthetic: held-out half, logprobs −{SYNTHETIC_SHIFT} nat": (
            _shifted(held_rows, SYNTHETIC_SHIFT),
            None,
        ),
    }
    asked: dict[str, dict[str, tuple[Row, bool]]] = {}
    if not args.no_model:
        wanted = set(args.sets.split(","))
        with local_model.serving(args.model_url, threads=args.threads) as url:
            for key, dataset, template in (
                ("nq", "nq-open", "qa-fewshot"),
                ("chat", "facts-extra", "chat"),
                ("control", "facts-extra", "qa-fewshot"),
            ):
                if key in wanted:
                    asked[key] = _asked(dataset, template, url, args.limit)
    labels = {
        "nq": "nq-open (real search questions)",
        "chat": "facts-extra, chat prompt (another wording)",
        "control": "facts-extra re-asked, today's server: held-out half",
    }
    for key, answers in asked.items():
        sets[labels[key]] = _traffic(answers, held if key == "control" else None)
    print(f"A. reference: {len(fit_rows)} answers of answers.jsonl (facts-extra, first half,")
    print(f"   the server the shipped calibration was fitted with); inputs {', '.join(inputs)}")
    print(_table(ref, sets))
    print()
    print(_window_table(ref, sets))
    if "control" in asked:
        # The same comparison with the reference and the traffic from one model server,
        # so that a change of server cannot pass for a change of traffic.
        today, _ = _traffic(asked["control"], [q.id for q in first])
        columns = {n: _column(today, n) for n in inputs}
        ref_today = drift.build_reference(columns, inputs, source="facts-extra re-asked")
        same = {k: v for k, v in sets.items() if not k.startswith(("facts-extra, held", "synth"))}
        print()
        print(f"B. reference: {len(today)} answers of facts-extra re-asked (first half), today's")
        print("   server; the traffic of the same server")
        print(_table(ref_today, same))
        print()
        print(_window_table(ref_today, same))
    return 0


if __name__ == "__main__":
    sys.exit(main())
