"""``abstain calibrate`` and ``abstain eval``: argument parsing and the order of the steps.

::

    abstain calibrate --dataset SET --model NAME [--base-url URL] [--score NAME]
                      [--calibrators isotonic,platt,histogram] --out FILE
    abstain calibrate --dataset SET --model NAME --method consistency|hybrid
                      [--samples 8] [--temperature 0.7] [--matcher exact|numeric|embedding]
                      [--embedding-threshold 0.8] --out FILE
    abstain calibrate --from-log PATH [--model NAME] [--score NAME]
                      [--granularity answer|sentence] --out FILE
    abstain eval --dataset SET --model NAME [--policy FILE | --base-url URL | --direct]
                 [--thresholds 0,0.5,0.75,0.9] --out DIR

``SET`` is a packaged question set by short name (``facts-dev``, ``facts-extra``,
``nq-open``, ``facts-multi-dev``, ``facts-multi-test``:
:data:`proxy.evaluation.datasets.PACKAGED`) or the path of a JSON Lines file.

A multi-claim set (rows with ``claims``, :mod:`proxy.evaluation.claims`) is recognised
from its rows: every sentence of every answer is then one labelled example, scored as
the proxy scores sentences, and the calibration records ``granularity: sentence``; its
default template is ``sentences-fewshot``, and ``eval`` judges it with every rule at
``granularity: sentence``.

The work lives in :mod:`~proxy.evaluation.dataset_labels` (asking and labelling),
:mod:`~proxy.evaluation.calibrate`, :mod:`~proxy.evaluation.evaluate`,
:mod:`~proxy.evaluation.runner` and :mod:`~proxy.evaluation.offline_samples`; this module
only wires them to the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from proxy.confidence.consistency import MATCHERS
from proxy.evaluation import dataset_labels
from proxy.evaluation.datasets import CACHE_DIR, PACKAGED
from proxy.local_model import DEFAULT_PORT

METHODS = ("logprobs", "consistency", "hybrid")

DEFAULT_MODEL_URL = f"http://127.0.0.1:{DEFAULT_PORT}/v1"
#: Greedy answers' cache: abstain calibrate/eval's default, and the benchmarks'.
DEFAULT_CACHE = CACHE_DIR / "generations"


def _thresholds(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or not all(0.0 <= v < 1.0 for v in values):
        # Checked before any question is asked: t = 1 would make a mistake infinitely dear.
        raise argparse.ArgumentTypeError("thresholds must be in [0, 1), comma-separated")
    return values


def _within(kind: type[float] | type[int], low: float, high: float) -> Any:
    def parse(text: str) -> float | int:
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must lie in [{low}, {high}]")
        return value

    return parse


def _sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling, for --method consistency and hybrid")
    samples_help = "extra samples per question (the policy's samples)"
    g.add_argument("--samples", type=_within(int, 1, 64), default=8, help=samples_help)
    # Above 0: at temperature 0 every sample would repeat the greedy answer.
    temperature_help = "sampling temperature (the policy's sample_temperature)"
    g.add_argument(
        "--temperature", type=_within(float, 0.01, 2.0), default=0.7, help=temperature_help
    )
    g.add_argument("--matcher", default="exact", choices=MATCHERS)
    threshold_help = "cosine at which the embedding matcher merges answers (default 0.8)"
    g.add_argument("--embedding-threshold", type=_within(float, -1, 1), help=threshold_help)
    g.add_argument("--use-n", action="store_true", help="ask for every sample in one request")
    cache_help = f"sample cache (default {CACHE_DIR / 'consistency'}, the benchmark's too)"
    g.add_argument("--samples-cache-dir", type=Path, help=cache_help)


def _common(p: argparse.ArgumentParser) -> None:
    from proxy.evaluation.datasets import SPLITS
    from proxy.evaluation.grading import GRADERS
    from proxy.evaluation.prompts import TEMPLATES

    dataset_help = f"question set: a packaged one ({', '.join(PACKAGED)}) or a JSON Lines file"
    p.add_argument("--dataset", help=dataset_help)
    p.add_argument("--model", help="model name to ask (and to record)")
    template_help = "default: qa-fewshot, or sentences-fewshot for a multi-claim set"
    p.add_argument("--template", choices=sorted(TEMPLATES), help=template_help)
    # Set from the dataset's rows (dataset_labels.questions_of); never for a decision log.
    p.set_defaults(multi_claim=False)
    p.add_argument("--grader", default="match", choices=sorted(GRADERS))
    p.add_argument("--split", default="all", choices=SPLITS, help="which part of the set")
    p.add_argument("--held-out-fraction", type=float, default=0.4)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="ask at most this many questions")
    p.add_argument("--concurrency", type=int, default=2, help="requests in flight")
    p.add_argument("--max-tokens", type=int, help="answer budget (default: the template's)")
    p.add_argument("--api-key", help="sent as a bearer token (a proxy may need one)")
    p.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE, help="answer cache (default %(default)s)"
    )
    p.add_argument("--no-cache", action="store_true", help="ask again, store nothing")
    p.add_argument("--ece-bins", type=int, default=10)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_commands(sub: Any) -> None:
    """Register ``calibrate`` and ``eval`` on the ``abstain`` command's subparsers."""
    cal = sub.add_parser("calibrate", help="fit a calibration file from labelled questions")
    _common(cal)
    cal.add_argument("--from-log", type=Path, help="refit from a decision log with feedback")
    cal.add_argument(
        "--granularity",
        choices=("answer", "sentence"),
        default="answer",
        help="with --from-log: fit on the labels of whole answers, or of single sentences "
        "(feedback with 'sentence', joined to that part's scores)",
    )
    cal.add_argument("--base-url", default=DEFAULT_MODEL_URL, help="the model to ask")
    cal.add_argument(
        "--method",
        choices=METHODS,
        help="estimator the scores come from (default: logprobs; with --from-log, the log's); "
        "hybrid fits one logistic model over logprob and agreement features",
    )
    cal.add_argument(
        "--score", help="one score to calibrate (default: the best of the method's scores)"
    )
    cal.add_argument(
        "--calibrators",
        default="isotonic,platt,histogram,logistic",
        help="candidates; logistic combines several scores (not for hybrid, always logistic)",
    )
    # Brier by default: it weighs a miss equally wherever p lies, as threshold decisions
    # do; log loss is dominated by the rare confident miss near p = 0, far from any t.
    cal.add_argument("--select-by", default="brier", choices=["brier", "log_loss"])
    text_help = (
        "add the answer-text inputs (question_overlap, answer_min_logprob) to the "
        "logistic candidate: better where live traffic is "
        "worded and asked like the fit set, worse calibrated where it is not "
        "(docs/calibration.md, shift)"
    )
    cal.add_argument("--text-scores", action="store_true", help=text_help)
    cal.add_argument("--folds", type=int, default=5)
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--out", type=Path, required=True, help="calibration file to write")
    _sampling(cal)
    cal.set_defaults(func=cmd_calibrate)

    ev = sub.add_parser("eval", help="the abstain/right/wrong table, metrics and charts")
    _common(ev)
    ev.add_argument("--policy", type=Path, help="run an in-process proxy with this policy")
    ev.add_argument("--calibration", type=Path, help="use this calibration in every rule")
    ev.add_argument("--upstream-url", help="point the model's upstream here (in-process)")
    ev.add_argument("--base-url", help="an already-running proxy (or, with --direct, model)")
    ev.add_argument("--direct", action="store_true", help="ask the model itself (baseline)")
    # 0.5-0.9 are the paper's confidence targets; a model that knows little answers
    # almost nothing there, so 0.1 and 0.25 (a wrong answer costs 1/9 or 1/3 of a point)
    # show the rest of its trade between errors and answers.
    ev.add_argument("--thresholds", type=_thresholds, default=[0.0, 0.1, 0.25, 0.5, 0.75, 0.9])
    ev.add_argument("--target-error", type=float, default=0.25)
    ev.add_argument("--no-charts", action="store_true")
    ev.add_argument("--out", type=Path, required=True, help="directory for the report")
    ev.set_defaults(func=cmd_eval)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def cmd_calibrate(args: argparse.Namespace) -> int:
    from proxy.confidence.calibration import Logistic
    from proxy.confidence.features import SENTENCE_LOGISTIC_FEATURES, TEXT_SCORES
    from proxy.confidence.fitting import FITTERS
    from proxy.evaluation.calibrate import (
        Labelled,
        build_calibration,
        fit_method,
        hybrid_warning,
        ranking_table,
        weights_line,
    )
    from proxy.evaluation.log_labels import read_log

    if (args.dataset is None) == (args.from_log is None):
        return _fail("give exactly one of --dataset or --from-log")
    kinds = [k.strip() for k in args.calibrators.split(",") if k.strip()]
    unknown = sorted(set(kinds) - {*FITTERS, "logistic"})
    if unknown or not kinds:
        return _fail(f"unknown calibrators {unknown}; known: {', '.join([*FITTERS, 'logistic'])}")
    if args.method == "hybrid" and args.score:
        return _fail("--method hybrid fits one logistic model over fixed features; drop --score")
    method = args.method or "logprobs"
    if args.granularity == "sentence" and args.from_log is None:
        return _fail("--granularity sentence is for --from-log; a question set says its own")
    if args.from_log is not None:
        sentences = args.granularity == "sentence"
        try:
            logged = read_log(args.from_log, model=args.model, sentences=sentences)
        except OSError as exc:
            return _fail(f"{args.from_log}: {exc.strerror}")
        print("decision log: " + ", ".join(f"{k} {v}" for k, v in sorted(logged.counts.items())))
        data = Labelled(logged.features, logged.correct, groups=logged.groups)
        model = args.model or (logged.models.most_common(1)[0][0] if logged.models else None)
        if args.method is None and logged.methods:
            method = logged.methods.most_common(1)[0][0]
        fitted_on: dict[str, Any] = {"dataset": f"decision-log:{args.from_log.name}"}
        if sentences:
            # Scored as the proxy scores sentences (every token), and fitted like the
            # shipped sentence calibration: check-policy matches the unit to the rule's.
            args.multi_claim = True
            fitted_on.update(granularity="sentence", sentence_tokens="all")
    else:
        if not args.model:
            return _fail("--model is required with --dataset")
        asked = dataset_labels.from_dataset(args, method)
        if isinstance(asked, str):
            return _fail(asked)
        (data, fitted_on), model = asked, args.model
    try:
        ranked = fit_method(
            data,
            method,
            score=args.score,
            kinds=kinds,
            criterion=args.select_by,
            folds=args.folds,
            seed=args.seed,
            ece_bins=args.ece_bins,
            extra_inputs=TEXT_SCORES if args.text_scores else (),
            base_inputs=SENTENCE_LOGISTIC_FEATURES if args.multi_claim else None,
        )
    except ValueError as exc:
        return _fail(f"cannot fit: {exc}")
    lacking = [n for n in TEXT_SCORES if n not in data.features] if args.text_scores else []
    if lacking:
        # A decision log holds them only for answers judged by a calibration reading them.
        print(f"warning: the labelled answers lack {', '.join(lacking)}: left out of the "
              "logistic candidate", file=sys.stderr)  # fmt: skip
    unit = "sentences" if args.multi_claim else "answers"
    print(f"{data.n} labelled {unit}, {int(data.correct.sum())} right")
    # The hybrid is written whatever its rank: the rows after it show each half alone.
    criterion = None if method == "hybrid" and not args.score else args.select_by
    print(ranking_table([c for c, _ in ranked], criterion))
    best, calibrator = ranked[0]
    if method == "hybrid" and isinstance(calibrator, Logistic):
        print(f"hybrid {weights_line(calibrator)}")
        warning = hybrid_warning(calibrator)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    calibration = build_calibration(
        best,
        calibrator,
        method=method,
        model=model,
        fitted_on=fitted_on,
        folds=args.folds,
        data=data,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    calibration.save(args.out)
    print(f"wrote {args.out}: {best.kind} on {'+'.join(best.features) or best.score}")
    return 0


async def _eval_generations(args: argparse.Namespace, questions: Any) -> tuple[str, Any, Any]:
    from proxy.evaluation import inproc

    if args.direct:
        base = args.base_url or DEFAULT_MODEL_URL
        return (
            "direct",
            await dataset_labels.ask(args, questions, base_url=base),
            {"base_url": base},
        )
    if args.base_url:
        tag = "external:" + args.base_url
        gens = await dataset_labels.ask(args, questions, base_url=args.base_url, tag=tag)
        return "external", gens, {"base_url": args.base_url}
    policy = args.policy or Path("policies/default.yaml")
    data = inproc.derived_policy(
        policy,
        model=args.model,
        calibration=args.calibration,
        upstream_url=args.upstream_url,
        granularity="sentence" if args.multi_claim else None,
    )
    async with inproc.proxy_transport(data) as transport:
        gens = await dataset_labels.ask(
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
    from proxy.evaluation.prompts import get_template
    from proxy.evaluation.reports import to_markdown, write_report
    from proxy.policy.loading import PolicyError

    if not args.dataset or not args.model:
        return _fail("--dataset and --model are required")
    if args.base_url and args.policy and not args.direct:
        return _fail(
            "--base-url (a running proxy) and --policy (an in-process one) exclude each other"
        )
    try:
        questions = dataset_labels.questions_of(args)
        mode, gens, meta = asyncio.run(_eval_generations(args, questions))
        options: dict[str, Any] = {
            "mode": mode,
            "model": args.model,
            "dataset": dataset_name(args.dataset),
            "thresholds": args.thresholds,
            "target_error": args.target_error,
            "ece_bins": args.ece_bins,
            "meta": {**meta, "split": args.split, "template": args.template, "grader": args.grader},
        }
        grader = get_grader(args.grader)
        if args.multi_claim:
            from proxy.evaluation import claims_eval

            template = get_template(args.template)
            report, arrays, labels = claims_eval.evaluate(
                questions, gens, grader, template, **options
            )
            records = claims_eval.answer_records(questions, gens, labels)
        else:
            report, arrays = evaluate(questions, gens, grader, **options)
            records = answer_records(questions, gens, grader)
    except (DatasetError, PolicyError, ValueError) as exc:
        return _fail(str(exc))
    print(to_markdown(report))
    paths = write_report(report, args.out)
    answers = args.out / "answers.jsonl"
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
