"""Draw extra sampled answers from an upstream, in rounds, stopping when settled.

:func:`draw_samples` asks the upstream for up to ``samples`` extra answers at a sampling
temperature: one request with ``n`` per round when the upstream honours ``n``, else
concurrent single requests bounded by a semaphore. After each round it clusters what
came back with the reference answer and asks the :mod:`~proxy.confidence.stopping` rule
whether the decision is settled.

Failures: an error or timeout costs its samples (they are not retried, so cost stays
bounded); a first round that fails entirely ends sampling, since the upstream is likely
down. The result says how many failed, and ``ok`` tells whether enough came back to
decide (``params.min_samples``), so the caller can fall back otherwise. Cancellation: every
request runs in a TaskGroup owned by the call, so cancelling the awaiting task (a client
that disconnects) cancels every in-flight sample request.

Pure of the web framework: it sees upstreams only through their protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from proxy.confidence.consistency import EXACT, Agreement, Matcher, score_agreement
from proxy.confidence.stopping import StopCheck, StoppingRule, check
from proxy.errors import UpstreamTimeout
from proxy.protocol import Kind, choice_text

if TYPE_CHECKING:
    from proxy.upstream.base import Upstream

#: Request fields a sample must not inherit: a fixed seed would make every sample the
#: greedy answer again, and samples need neither logprobs nor streaming nor the prompt.
_DROPPED_FIELDS = ("stream", "stream_options", "logprobs", "top_logprobs", "seed", "n")
_DROPPED_COMPLETION_FIELDS = ("best_of", "echo")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample; the policy sets these."""

    #: the budget: extra samples drawn at most
    samples: int = 8
    temperature: float = 1.0
    #: samples per round; the stopping rule is consulted between rounds
    round_size: int = 2
    #: concurrent upstream calls per request (without ``n`` support)
    max_concurrency: int = 4
    #: samples that must come back to decide at all; also the fewest before stopping early
    min_samples: int = 2
    #: seconds for all rounds together; samples still out then count as timed out
    timeout: float | None = 30.0
    #: None follows ``upstream.supports_n``; True/False overrides it
    use_n: bool | None = None
    #: cap on each sample's length (None keeps the client's)
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.samples < 1 or self.round_size < 1 or self.max_concurrency < 1:
            raise ValueError("samples, round_size and max_concurrency must be >= 1")
        if not 1 <= self.min_samples <= self.samples:
            raise ValueError("min_samples must lie in [1, samples]")


@dataclass(frozen=True, slots=True)
class SamplingResult:
    """What sampling produced and what it cost."""

    samples: tuple[str, ...]
    budget: int
    min_samples: int
    #: extra upstream requests made (failed ones included)
    upstream_requests: int
    #: completion tokens of the sample requests, from ``usage`` where reported
    completion_tokens: int
    #: stopped before the budget because the decision was settled
    early_stopped: bool
    #: the last stopping check, when one ran
    last_check: StopCheck | None
    #: samples lost to errors (timeouts included) and to timeouts alone
    failures: int = 0
    timeouts: int = 0
    #: the upstream was asked for ``n`` > 1 and returned fewer choices
    n_ignored: bool = False
    errors: tuple[str, ...] = field(default=())

    @property
    def used(self) -> int:
        """Samples that came back (the ``samples used`` metric and verdict field)."""
        return len(self.samples)

    @property
    def ok(self) -> bool:
        """Enough samples came back to decide on; else the caller falls back."""
        return self.used >= self.min_samples


@dataclass(slots=True)
class _Outcome:
    texts: list[str] = field(default_factory=list)
    failed: int = 0
    timed_out: int = 0
    tokens: int = 0
    #: asked-for samples neither returned nor failed (``n`` ignored): still in the budget
    undrawn: int = 0
    error: str | None = None


def sample_body(kind: Kind, body: dict[str, Any], params: SamplingParams) -> dict[str, Any]:
    """The upstream body for sample requests, derived from the main request's body."""
    out = {k: v for k, v in body.items() if k not in _DROPPED_FIELDS}
    if kind == "completions":
        for key in _DROPPED_COMPLETION_FIELDS:
            out.pop(key, None)
    out["temperature"] = params.temperature
    if params.max_tokens is not None:
        out["max_completion_tokens" if "max_completion_tokens" in out else "max_tokens"] = (
            params.max_tokens
        )
    return out


