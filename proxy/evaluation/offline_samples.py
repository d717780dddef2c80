"""Extra sampled answers per question, for ``abstain calibrate --method consistency|hybrid``.

Each question is asked ``k`` more times at a sampling temperature through the proxy's own
sampler (:func:`proxy.sampling.draw_samples` over an :class:`OpenAIHTTPUpstream`), so the
samples are derived from the question's request exactly as the proxy derives them when it
serves (same dropped fields, same temperature override): a calibration fitted on these
agreement features is one the proxy can apply. The budget is fixed (no early stopping):
the calibration is fitted on ``k`` samples, the budget the policy then names.

The agreement features of an answer come from clustering it with its samples
(:func:`proxy.confidence.consistency.score_agreement`) under the matcher the policy will
use; the hybrid adds the answer's logprob features
(:data:`~proxy.confidence.features.HYBRID_FEATURES`).

Samples are cached on disk, one JSON line per question, keyed by the question id, ``k``
and a hash of the sample request (model, prompt, temperature, max tokens), appended as
questions finish: an interrupted run resumes, and refitting (another matcher, another
threshold) asks nothing. benchmarks/consistency_eval.py shares this cache and its keys.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from proxy.confidence.consistency import Matcher, matcher_by_name, score_agreement
from proxy.evaluation import runner
from proxy.evaluation.datasets import CACHE_DIR, Question
from proxy.evaluation.prompts import Template
from proxy.policy.schema import UpstreamConfig
from proxy.sampling.draw import SamplingParams, draw_samples, sample_body
from proxy.upstream.openai_http import OpenAIHTTPUpstream
from proxy.upstream.wire import HttpxWire

#: Where sampled answers are cached by default (the benchmark's cache too).
SAMPLE_CACHE_DIR = CACHE_DIR / "consistency"


# The key travels in an injected environment mapping, never the process's: the upstream
# reads keys only from the variable a config names.
_KEY_VARIABLE = "ABSTAIN_SAMPLING_KEY"


class SampleCache:
    """Each question's drawn samples, in drawn order, one JSON line per question.

    ``path=None`` keeps entries in memory only (``--no-cache``).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        if path is not None and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.entries[row["key"]] = row
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # torn by an interrupted run: that question is drawn again

    def add(self, row: dict[str, Any]) -> None:
        self.entries[row["key"]] = row
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


def sample_cache_path(directory: Path, dataset: str, model: str) -> Path:
    """The cache file for one dataset and model (the benchmark's name for it)."""
    return directory / f"{dataset}--{model.replace('/', '_')}--samples.jsonl"


def sampling_params(temperature: float, samples: int, *, use_n: bool = False) -> SamplingParams:
    """A fixed budget of ``samples``, drawn whole (no stopping rule is passed)."""
    # One request at a time per question: a local server serialises requests anyway, and
    # the generous deadline must not cost samples on a slow machine. With ``n`` the whole
    # budget goes in one request.
    return SamplingParams(
        samples=samples,
        temperature=temperature,
        round_size=samples if use_n else 2,
        max_concurrency=1,
        min_samples=min(2, samples),
        timeout=600.0,
        use_n=use_n,
    )


def sample_key(
    question: Question,
    template: Template,
    model: str,
    params: SamplingParams,
    *,
    max_tokens: int = 16,
) -> str:
    """The cache key of one question's samples: id, budget and the exact sample request."""
    base = template.body(question.question, model, max_tokens=max_tokens)
    body = sample_body(template.endpoint, base, params)
    return runner.request_key(f"samples:{question.id}:k{params.samples}", template.path, body)


