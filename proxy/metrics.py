"""Every Prometheus metric the proxy exports, defined in one place.

Labels are bounded: tenant names and model names come from the policy file, never from
API keys or request text, so a client cannot blow up cardinality or leak a secret.

Ops guide (PromQL):

* estimated hallucination rate among delivered answers::

    sum by (tenant, model) (rate(abstain_expected_errors_total[5m]))
      / sum by (tenant, model)
          (rate(abstain_choices_total{decision=~"answer|hedge|annotate|partial"}[5m]))

* abstention rate::

    sum by (tenant, model) (rate(abstain_choices_total{decision="abstain"}[5m]))
      / sum by (tenant, model) (rate(abstain_choices_total{decision!="unjudged"}[5m]))
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: 1 ms to 120 s: proxy overhead lives at the bottom, slow generations at the top.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
CONFIDENCE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
#: Feedback is counted per confidence bin so a dashboard can draw a live reliability diagram.
FEEDBACK_BINS = tuple(f"{0.1 * i:.1f}" for i in range(10))
SAMPLE_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 32)


class Metrics:
    """The proxy's metrics, registered on an injected registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "abstain_requests",
            "Requests by tenant, model, route, decision of the first choice, and HTTP status.",
            ["tenant", "model", "route", "decision", "status"],
            registry=r,
        )
        self.limited = Counter(
            "abstain_limited_requests",
            "Requests refused by a limit: max_n, max_upstream_calls (400), "
            "max_concurrent_requests, rate_limit_per_second (429).",
            ["tenant", "limit"],
            registry=r,
        )
        self.late_refusals = Counter(
            "abstain_limit_late_refusals",
            "Requests the shared limiter (Redis) refused after their upstream call had "
            "started (admission overlapped with it; the call was cancelled). Also in "
            "abstain_limited_requests_total.",
            ["tenant"],
            registry=r,
        )
        self.in_flight = Gauge(
            "abstain_in_flight_requests",
            "Completion requests holding a tenant lease now (admitted, not yet finished).",
            ["tenant"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.choices = Counter(
            "abstain_choices",
            "Judged answers (choices) by decision: answer, abstain, hedge, annotate, "
            "unjudged, partial (judged by sentence, some sentences withheld).",
            ["tenant", "model", "decision", "calibrated"],
            registry=r,
        )
        self.sentences = Counter(
            "abstain_sentences",
            "Parts of answers judged sentence by sentence, by decision (code is unjudged).",
            ["tenant", "model", "decision"],
            registry=r,
        )
        self.expected_sentence_errors = Counter(
            "abstain_sentence_expected_errors",
            "Sum of 1 - P(correct) over the sentences delivered (granularity sentence).",
            ["tenant", "model"],
            registry=r,
        )
        self.generation_stops = Counter(
            "abstain_generation_stops",
            "Streams whose generation was stopped at a withheld sentence (stop_on_withheld).",
            ["tenant", "model"],
            registry=r,
        )
        self.generation_stop_tokens = Counter(
            "abstain_generation_stop_tokens",
            "Completion tokens the stopped streams had generated when they were stopped "
            "(every choice; counted as received by the proxy, so the upstream may have "
            "generated a few more before the cancellation reached it).",
            ["tenant", "model"],
            registry=r,
        )
        self.generation_tokens_saved_bound = Counter(
            "abstain_generation_tokens_saved_bound",
            "An upper bound on the completion tokens stop_on_withheld saved: n x max_tokens "
            "minus the tokens generated, for stopped streams whose request set max_tokens "
            "(or max_completion_tokens); the model may have ended sooner on its own. "
            "Stopped requests without max_tokens add nothing.",
            ["tenant", "model"],
            registry=r,
        )
        self.confidence = Histogram(
            "abstain_confidence",
            "P(correct) of each judged answer (the raw score when calibrated=false).",
            ["tenant", "model", "calibrated"],
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.expected_errors = Counter(
            "abstain_expected_errors",
            "Sum of 1 - P(correct) over delivered answers: expected hallucinations.",
            ["tenant", "model"],
            registry=r,
        )
        self.expected_errors_avoided = Counter(
            "abstain_expected_errors_avoided",
            "Sum of 1 - P(correct) over withheld answers: hallucinations avoided by abstaining.",
            ["tenant", "model"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "abstain_upstream_latency_seconds",
            "Time spent waiting on the upstream model.",
            ["upstream", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "abstain_overhead_seconds",
            "Time the proxy itself adds: total request time minus upstream time.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "abstain_time_to_first_byte_seconds",
            "Time from request to the first body byte sent to the client (streaming).",
            ["route", "mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "abstain_upstream_errors",
            "Upstream failures by kind: connect, timeout, status_4xx/5xx, malformed.",
            ["upstream", "kind"],
            registry=r,
        )
        self.upstream_retries = Counter(
            "abstain_upstream_retries",
            "Upstream attempts retried, by the reason of the failed one (connect, status_503...).",
            ["upstream", "reason"],
            registry=r,
        )
        self.upstream_circuit_state = Gauge(
            "abstain_upstream_circuit_state",
            "Each upstream's circuit breaker: 0 closed, 1 half-open, 2 open (fails fast).",
            ["upstream"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.policy_reloads = Counter(
            "abstain_policy_reloads",
            "Policy reload attempts by result (success, failure).",
            ["result"],
            registry=r,
        )
        self.policy_loaded = Gauge(
            "abstain_policy_last_reload_success",
            "1 when the last policy (re)load succeeded, 0 when it was rejected.",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.feedback = Counter(
            "abstain_feedback",
            "Observed outcomes from /v1/feedback by predicted-confidence bin.",
            ["tenant", "model", "bin", "correct"],
            registry=r,
        )
        self.sentence_feedback = Counter(
            "abstain_sentence_feedback",
            "Observed outcomes of single sentences from /v1/feedback (with 'sentence') "
            "by predicted-confidence bin.",
            ["tenant", "model", "bin", "correct"],
            registry=r,
        )
        self.decision_log_errors = Counter(
            "abstain_decision_log_errors",
            "Decision-log or feedback records that could not be written (one per record lost).",
            registry=r,
        )
        self.samples_used = Histogram(
            "abstain_samples_used",
            "Extra samples drawn per judged request (consistency and hybrid methods).",
            ["tenant", "model"],
            buckets=SAMPLE_BUCKETS,
            registry=r,
        )
        self.sampling_requests = Counter(
            "abstain_sampling_upstream_requests",
            "Extra upstream requests made to draw samples.",
            ["tenant", "model"],
            registry=r,
        )
        self.sampling_tokens = Counter(
            "abstain_sampling_tokens",
            "Completion tokens spent on extra samples.",
            ["tenant", "model"],
            registry=r,
        )
        self.early_stops = Counter(
            "abstain_sampling_early_stops",
            "Requests whose sampling stopped early because the decision was settled.",
            ["tenant", "model"],
            registry=r,
        )
        self.sampling_fallbacks = Counter(
            "abstain_sampling_fallbacks",
            "Requests where too few samples came back and the fallback decided.",
            ["tenant", "model", "fallback"],
            registry=r,
        )
        # Shared state (issue 14)
        self.shared_state_errors = Counter(
            "abstain_shared_state_errors",
            "Redis calls that failed, timed out, or were skipped while backing off after a "
            "failure, by operation (limit_acquire, limit_release, feedback_remember, "
            "feedback_lookup, feedback_claim, recalibration_label, recalibration_read, "
            "recalibration_swap, recalibration_refresh).",
            ["operation"],
            registry=r,
        )
        self.shared_state_up = Gauge(
            "abstain_shared_state_up",
            "1 while the last Redis call succeeded; 0 while Redis is unreachable (limits "
            "are local, feedback answers 503) or not configured (ABSTAIN_REDIS_URL unset).",
            registry=r,
            multiprocess_mode="liveall",
        )
        # Drift (issue 12.1)
        # Per worker (proxy.drift_monitor): each worker compares its own window of recent
        # answers with the calibration's reference, so across workers the largest counts.
        self.input_drift_psi = Gauge(
            "abstain_input_drift_psi",
            "Population stability index of one calibration input over the last answers "
            "against the calibration's reference distribution (set once the window holds "
            "enough answers).",
            ["tenant", "model", "input"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.input_drift = Gauge(
            "abstain_input_drift",
            "The largest abstain_input_drift_psi over the calibration's inputs.",
            ["tenant", "model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.input_drift_window = Gauge(
            "abstain_input_drift_window_answers",
            "Answers in the drift monitor's window (the sample the PSI is computed on).",
            ["tenant", "model"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.out_of_distribution = Counter(
            "abstain_out_of_distribution",
            "Judged answers with an input outside the calibration's fitted range.",
            ["tenant", "model"],
            registry=r,
        )
        self.drifted_answers = Counter(
            "abstain_drifted_answers",
            "Answers judged while the tenant's traffic read drifted (a rule's drift_psi).",
            ["tenant", "model"],
            registry=r,
        )
        # Recalibration (issue 12.2)
        self.recalibration_info = Gauge(
            "abstain_recalibration_info",
            "1 for the recalibration version in service per tenant and model, 0 for the ones "
            "it replaced (no series: the shipped calibration answers).",
            ["tenant", "model", "version"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.recalibration_labels = Gauge(
            "abstain_recalibration_labels",
            "Feedback labels stored for recalibration, per tenant and model.",
            ["tenant", "model"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.recalibration_swaps = Counter(
            "abstain_recalibration_swaps",
            "Recalibrations put in service: refits that beat the map in service on held-out "
            "labels.",
            ["tenant", "model"],
            registry=r,
        )
        self.recalibration_refits = Counter(
            "abstain_recalibration_refits",
            "Recalibration refits by result: swapped, kept (not better on held-out labels), "
            "failed.",
            ["tenant", "model", "result"],
            registry=r,
        )

    def feedback_bin(self, p: float) -> str:
        """The label of the 0.1-wide confidence bin ``p`` falls in."""
        return FEEDBACK_BINS[min(9, max(0, int(p * 10)))]
