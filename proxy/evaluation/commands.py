"""``abstain calibrate`` and ``abstain eval``: argument parsing and the order of the steps.

::

    abstain calibrate --dataset FILE --model NAME [--base-url URL] [--score NAME]
                      [--calibrators isotonic,platt,histogram] --out FILE
    abstain calibrate --from-log PATH [--model NAME] [--score NAME] --out FILE
    abstain eval --dataset FILE --model NAME [--policy FILE | --base-url URL | --direct]
                 [--thresholds 0,0.5,0.75,0.9] --out DIR

The work lives in :mod:`~proxy.evaluation.calibrate`, :mod:`~proxy.evaluation.evaluate`
and :mod:`~proxy.evaluation.runner`; this module only wires them to the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from proxy.confidence.logprobs import SCORES

DEFAULT_MODEL_URL = "http://127.0.0.1:8081/v1"
DEFAULT_CACHE = Path.home() / ".cache" / "abstain" / "generations"


def _thresholds(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or not all(0.0 <= v < 1.0 for v in values):
        # Checked before any question is asked: t = 1 would make a mistake infinitely dear.
        raise argparse.ArgumentTypeError("thresholds must be in [0, 1), comma-separated")
    return values


def _common(p: argparse.ArgumentParser) -> None:
    from proxy.evaluation.datasets import SPLITS
    from proxy.evaluation.grading import GRADERS
    from proxy.evaluation.prompts import TEMPLATES

    p.add_argument("--dataset", type=Path, help="question set (JSON Lines)")
    p.add_argument("--model", help="model name to ask (and to record)")
    p.add_argument("--template", default="qa-fewshot", choices=sorted(TEMPLATES))
    p.add_argument("--grader", default="match", choices=sorted(GRADERS))
    p.add_argument("--split", default="all", choices=SPLITS, help="which part of the set")
    p.add_argument("--held-out-fraction", type=float, default=0.4)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="ask at most this many questions")
    p.add_argument("--concurrency", type=int, default=2, help="requests in flight")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--api-key", help="sent as a bearer token (a proxy may need one)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--no-cache", action="store_true", help="ask again, store nothing")
    p.add_argument("--ece-bins", type=int, default=10)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_commands(sub: Any) -> None:
    """Register ``calibrate`` and ``eval`` on the ``abstain`` command's subparsers."""
    cal = sub.add_parser("calibrate", help="fit a calibration file from labelled questions")
    _common(cal)
    cal.add_argument("--from-log", type=Path, help="refit from a decision log with feedback")
    cal.add_argument("--base-url", default=DEFAULT_MODEL_URL, help="the model to ask")
    cal.add_argument(
        "--method",
        help="estimator the scores come from (default: logprobs; with --from-log, the log's)",
    )
    cal.add_argument("--score", help=f"one score to calibrate (default: best of {SCORES})")
    cal.add_argument("--calibrators", default="isotonic,platt,histogram")
    # Brier by default: it weighs a miss equally wherever p lies, as threshold decisions
    # do; log loss is dominated by the rare confident miss near p = 0, far from any t.
    cal.add_argument("--select-by", default="brier", choices=["brier", "log_loss"])
    cal.add_argument("--folds", type=int, default=5)
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--out", type=Path, required=True, help="calibration file to write")
    cal.set_defaults(func=cmd_calibrate)

    ev = sub.add_parser("eval", help="the abstain/right/wrong table, metrics and charts")
    _common(ev)
    ev.add_argument("--policy", type=Path, help="run an in-process proxy with this policy")
    ev.add_argument("--calibration", type=Path, help="use this calibration in every rule")
    ev.add_argument("--upstream-url", help="point the model's upstream here (in-process)")
    ev.add_argument("--base-url", help="an already-running proxy (or, with --direct, model)")
    ev.add_argument("--direct", action="store_true", help="ask the model itself (baseline)")
    ev.add_argument("--thresholds", type=_thresholds, default=[0.0, 0.5, 0.75, 0.9])
    ev.add_argument("--target-error", type=float, default=0.25)
    ev.add_argument("--no-charts", action="store_true")
    ev.add_argument("--out", type=Path, required=True, help="directory for the report")
    ev.set_defaults(func=cmd_eval)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _questions(args: argparse.Namespace) -> Any:
    from proxy.evaluation import datasets

    every = datasets.load_questions(args.dataset)
    return datasets.select(
        every, args.split, args.held_out_fraction, args.split_seed, limit=args.limit
    )


def _ask(args: argparse.Namespace, questions: Any, **where: Any) -> Any:
    from proxy.evaluation import runner
    from proxy.evaluation.datasets import dataset_name
    from proxy.evaluation.prompts import get_template

    path = None
    if not args.no_cache:
        safe_model = args.model.replace("/", "_")
        path = args.cache_dir / f"{dataset_name(args.dataset)}--{safe_model}.jsonl"
    return runner.ask_all(
        questions,
        get_template(args.template),
        model=args.model,
        concurrency=args.concurrency,
        cache=runner.GenerationCache(path),
        api_key=args.api_key,
        max_tokens=args.max_tokens,
        progress=None if args.quiet else sys.stderr,
        **where,
    )


def cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from proxy.confidence.fitting import FITTERS, select
    from proxy.evaluation.calibrate import Labelled, build_calibration, label, ranking_table
    from proxy.evaluation.datasets import DatasetError, dataset_name
    from proxy.evaluation.decision_log import read_log
    from proxy.evaluation.grading import get_grader

    if (args.dataset is None) == (args.from_log is None):
        return _fail("give exactly one of --dataset or --from-log")
    kinds = [k.strip() for k in args.calibrators.split(",") if k.strip()]
    unknown = sorted(set(kinds) - {*FITTERS, "logistic"})
    if unknown or not kinds:
        return _fail(f"unknown calibrators {unknown}; known: {', '.join([*FITTERS, 'logistic'])}")
    method = args.method or "logprobs"
    if args.from_log is not None:
        try:
            logged = read_log(args.from_log, model=args.model)
        except OSError as exc:
            return _fail(f"{args.from_log}: {exc.strerror}")
        print("decision log: " + ", ".join(f"{k} {v}" for k, v in sorted(logged.counts.items())))
        data = Labelled(logged.features, logged.correct)
        model = args.model or (logged.models.most_common(1)[0][0] if logged.models else None)
        if args.method is None and logged.methods:
            method = logged.methods.most_common(1)[0][0]
        fitted_on: dict[str, Any] = {"dataset": f"decision-log:{args.from_log.name}"}
    else:
        if not args.model:
            return _fail("--model is required with --dataset")
        if method != "logprobs":
            return _fail("asking a question set supports --method logprobs only")
        try:
            questions = _questions(args)
        except DatasetError as exc:
            return _fail(str(exc))
        gens = asyncio.run(_ask(args, questions, base_url=args.base_url))
        data = label(questions, gens, get_grader(args.grader))
        model = args.model
        fitted_on = {
            "dataset": dataset_name(args.dataset),
            "split": args.split,
            "template": args.template,
            "grader": args.grader,
        }
        if data.failed:
            print(f"warning: {data.failed} requests failed and were left out", file=sys.stderr)
    scores = [args.score] if args.score else [s for s in SCORES if s in data.features]
    missing = [s for s in scores if s not in data.features]
    if missing or data.n < 2 * args.folds or len(np.unique(data.correct)) < 2:
        return _fail(
            f"cannot fit: {data.n} labelled answers, {int(data.correct.sum())} right"
            + (f", no score {missing}" if missing else "")
        )
    ranked = select(
        data.features,
        data.correct,
        scores=scores,
        kinds=kinds,
        criterion=args.select_by,
        folds=args.folds,
        seed=args.seed,
        ece_bins=args.ece_bins,
    )
    print(f"{data.n} labelled answers, {int(data.correct.sum())} right")
    print(ranking_table([c for c, _ in ranked], args.select_by))
    best, calibrator = ranked[0]
    calibration = build_calibration(
        best, calibrator, method=method, model=model, fitted_on=fitted_on, folds=args.folds
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    calibration.save(args.out)
    print(f"wrote {args.out}: {best.kind} on {best.score}")
    return 0


async def _eval_generations(args: argparse.Namespace, questions: Any) -> tuple[str, Any, Any]:
    from proxy.evaluation import inproc

    if args.direct:
        base = args.base_url or DEFAULT_MODEL_URL
        return "direct", await _ask(args, questions, base_url=base), {"base_url": base}
    if args.base_url:
        tag = "external:" + args.base_url
        gens = await _ask(args, questions, base_url=args.base_url, tag=tag)
        return "external", gens, {"base_url": args.base_url}
    policy = args.policy or Path("policies/default.yaml")
    data = inproc.derived_policy(
        policy, model=args.model, calibration=args.calibration, upstream_url=args.upstream_url
    )
    async with inproc.proxy_transport(data) as transport:
        gens = await _ask(
            args,
            questions,
            base_url="http://abstain-proxy.inproc/v1",
            transport=transport,
            tag=inproc.policy_tag(data),
        )
    meta = {"policy": str(policy), "calibration": str(args.calibration or "from the policy")}
    return "proxy", gens, meta


def cmd_eval(args: argparse.Namespace) -> int:
    from proxy.evaluation.datasets import DatasetError, dataset_name
    from proxy.evaluation.evaluate import answer_records, draw_charts, evaluate
    from proxy.evaluation.grading import get_grader
    from proxy.evaluation.reports import to_markdown, write_report
    from proxy.policy_loader import PolicyError

    if not args.dataset or not args.model:
        return _fail("--dataset and --model are required")
    if args.base_url and args.policy and not args.direct:
        return _fail(
            "--base-url (a running proxy) and --policy (an in-process one) exclude each other"
        )
    try:
        questions = _questions(args)
        mode, gens, meta = asyncio.run(_eval_generations(args, questions))
        report, arrays = evaluate(
            questions,
            gens,
            get_grader(args.grader),
            mode=mode,
            model=args.model,
            dataset=dataset_name(args.dataset),
            thresholds=args.thresholds,
            target_error=args.target_error,
            ece_bins=args.ece_bins,
            meta={**meta, "split": args.split, "template": args.template, "grader": args.grader},
        )
    except (DatasetError, PolicyError, ValueError) as exc:
        return _fail(str(exc))
    print(to_markdown(report))
    paths = write_report(report, args.out)
    answers = args.out / "answers.jsonl"
    records = answer_records(questions, gens, get_grader(args.grader))
    answers.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    paths.append(answers)
    if not args.no_charts:
        paths += draw_charts(
            arrays,
            args.out,
            thresholds=[t for t in args.thresholds if t > 0],
            ece_bins=args.ece_bins,
            title=f"{args.model} on {dataset_name(args.dataset)}",
        )
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