class _Run:
    """One request's sampling: shared state for its rounds."""

    def __init__(
        self, upstream: Upstream, kind: Kind, body: dict[str, Any], params: SamplingParams
    ) -> None:
        self.upstream, self.kind, self.params = upstream, kind, params
        self.body = sample_body(kind, body, params)
        self.use_n = upstream.supports_n if params.use_n is None else params.use_n
        self.semaphore = asyncio.Semaphore(params.max_concurrency)
        loop = asyncio.get_running_loop()
        self.deadline = None if params.timeout is None else loop.time() + params.timeout
        self.requests = 0

    async def attempt(self, n: int) -> _Outcome:
        body = self.body if n == 1 else {**self.body, "n": n}
        try:
            # The deadline covers the wait for a semaphore slot too.
            async with asyncio.timeout_at(self.deadline), self.semaphore:
                self.requests += 1
                response = await self.upstream.complete(self.kind, body)
        except (TimeoutError, UpstreamTimeout):
            return _Outcome(failed=n, timed_out=n, error="timeout")
        except Exception as exc:  # any upstream failure costs only these samples
            return _Outcome(failed=n, error=getattr(exc, "kind", type(exc).__name__))
        return self.read(response, n)

    def read(self, response: dict[str, Any], n: int) -> _Outcome:
        choices = response.get("choices")
        choices = choices if isinstance(choices, list) else []
        usage = response.get("usage")
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        out = _Outcome(tokens=tokens if isinstance(tokens, int) else 0)
        if not choices:
            out.failed, out.error = n, "malformed"
            return out
        for choice in choices[:n]:
            text = choice_text(self.kind, choice) if isinstance(choice, dict) else None
            if text is None:
                out.failed += 1  # a tool call or empty content says nothing to compare
                out.error = "no_text"
            else:
                out.texts.append(text)
        out.undrawn = max(0, n - len(choices))
        return out

    async def round(self, size: int) -> list[_Outcome]:
        if self.use_n and size > 1:
            jobs = [self.attempt(size)]
        else:
            jobs = [self.attempt(1) for _ in range(size)]
        # The TaskGroup cancels every job when the awaiting task is cancelled.
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(job) for job in jobs]
        return [t.result() for t in tasks]

    def expired(self) -> bool:
        return self.deadline is not None and asyncio.get_running_loop().time() >= self.deadline


X = TypeVar("X")


async def _settled(value: X | asyncio.Future[X | None] | None) -> X | None:
    """The value, awaiting it first when the caller passed a future of it."""
    if not isinstance(value, asyncio.Future):
        return value
    try:
        # Shielded: cancelling the sampler must not cancel the caller's main request.
        return await asyncio.shield(value)
    except Exception:
        return None  # the main request failed; its owner reports that, not us


async def _agreement(
    reference: str | None, samples: Sequence[str], matcher: Matcher[Any]
) -> Agreement:
    if matcher.runs_model:
        return await asyncio.to_thread(score_agreement, reference, samples, matcher)
    return score_agreement(reference, samples, matcher)


async def draw_samples(
    upstream: Upstream,
    kind: Kind,
    body: dict[str, Any],
    params: SamplingParams,
    *,
    reference: str | asyncio.Future[str | None] | None = None,
    matcher: Matcher[Any] = EXACT,
    stopping: StoppingRule | asyncio.Future[StoppingRule | None] | None = None,
) -> SamplingResult:
    """Draw up to ``params.samples`` extra answers, stopping early when settled.

    ``body`` is the upstream body of the main request (model already mapped); it is not
    modified. ``reference`` is the answer the client will see, or a future of its text
    so sampling can start while the main answer is still being generated (it is awaited
    only at the first stopping check); without it the majority answer stands in.
    ``stopping=None`` draws the whole budget (fixed k). ``stopping`` may be a future too,
    for a cut-point that depends on the main answer (hybrid: its logprob features); a
    future that resolves to None or fails also means fixed k.
    """
    run = _Run(upstream, kind, body, params)
    texts: list[str] = []
    failed = timed_out = tokens = attempted = 0
    errors: list[str] = []
    n_ignored = early = False
    last: StopCheck | None = None
    first = True
    while attempted < params.samples and not run.expired():
        if len(texts) + params.samples - attempted < params.min_samples:
            break  # too many failures: the minimum is out of reach, stop spending
        # The first round draws the minimum at once: no decision is possible before it.
        size = max(params.round_size, params.min_samples) if first else params.round_size
        size = min(size, params.samples - attempted)
        first = False
        for outcome in await run.round(size):
            texts.extend(outcome.texts)
            failed += outcome.failed
            timed_out += outcome.timed_out
            tokens += outcome.tokens
            if outcome.error:
                errors.append(outcome.error)
            if outcome.undrawn:
                n_ignored, run.use_n = True, False  # fall back to single requests
        # Undrawn samples (``n`` ignored) stay in the budget for the next rounds.
        attempted = len(texts) + failed
        if failed and not texts:
            break  # a whole round failed and nothing came back: likely down, fall back
        rule = await _settled(stopping) if len(texts) >= params.min_samples else None
        if rule is not None:
            agreement = await _agreement(await _settled(reference), texts, matcher)
            last = check(
                rule,
                agreeing=agreement.agreeing,
                drawn=agreement.samples,
                budget=params.samples - failed,
            )
            if last.stop and attempted < params.samples:
                early = True
                break
    return SamplingResult(
        samples=tuple(texts),
        budget=params.samples,
        min_samples=params.min_samples,
        upstream_requests=run.requests,
        completion_tokens=tokens,
        early_stopped=early,
        last_check=last,
        failures=failed,
        timeouts=timed_out,
        n_ignored=n_ignored,
        errors=tuple(errors),
    )
