"""Judging answers by agreement with extra samples (methods ``consistency`` and ``hybrid``).

A :class:`SamplingSession` starts drawing samples the moment the request is admitted,
alongside the main answer. The main answer's text (and, for hybrid, its logprob
features) reach the sampler through futures when they are known: that is when adaptive
stopping can start comparing. When sampling is done, each choice is clustered with the
samples and judged on the agreement features (plus the logprob features for hybrid).

If too few samples come back, the rule's ``on_sampling_error`` decides: judge on logprobs
when the answer has them ("fallback"), answer, abstain, or fail the request (502).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from proxy.confidence.consistency import Matcher, matcher_by_name, score_agreement
from proxy.confidence.stopping import StoppingRule, agreement_cutpoint, expected_final_share
from proxy.errors import UpstreamError
from proxy.judge import Verdict, judge
from proxy.metrics import Metrics
from proxy.policy import Rule, SamplingRule
from proxy.protocol import Kind
from proxy.sampling import SamplingParams, SamplingResult, draw_samples
from proxy.upstream.base import Upstream


class Matchers:
    """Matchers built once per configuration: the embedding model loads only once."""

    def __init__(self) -> None:
        self._made: dict[tuple[str, float], Matcher[Any]] = {}

    def get(self, sampling: SamplingRule) -> Matcher[Any]:
        key = (sampling.matcher, sampling.embedding_threshold)
        if key not in self._made:
            options = {"threshold": sampling.embedding_threshold} if key[0] == "embedding" else {}
            self._made[key] = matcher_by_name(sampling.matcher, **options)
        return self._made[key]


def _binary_entropy(a: float) -> float:
    return -sum(p * math.log(p) for p in (a, 1.0 - a) if 0.0 < p < 1.0)


def _p_at_agreement(rule: Rule, base: Mapping[str, float], agreement: float) -> float | None:
    """P(correct) the rule would give an answer whose samples agree at rate ``agreement``.

    Other agreement features are set as if the disagreeing samples formed one cluster,
    the least-entropy case; they move with the agreement, so the map stays monotone.
    """
    features = {
        **base,
        "agreement": agreement,
        "agreement_smoothed": agreement,
        "majority_share": max(agreement, 1.0 - agreement),
        "semantic_entropy": -_binary_entropy(agreement),
    }
    return judge(features, rule).confidence


def stopping_rule(rule: Rule, base: Mapping[str, float]) -> StoppingRule | None:
    """The adaptive stopping rule for an answer with these logprob features."""
    sampling = rule.sampling
    if sampling is None or not sampling.adaptive:
        return None
    cut = agreement_cutpoint(lambda a: _p_at_agreement(rule, base, a), rule.threshold)
    return StoppingRule(threshold=cut, risk=sampling.risk)


class SamplingSession:
    """Samples for one request, drawn concurrently with its main answer."""

    def __init__(
        self,
        rule: Rule,
        upstream: Upstream,
        kind: Kind,
        body: dict[str, Any],
        matcher: Matcher[Any],
    ) -> None:
        assert rule.sampling is not None
        self.rule = rule
        self.sampling = rule.sampling
        self.matcher = matcher
        loop = asyncio.get_running_loop()
        self._reference: asyncio.Future[str | None] = loop.create_future()
        self._stopping: asyncio.Future[StoppingRule | None] = loop.create_future()
        s = self.sampling
        params = SamplingParams(
            samples=s.samples,
            temperature=s.temperature,
            round_size=s.round_size,
            max_concurrency=s.concurrency,
            min_samples=s.min_samples,
            timeout=s.timeout,
            max_tokens=s.max_tokens,
        )
        self._task = asyncio.ensure_future(
            draw_samples(
                upstream,
                kind,
                body,
                params,
                # Showing the majority: stop on the majority's agreement, not the request's.
                reference=None if s.show == "majority" else self._reference,
                matcher=matcher,
                stopping=self._stopping if s.adaptive else None,
            )
        )

    def main_answer(self, text: str | None, logprob_scores: Mapping[str, float]) -> None:
        """The main answer is known: adaptive stopping may start comparing with it."""
        if not self._reference.done():
            self._reference.set_result(text)
        if not self._stopping.done():
            self._stopping.set_result(stopping_rule(self.rule, logprob_scores))

    def cancel(self) -> None:
        self._task.cancel()
        for fut in (self._reference, self._stopping):
            if not fut.done():
                fut.cancel()

    async def result(self) -> SamplingResult:
        try:
            return await self._task
        finally:
            self.cancel()

    def judge(
        self, text: str | None, logprob_scores: Mapping[str, float], result: SamplingResult
    ) -> tuple[Verdict, str | None]:
        """The verdict on one choice, and the majority answer when the rule shows it."""
        if not result.ok:
            return self._fallback(logprob_scores, result), None
        agreement = score_agreement(
            None if self.sampling.show == "majority" else text, result.samples, self.matcher
        )
        features = {**logprob_scores, **agreement.features()}
        if result.early_stopped and agreement.samples:
            # Judge what the stopping rule predicted for the full budget, so the verdict
            # and the reason sampling stopped cannot disagree.
            budget = max(agreement.samples, result.budget - result.failures)
            features["agreement"] = expected_final_share(
                agreement.agreeing, agreement.samples, budget
            )
        verdict = judge(features, self.rule, samples=result.used)
        shown = agreement.majority_answer if self.sampling.show == "majority" else None
        return verdict, shown

    def _fallback(self, logprob_scores: Mapping[str, float], result: SamplingResult) -> Verdict:
        rule, how = self.rule, self.sampling.on_error
        reason = f"only {result.used} of {result.min_samples} required samples came back"
        if how == "error":
            raise UpstreamError("Too few samples came back to judge the answer.", kind="sampling")
        if how == "fallback" and rule.logprob_score in logprob_scores:
            lp_rule = dataclasses.replace(
                rule, method="logprobs", score=rule.logprob_score, calibration=None
            )
            verdict = judge(logprob_scores, lp_rule, samples=result.used)
        else:
            verdict = judge({}, rule, samples=result.used)
            if how in ("answer", "abstain"):
                verdict.decision = "answer" if how == "answer" else rule.action
        verdict.reason = f"{reason}; decided by on_sampling_error={how}"
        return verdict


def observe(metrics: Metrics, tenant: str, model: str, rule: Rule, result: SamplingResult) -> None:
    """The sampling cost of one request."""
    metrics.samples_used.labels(tenant, model).observe(result.used)
    metrics.sampling_requests.labels(tenant, model).inc(result.upstream_requests)
    metrics.sampling_tokens.labels(tenant, model).inc(result.completion_tokens)
    if result.early_stopped:
        metrics.early_stops.labels(tenant, model).inc()
    if not result.ok and rule.sampling is not None:
        metrics.sampling_fallbacks.labels(tenant, model, rule.sampling.on_error).inc()
