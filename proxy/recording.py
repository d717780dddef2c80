"""What happened to each request, recorded in one place: metrics and the decision log.

The request path calls a :class:`Recorder` at three moments: when verdicts are made
(:meth:`~Recorder.verdicts`), when samples were drawn (:meth:`~Recorder.sampling`), and
once when the request is over, successfully or not (:meth:`~Recorder.finished`, or
:meth:`~Recorder.rejected` for a request refused before it had a tenant and a route).
Upstream time is summed on the call as it is spent and observed here, once per request.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from proxy.call import Call
from proxy.decision_log import DecisionLog
from proxy.drift_monitor import DriftMonitor
from proxy.errors import UpstreamError
from proxy.metrics import Metrics
from proxy.sampling.draw import SamplingResult
from proxy.verdict import Verdict


class Recorder:
    """Metrics and decision-log records for calls; both injected (and the drift monitor,
    which defaults to one exporting on ``metrics``)."""

    def __init__(
        self, metrics: Metrics, decisions: DecisionLog, drift: DriftMonitor | None = None
    ) -> None:
        self.metrics = metrics
        self.decisions = decisions
        self.drift = drift if drift is not None else DriftMonitor(metrics)

    def rejected(self, route: str, tenant: str, model: str, status: int, started: float) -> None:
        """A request refused at admission (bad body, key, model): no call was made."""
        self.metrics.requests.labels(tenant, model, route, "none", str(status)).inc()
        self.metrics.overhead.labels(route).observe(max(0.0, time.perf_counter() - started))

    def upstream_failed(self, call: Call, exc: UpstreamError) -> None:
        if exc.upstream_fault:
            self.metrics.upstream_errors.labels(call.route.upstream, exc.kind).inc()

    def verdicts(self, call: Call, verdicts: Iterable[Verdict]) -> None:
        """The verdicts just made: decisions, confidence, expected errors."""
        m, tenant, model = self.metrics, call.tenant, call.route.model
        for v in verdicts:
            calibrated = "true" if v.calibrated else "false"
            m.choices.labels(tenant, model, v.decision, calibrated).inc()
            if v.sentences is not None:
                self._sentences(call, v)
            self.drift.observe(tenant, model, call.rule.calibration, v)
            if v.traffic_drift is not None:
                m.drifted_answers.labels(tenant, model).inc()
            if v.confidence is None:
                continue
            m.confidence.labels(tenant, model, calibrated).observe(v.confidence)
            miss = 1.0 - v.confidence
            if v.delivered:
                m.expected_errors.labels(tenant, model).inc(miss)
            else:
                m.expected_errors_avoided.labels(tenant, model).inc(miss)

    def _sentences(self, call: Call, verdict: Verdict) -> None:
        m, tenant, model = self.metrics, call.tenant, call.route.model
        for part in verdict.sentences or ():
            m.sentences.labels(tenant, model, part.decision).inc()
            if part.confidence is not None and part.decision in ("answer", "hedge", "annotate"):
                m.expected_sentence_errors.labels(tenant, model).inc(1.0 - part.confidence)

    def generation_stopped(
        self, call: Call, generated_tokens: int, saved_at_most: int | None = None
    ) -> None:
        """A sentence stream stopped its generation at a withheld sentence, after
        ``generated_tokens`` completion tokens; ``saved_at_most`` bounds the tokens it
        saved (None when the request set no ``max_tokens``)."""
        m, tenant, model = self.metrics, call.tenant, call.route.model
        m.generation_stops.labels(tenant, model).inc()
        m.generation_stop_tokens.labels(tenant, model).inc(generated_tokens)
        if saved_at_most is not None:
            m.generation_tokens_saved_bound.labels(tenant, model).inc(saved_at_most)

    def sampling(self, call: Call, result: SamplingResult) -> None:
        """The sampling cost of one request."""
        m, tenant, model = self.metrics, call.tenant, call.route.model
        m.samples_used.labels(tenant, model).observe(result.used)
        m.sampling_requests.labels(tenant, model).inc(result.upstream_requests)
        m.sampling_tokens.labels(tenant, model).inc(result.completion_tokens)
        if result.early_stopped:
            m.early_stops.labels(tenant, model).inc()
        sampling = call.rule.sampling
        if not result.ok and sampling is not None:
            m.sampling_fallbacks.labels(tenant, model, sampling.on_error).inc()

    def finished(
        self, call: Call, verdicts: list[Verdict], status: int, ttfb: float | None = None
    ) -> None:
        """The request is over: count it, time it, and log its verdicts."""
        m, route = self.metrics, call.kind
        decision = verdicts[0].decision if verdicts else "none"
        m.requests.labels(call.tenant, call.route.model, route, decision, str(status)).inc()
        elapsed = time.perf_counter() - call.started
        m.overhead.labels(route).observe(max(0.0, elapsed - call.upstream_seconds))
        if call.upstream_called:
            m.upstream_latency.labels(call.route.upstream, call.route.model).observe(
                call.upstream_seconds
            )
        if ttfb is not None:
            m.ttfb.labels(route, call.rule.streaming).observe(ttfb)
        if call.response_id is not None and verdicts:
            texts = None
            if call.rule.log_text:
                texts = {
                    "prompt": call.body.get("messages", call.body.get("prompt")),
                    "answers": call.answers,
                }
            self.decisions.record(call.response_id, call.tenant, call.route.model, verdicts, texts)
