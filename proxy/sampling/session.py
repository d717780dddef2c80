"""Samples drawn alongside a request's main answer (methods ``consistency`` and ``hybrid``).

A :class:`SamplingSession` starts drawing samples the moment the request is admitted,
alongside the main answer. The main answer's text (and, for hybrid, its logprob
features) reach the sampler through futures when they are known: that is when adaptive
stopping can start comparing. When sampling is done, :meth:`SamplingSession.gather`
clusters each choice with the samples and attaches the agreement to the call's evidence;
judging it is :mod:`proxy.judge`'s job, like every other verdict.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import Any

from proxy.confidence.consistency import Agreement, Matcher, matcher_by_name, score_agreement
from proxy.confidence.stopping import StoppingRule, agreement_cutpoint
from proxy.evidence import CallEvidence
from proxy.judge import confidence_of
from proxy.policy.rules import Rule, SamplingRule
from proxy.protocol import Kind
from proxy.sampling.draw import SamplingParams, SamplingResult, draw_samples
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
    return confidence_of(features, rule)


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

    async def gather(self, evidence: CallEvidence) -> SamplingResult:
        """Wait for the samples and attach them, with each choice's agreement, to ``evidence``.

        The first choice's text and logprob scores are the main answer that adaptive
        stopping compares with. Agreement is left out when too few samples came back: the
        judge then follows the rule's ``on_sampling_error``.
        """
        if evidence.choices:
            first = evidence.choices[0]
            self.main_answer(first.text, first.scores)
        result = await self.result()
        agreements: list[Agreement | None] = [None] * len(evidence.choices)
        if result.ok:
            majority = self.sampling.show == "majority"
            agreements = [
                await self._agreement(None if majority else choice.text, result.samples)
                for choice in evidence.choices
            ]
        evidence.add_samples(result, agreements)
        return result

    async def _agreement(self, reference: str | None, samples: tuple[str, ...]) -> Agreement:
        if self.matcher.runs_model:
            # An embedding model is CPU work: keep it off the event loop.
            return await asyncio.to_thread(score_agreement, reference, samples, self.matcher)
        return score_agreement(reference, samples, self.matcher)
