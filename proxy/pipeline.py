"""The request pipeline: upstream call → scores → calibration → decision → action.

Routes hand over a validated :class:`Call`; the pipeline returns the (rewritten)
response and one :class:`~proxy.judge.Verdict` per choice. It knows the OpenAI wire
format only through :mod:`proxy.protocol` and upstreams only through their protocol.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.confidence.logprobs import scores_from_choice
from proxy.errors import UpstreamError
from proxy.judge import Verdict, judge, unjudged
from proxy.metrics import Metrics
from proxy.policy import Route, Rule
from proxy.protocol import (
    Kind,
    choice_text,
    choices_of,
    client_wants_logprobs,
    is_tool_call,
    set_choice_text,
    upstream_body,
    wants_json,
)
from proxy.sampled import Matchers, SamplingSession
from proxy.sampled import observe as observe_sampling
from proxy.sampling import SamplingResult
from proxy.upstream.base import Upstream, UpstreamPool

Scores = Mapping[str, float]


@dataclass(slots=True)
class Call:
    """One validated client request, with who sent it and the rule that applies."""

    kind: Kind
    body: dict[str, Any]
    tenant: str
    route: Route
    rule: Rule
    started: float = field(default_factory=time.perf_counter)
    upstream_seconds: float = 0.0
    #: the id of the response sent to the client (for feedback), once known
    response_id: str | None = None
    #: the model's own answers before any rewrite, kept only when the rule logs text
    answers: list[str | None] | None = None

    @property
    def client_logprobs(self) -> bool:
        return client_wants_logprobs(self.kind, self.body)

    @property
    def uses_logprobs(self) -> bool:
        return self.rule.method in ("logprobs", "hybrid")


def apply_verdict(kind: Kind, choice: dict[str, Any], verdict: Verdict, rule: Rule) -> None:
    """Rewrite one choice according to its verdict (in place)."""
    if verdict.decision == "abstain":
        set_choice_text(kind, choice, rule.abstention_message)
    elif verdict.decision == "hedge":
        set_choice_text(kind, choice, rule.hedge_prefix + (choice_text(kind, choice) or ""))


def skip_reason(call: Call, *, tool_call: bool) -> str | None:
    """Why a choice is passed through unjudged, or None when it is judged."""
    rule = call.rule
    if rule.method == "none":
        return "the policy's method is none"
    if tool_call and not rule.judge_tool_calls:
        return "tool calls are not judged by this policy"
    if wants_json(call.body) and not rule.judge_json:
        return "JSON-mode answers are not judged by this policy"
    return None


class Pipeline:
    """Runs calls against upstreams and judges their answers."""

    def __init__(self, upstreams: UpstreamPool, metrics: Metrics) -> None:
        self.upstreams = upstreams
        self.metrics = metrics
        self.matchers = Matchers()

    def upstream_request(self, call: Call) -> tuple[Upstream, dict[str, Any]]:
        upstream = self.upstreams.get(call.route.upstream)
        top = call.rule.top_logprobs if call.uses_logprobs else None
        return upstream, upstream_body(call.kind, call.body, call.route.upstream_model, top)

    def start_sampling(
        self, call: Call, upstream: Upstream, body: dict[str, Any]
    ) -> SamplingSession | None:
        """Start drawing samples now, alongside the main answer, when the method needs them."""
        sampling = call.rule.sampling
        if sampling is None or skip_reason(call, tool_call=False) is not None:
            return None
        matcher = self.matchers.get(sampling)
        return SamplingSession(call.rule, upstream, call.kind, body, matcher)

    def upstream_failed(self, upstream: Upstream, exc: UpstreamError) -> None:
        self.metrics.upstream_errors.labels(upstream.name, exc.kind).inc()

    def observe_upstream(self, call: Call, upstream: Upstream, seconds: float) -> None:
        call.upstream_seconds += seconds
        self.metrics.upstream_latency.labels(upstream.name, call.route.model).observe(seconds)

    async def complete(self, call: Call) -> tuple[dict[str, Any], list[Verdict]]:
        """A non-streaming completion, judged and rewritten."""
        upstream, body = self.upstream_request(call)
        body.pop("stream", None)
        body.pop("stream_options", None)
        session = self.start_sampling(call, upstream, body)
        t0 = time.perf_counter()
        try:
            try:
                response = await self._fetch(upstream, call.kind, body)
            finally:
                self.observe_upstream(call, upstream, time.perf_counter() - t0)
            verdicts = await self.judge_response(call, response, session)
        except UpstreamError as exc:
            self.upstream_failed(upstream, exc)
            raise
        finally:
            # Failed, cancelled (client gone) or done: no sample may outlive the request.
            if session is not None:
                session.cancel()
        return response, verdicts

    @staticmethod
    async def _fetch(upstream: Upstream, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        """One completion; ``n > 1`` fans out when the upstream ignores ``n``."""
        n = body.get("n") or 1
        if n == 1 or upstream.supports_n:
            return await upstream.complete(kind, body)
        single = {**body, "n": 1}
        parts = await asyncio.gather(*(upstream.complete(kind, single) for _ in range(n)))
        return merge_completions(parts)

    async def sample(
        self, call: Call, session: SamplingSession, text: str | None, logprob_scores: Scores
    ) -> SamplingResult:
        """Hand the main answer to the sampler and wait for its samples."""
        session.main_answer(text, logprob_scores)
        result = await session.result()
        observe_sampling(self.metrics, call.tenant, call.route.model, call.rule, result)
        return result

    def judge_choice(
        self,
        call: Call,
        *,
        text: str | None,
        logprob_scores: Scores,
        tool_call: bool,
        session: SamplingSession | None = None,
        samples: SamplingResult | None = None,
    ) -> tuple[Verdict, str | None]:
        """One choice's verdict, and the answer to show instead when the rule says so."""
        reason = skip_reason(call, tool_call=tool_call)
        if reason is not None:
            return unjudged(call.rule, reason), None
        if session is not None and samples is not None:
            return session.judge(text, logprob_scores, samples)
        return judge(logprob_scores, call.rule), None

    async def judge_response(
        self, call: Call, response: dict[str, Any], session: SamplingSession | None = None
    ) -> list[Verdict]:
        """Judge every choice, apply each verdict, attach them, and count them."""
        kind, keep_logprobs = call.kind, call.client_logprobs
        choices = choices_of(response)
        call.response_id = ensure_id(response)
        if call.rule.log_text:
            call.answers = [choice_text(kind, c) for c in choices]
        scores = [scores_from_choice(c.get("logprobs")) for c in choices]
        samples = None
        if session is not None and choices:
            samples = await self.sample(call, session, choice_text(kind, choices[0]), scores[0])
        verdicts = []
        for choice, lp in zip(choices, scores, strict=True):
            verdict, shown = self.judge_choice(
                call,
                text=choice_text(kind, choice),
                logprob_scores=lp,
                tool_call=is_tool_call(kind, choice),
                session=session,
                samples=samples,
            )
            if shown is not None and len(choices) == 1:
                set_choice_text(kind, choice, shown)
            apply_verdict(kind, choice, verdict, call.rule)
            if not keep_logprobs and "logprobs" in choice:
                choice["logprobs"] = None
            choice["abstention"] = verdict.to_dict()
            verdicts.append(verdict)
        if verdicts:
            response["abstention"] = choices[0]["abstention"]
        self.observe_verdicts(call, verdicts)
        return verdicts

    def observe_verdicts(self, call: Call, verdicts: Iterable[Verdict]) -> None:
        m, tenant, model = self.metrics, call.tenant, call.route.model
        for v in verdicts:
            calibrated = "true" if v.calibrated else "false"
            m.choices.labels(tenant, model, v.decision, calibrated).inc()
            if v.confidence is None:
                continue
            m.confidence.labels(tenant, model, calibrated).observe(v.confidence)
            miss = 1.0 - v.confidence
            if v.delivered:
                m.expected_errors.labels(tenant, model).inc(miss)
            else:
                m.expected_errors_avoided.labels(tenant, model).inc(miss)