@dataclass
class Drawn:
    """Samples by question id; questions whose samples kept failing are in ``failed``."""

    samples: dict[str, list[str]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    completion_tokens: dict[str, int] = field(default_factory=dict)


async def draw_all(
    questions: Sequence[Question],
    template: Template,
    params: SamplingParams,
    *,
    model: str,
    base_url: str,
    cache: SampleCache,
    concurrency: int = 2,
    max_tokens: int = 16,
    api_key: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    attempts: int = 3,
    progress: TextIO | None = sys.stderr,
) -> Drawn:
    """Draw (or read back) ``params.samples`` samples per question through the sampler.

    A question is kept only with its whole budget, so every agreement feature is measured
    on the same number of samples; one that loses samples is drawn again whole, up to
    ``attempts`` times, then reported in :attr:`Drawn.failed` and not cached.
    """
    env = {_KEY_VARIABLE: api_key} if api_key else {}
    config = UpstreamConfig(
        base_url=base_url,
        supports_n=bool(params.use_n),
        api_key_env=_KEY_VARIABLE if api_key else None,
    )
    bar = runner.Progress(len(questions), f"samples T={params.temperature}", progress)
    limit = asyncio.Semaphore(max(1, concurrency))
    out = Drawn()
    async with transport or httpx.AsyncHTTPTransport() as upstream_transport:
        upstream = OpenAIHTTPUpstream("calibrate", config, HttpxWire(upstream_transport), env)

        async def one(q: Question) -> None:
            key = sample_key(q, template, model, params, max_tokens=max_tokens)
            hit = cache.entries.get(key)
            if hit is not None:
                out.samples[q.id] = list(hit["samples"])
                out.completion_tokens[q.id] = int(hit.get("completion_tokens", 0))
                bar.step(cached=True)
                return
            body = template.body(q.question, model, max_tokens=max_tokens)
            async with limit:
                for _ in range(attempts):
                    result = await draw_samples(upstream, template.endpoint, body, params)
                    if result.used == params.samples:
                        break
            bar.step()
            if result.used < params.samples:
                out.failed[q.id] = ", ".join(sorted(set(result.errors))) or "too few samples"
                return
            out.samples[q.id] = list(result.samples)
            out.completion_tokens[q.id] = result.completion_tokens
            cache.add(
                {
                    "key": key,
                    "id": q.id,
                    "model": model,
                    "temperature": params.temperature,
                    "samples": list(result.samples),
                    "completion_tokens": result.completion_tokens,
                    "upstream_requests": result.upstream_requests,
                }
            )

        await asyncio.gather(*(one(q) for q in questions))
    return out


def load_matcher(
    name: str, threshold: float | None = None, *, torch_threads: int | None = None
) -> Matcher[Any]:
    """The named matcher, with the embedding model loaded now rather than mid-run.

    ``torch_threads`` sets PyTorch's intra-op threads, a process-wide setting: only a
    command that owns its process (the CLI, a benchmark) should pass it.
    """
    if name != "embedding":
        return matcher_by_name(name)
    if torch_threads is not None:
        # Imported only here: torch is the embedding extra's, absent from a base install.
        try:
            import torch
        except ImportError:
            pass  # load() below reports the missing extra with the install command
        else:
            torch.set_num_threads(torch_threads)
    from proxy.confidence.embedding import DEFAULT_THRESHOLD, EmbeddingMatcher

    matcher = EmbeddingMatcher(threshold=DEFAULT_THRESHOLD if threshold is None else threshold)
    matcher.load()
    return matcher


def agreement_features(
    reference: str | None, samples: Sequence[str], matcher: Matcher[Any]
) -> dict[str, float]:
    """The agreement scores of ``reference`` among ``samples`` (empty without samples)."""
    return score_agreement(reference, samples, matcher).features()


def features_by_id(
    generations: Sequence[runner.Generation],
    samples: Mapping[str, Sequence[str]],
    matcher: Matcher[Any],
) -> dict[str, dict[str, float]]:
    """Logprob and agreement features of every answered question that has samples.

    The reference is the answer as graded, as the proxy compares the answer it returns.
    """
    out: dict[str, dict[str, float]] = {}
    for g in generations:
        if g.error is None and g.id in samples:
            out[g.id] = {**g.scores, **agreement_features(g.text, samples[g.id], matcher)}
    return out


def sampling_record(params: SamplingParams, matcher: Matcher[Any]) -> dict[str, Any]:
    """How the agreement features were made, in the policy's field names.

    Written into a calibration's ``fitted_on``: the policy must sample and match the same
    way, or the fitted mapping is applied to features it never saw.
    """
    record: dict[str, Any] = {
        "samples": params.samples,
        "sample_temperature": params.temperature,
        "matcher": matcher.name,
    }
    threshold = getattr(matcher, "threshold", None)
    if threshold is not None:
        record["embedding_threshold"] = threshold
    return record


def sample_features(
    questions: Sequence[Question],
    generations: Sequence[runner.Generation],
    template: Template,
    params: SamplingParams,
    matcher: Matcher[Any],
    **draw: Any,
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Draw samples for every answered question; its features by id, and the record.

    ``draw`` goes to :func:`draw_all` (``model``, ``base_url``, ``cache`` ...). Questions
    whose samples keep failing are reported on stderr and left without features.
    """
    answered = [q for q, g in zip(questions, generations, strict=True) if g.error is None]
    drawn = asyncio.run(draw_all(answered, template, params, **draw))
    if drawn.failed:
        qid, why = next(iter(drawn.failed.items()))
        print(
            f"warning: samples kept failing for {len(drawn.failed)} questions "
            f"({qid}: {why}); they are left out",
            file=sys.stderr,
        )
    return features_by_id(generations, drawn.samples, matcher), sampling_record(params, matcher)
