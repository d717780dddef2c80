"""Labelled answers from a question set, for ``abstain calibrate`` and ``abstain eval``.

The questions are asked of the model (through the answer cache), the answers graded,
and, for a consistency or hybrid fit, samples drawn; a multi-claim set is labelled
sentence by sentence. The decision log's labels are :mod:`proxy.evaluation.log_labels`.
These functions read the command line's parsed arguments (:mod:`proxy.evaluation.commands`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any


def questions_of(args: argparse.Namespace) -> Any:
    """The questions asked, and the template and token budget they are asked with
    (resolved here: a multi-claim set defaults to the one-sentence-per-fact template)."""
    from proxy.evaluation import datasets
    from proxy.evaluation.prompts import get_template

    every = datasets.load_questions(args.dataset)
    args.multi_claim = datasets.is_multi_claim(every)
    if args.template is None:
        args.template = "sentences-fewshot" if args.multi_claim else "qa-fewshot"
    if args.max_tokens is None:
        args.max_tokens = get_template(args.template).max_tokens
    return datasets.select(
        every, args.split, args.held_out_fraction, args.split_seed, limit=args.limit
    )


def ask(args: argparse.Namespace, questions: Any, **where: Any) -> Any:
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


def from_dataset(args: argparse.Namespace, method: str) -> Any:
    """(labelled answers, fitted_on) from asking the question set, or an error message."""
    from proxy.confidence.embedding import EmbeddingUnavailable
    from proxy.evaluation import offline_samples
    from proxy.evaluation.calibrate import label
    from proxy.evaluation.datasets import DatasetError, dataset_name
    from proxy.evaluation.grading import get_grader
    from proxy.evaluation.prompts import get_template

    matcher = None
    try:
        questions = questions_of(args)
        if args.multi_claim and method != "logprobs":
            return (
                f"{args.dataset} is a multi-claim set, judged sentence by sentence: only "
                "--method logprobs scores sentences (on their own tokens)"
            )
        if method != "logprobs":
            # Loaded before anything is asked: a missing extra fails now, not after an
            # hour of sampling. One torch thread was 2.5x faster than torch's default on a
            # small shared host (proxy.confidence.embedding); this command owns its process.
            matcher = offline_samples.load_matcher(
                args.matcher, args.embedding_threshold, torch_threads=1
            )
    except (DatasetError, EmbeddingUnavailable) as exc:
        return str(exc)
    name = dataset_name(args.dataset)
    gens = asyncio.run(ask(args, questions, base_url=args.base_url))
    fitted_on: dict[str, Any] = {"dataset": name, "split": args.split}
    if args.split != "all":
        fitted_on.update(held_out_fraction=args.held_out_fraction, split_seed=args.split_seed)
    fitted_on.update(template=args.template, grader=args.grader)
    features = None
    if matcher is not None:
        where = args.samples_cache_dir or offline_samples.SAMPLE_CACHE_DIR
        cache = (
            None if args.no_cache else offline_samples.sample_cache_path(where, name, args.model)
        )
        features, drawn_with = offline_samples.sample_features(
            questions,
            gens,
            get_template(args.template),
            offline_samples.sampling_params(args.temperature, args.samples, use_n=args.use_n),
            matcher,
            model=args.model,
            base_url=args.base_url,
            cache=offline_samples.SampleCache(cache),
            concurrency=args.concurrency,
            max_tokens=args.max_tokens,
            api_key=args.api_key,
            progress=None if args.quiet else sys.stderr,
        )
        fitted_on.update(drawn_with)
    if args.multi_claim:
        from proxy.evaluation import claims

        template = get_template(args.template)
        data, stats = claims.label(questions, gens, get_grader(args.grader), template, args.model)
        for line in stats.lines():
            print(line)
        # The proxy's sentence scores: every token of the sentence.
        fitted_on.update(granularity="sentence", sentence_tokens="all")
    else:
        data = label(questions, gens, get_grader(args.grader), features)
    if data.failed:
        print(f"warning: {data.failed} questions failed and were left out", file=sys.stderr)
    return data, fitted_on