def merge_completions(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Join single-choice completions into one response with choices 0..n-1."""
    merged = dict(parts[0])
    choices = []
    for i, part in enumerate(parts):
        for choice in choices_of(part):
            choices.append({**choice, "index": i})
    merged["choices"] = choices
    usages: list[dict[str, Any]] = [u for p in parts if isinstance(u := p.get("usage"), dict)]
    if usages:
        # The prompt is the same for every part: count it once, like a real n request.
        completion = sum(int(u.get("completion_tokens") or 0) for u in usages)
        prompt = int(usages[0].get("prompt_tokens") or 0)
        merged["usage"] = {**usages[0], "completion_tokens": completion,
                           "total_tokens": prompt + completion}  # fmt: skip
    return merged


def ensure_id(response: dict[str, Any]) -> str:
    """The response's id, minted when the upstream gave none: feedback refers to it."""
    rid = response.get("id")
    if not isinstance(rid, str) or not rid:
        rid = response["id"] = f"abst-{uuid.uuid4().hex}"
    return rid


def verdict_headers(verdicts: list[Verdict]) -> dict[str, str]:
    """The verdict of the first choice, as response headers."""
    if not verdicts:
        return {}
    v = verdicts[0]
    headers: dict[str, str] = {"x-abstention-decision": v.decision}
    if v.confidence is not None:
        headers["x-abstention-confidence"] = f"{v.confidence:.4f}"
    return headers
