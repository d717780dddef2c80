"""Per-tenant rules, compiled from a policy file, and the answer/abstain decision.

The policy file says where each model lives (``upstreams``, ``models``), how confident an
answer must be (``defaults``, overridden per model and per ``tenants``), and who is who
(``auth``); its schema is :mod:`proxy.policy.schema`. A loaded policy is compiled once
into a :class:`Policy` that answers the hot-path questions (which tenant, which route,
which rule) without re-validating anything.

Pure: no web or HTTP imports. File reading lives in :mod:`proxy.policy.loading`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from proxy.confidence.calibration import Calibration
from proxy.confidence.features import needing_top_k
from proxy.confidence.recalibration import RecalibrationRule
from proxy.confidence.risk_control import RiskChoice, choose_threshold
from proxy.policy.schema import (
    Action,
    Granularity,
    MatcherName,
    Method,
    PolicyFile,
    RuleFields,
    SamplingFallback,
    StreamMode,
    UpstreamConfig,
)
from proxy.verdict import Decision

__all__ = [
    "Policy",
    "PolicyFile",
    "Route",
    "Rule",
    "SamplingRule",
    "UpstreamConfig",
    "decide",
]


@dataclass(frozen=True, slots=True)
class Rule:
    """The effective, fully resolved rule for one tenant and model."""

    tenant: str
    threshold: float
    action: Action
    method: Method
    score: str
    calibration: Calibration | None
    abstention_message: str
    hedge_prefix: str
    streaming: StreamMode
    judge_tool_calls: bool
    judge_json: bool
    on_missing_score: Literal["answer", "abstain"]
    top_logprobs: int
    keepalive_seconds: float
    log_text: bool
    #: how ``threshold`` was chosen for a ``target_error`` (bound, coverage, labels), as the
    #: verdict and check-policy show it; None for a rule that names its threshold
    risk: Mapping[str, Any] | None = None
    consistency_score: str = "agreement"
    #: judge the answer whole, or sentence by sentence (``streaming: sentence`` implies it)
    granularity: Granularity = "answer"
    sentence_abstention: str = "(not sure about this part)"
    sentence_hedge: str = "(not sure) "
    stop_on_withheld: bool = False
    #: the logprob score, even when a calibration or the method reads another one
    logprob_score: str = "min_logprob"
    #: online recalibration from feedback (issue 12.2); None: the calibration as shipped
    recalibrate: RecalibrationRule | None = None
    sampling: SamplingRule | None = None
    #: the stricter threshold for answers outside the calibration's reference (issue 12.1)
    ood_threshold: float | None = None
    #: the PSI at which the tenant's traffic as a whole is judged at ``ood_threshold``
    drift_psi: float | None = None
    #: set per call while the traffic reads drifted (proxy.drift_monitor.TrafficDrift),
    #: as the verdict shows it; None otherwise
    traffic_drift: Mapping[str, Any] | None = None
    # Limits, enforced by proxy.limits; None means unlimited.
    max_n: int = 16
    max_upstream_calls: int = 64
    max_concurrent_requests: int | None = None
    rate_limit_per_second: float | None = None
    rate_limit_burst: int | None = None


@dataclass(frozen=True, slots=True)
class SamplingRule:
    """How a consistency or hybrid rule samples (None on a logprobs rule)."""

    samples: int
    temperature: float
    round_size: int
    concurrency: int
    min_samples: int
    timeout: float
    max_tokens: int | None
    adaptive: bool
    risk: float
    matcher: MatcherName
    embedding_threshold: float
    show: Literal["requested", "majority"]
    on_error: SamplingFallback


@dataclass(frozen=True, slots=True)
class Route:
    """Where a client's model name goes."""

    model: str
    upstream: str
    upstream_model: str


_RULE_KEYS = tuple(RuleFields.model_fields)


class Policy:
    """A validated policy, compiled for the hot path."""

    def __init__(
        self,
        spec: PolicyFile,
        calibrations: Mapping[str, Calibration],
        *,
        source: str = "<memory>",
    ) -> None:
        self.spec = spec
        self.source = source
        self._calibrations = dict(calibrations)
        self._keys = [
            (bytes.fromhex(h), name)
            for name, tenant in spec.tenants.items()
            for h in tenant.api_key_sha256
        ]
        self._routes = {
            name: Route(name, r.upstream, r.upstream_model or name)
            for name, r in spec.models.items()
        }
        self._rules: dict[tuple[str | None, str], Rule] = {}
        self._risk: dict[tuple[int, float, float], RiskChoice] = {}

    @property
    def model_names(self) -> list[str]:
        return list(self._routes)

    def warnings(self) -> list[str]:
        """Rules that apply a calibration to features it was not fitted on.

        A calibration of agreement features is only valid for the sampling it was fitted
        with (its file records the matcher, temperature and budget); a rule that samples
        differently, or a method that does not produce the calibrated score, makes its
        P(correct) meaningless. Not errors: a user may mean it, but should know.
        """
        found = []
        for tenant in (None, *self.spec.tenants):
            for model in self._routes:
                rule = self.rule(tenant, model)
                where = f"models.{model}" + (f" for tenant {tenant}" if tenant else "")
                found += [f"{where}: {w}" for w in calibration_mismatches(rule)]
        return sorted(set(found))

    def risk_report(self) -> list[str]:
        """For every rule with a ``target_error``: the threshold chosen and what it rests on."""
        lines = []
        for tenant in (None, *self.spec.tenants):
            for model in self._routes:
                risk = self.rule(tenant, model).risk
                if risk is None or risk.get("threshold") is None:
                    continue
                where = f"models.{model}" + (f" for tenant {tenant}" if tenant else "")
                lines.append(
                    f"{where}: target_error {risk['target_error']:g} at "
                    f"{risk['confidence']:.0%} -> threshold {risk['threshold']:g} "
                    f"(error bound {risk['error_bound']:.3f}, answers "
                    f"{risk['coverage']:.1%} of {risk['labels']} labelled answers"
                    + (f" from {risk['source']}" if risk.get("source") else "")
                    + ")"
                )
        return sorted(set(lines))

    def tenant_for(self, api_key: str | None) -> str | None:
        """The tenant owning ``api_key``; the default tenant or None when unknown.

        Every stored hash is compared, in constant time, so the time taken does not
        reveal which tenant (if any) a key is close to.
        """
        found: str | None = None
        if api_key:
            digest = hashlib.sha256(api_key.encode()).digest()
            for stored, name in self._keys:
                if hmac.compare_digest(stored, digest):
                    found = name
        if found is None and self.spec.auth.unknown_keys == "default":
            return self.spec.auth.default_tenant
        return found

    def route(self, model: str) -> Route | None:
        return self._routes.get(model)

    def _risk_choice(
        self, calibration: Calibration | None, target: float, confidence: float
    ) -> RiskChoice:
        """The threshold for a target error, from the calibration's validation labels."""
        key = (id(calibration), target, confidence)
        if key not in self._risk:
            labels = calibration.validation if calibration is not None else {}
            self._risk[key] = choose_threshold(
                labels.get("confidence") or [],
                labels.get("correct") or [],
                target_error=target,
                target_confidence=confidence,
                source=str(labels.get("source", "")),
            )
        return self._risk[key]

    def rule(self, tenant: str | None, model: str) -> Rule:
        """The effective rule: defaults, then the model's overrides, then the tenant's."""
        key = (tenant, model)
        cached = self._rules.get(key)
        if cached is not None:
            return cached
        merged: dict[str, Any] = self.spec.defaults.model_dump()
        layers: list[RuleFields] = []
        if model in self.spec.models:
            layers.append(self.spec.models[model])
        if tenant is not None and tenant in self.spec.tenants:
            layers.append(self.spec.tenants[tenant])
        for layer in layers:
            for k in _RULE_KEYS:
                v = getattr(layer, k)
                if v is not None:
                    merged[k] = v
        calibration = self._calibrations.get(merged["calibration"] or "")
        sampling = None
        if merged["method"] in ("consistency", "hybrid"):
            sampling = SamplingRule(
                samples=merged["samples"],
                temperature=merged["sample_temperature"],
                round_size=merged["sample_round_size"],
                concurrency=merged["sample_concurrency"],
                min_samples=min(merged["min_samples"], merged["samples"]),
                timeout=merged["sample_timeout"],
                max_tokens=merged["sample_max_tokens"],
                adaptive=merged["adaptive"],
                risk=merged["stop_risk"],
                matcher=merged["matcher"],
                embedding_threshold=merged["embedding_threshold"],
                show=merged["show"],
                on_error=merged["on_sampling_error"],
            )
        score = (
            merged["consistency_score"] if merged["method"] == "consistency" else merged["score"]
        )
        threshold, risk = merged["threshold"], None
        if merged["target_error"] is not None:
            choice = self._risk_choice(
                calibration, merged["target_error"], merged["target_confidence"]
            )
            # No threshold keeps the promise: refuse every answer rather than guess.
            threshold = choice.threshold if choice.threshold is not None else 1.0
            risk = choice.to_dict() | ({"reason": choice.reason} if choice.reason else {})
        rule = Rule(
            tenant=tenant or "anonymous",
            threshold=threshold,
            action=merged["action"],
            method=merged["method"],
            # A calibration is fitted on one score: it decides which score is read.
            score=calibration.score if calibration else score,
            calibration=calibration,
            abstention_message=merged["abstention_message"],
            hedge_prefix=merged["hedge_prefix"],
            streaming=merged["streaming"],
            judge_tool_calls=merged["judge_tool_calls"],
            judge_json=merged["judge_json"],
            on_missing_score=merged["on_missing_score"],
            top_logprobs=merged["top_logprobs"],
            keepalive_seconds=merged["keepalive_seconds"],
            log_text=merged["log_text"],
            risk=risk,
            consistency_score=merged["consistency_score"],
            # Streaming sentence by sentence only makes sense with a verdict per sentence.
            granularity="sentence" if merged["streaming"] == "sentence" else merged["granularity"],
            sentence_abstention=merged["sentence_abstention"],
            sentence_hedge=merged["sentence_hedge"],
            stop_on_withheld=merged["stop_on_withheld"],
            logprob_score=merged["score"],
            recalibrate=RecalibrationRule(
                min_labels=merged["recalibrate_min_labels"],
                refit_every=merged["recalibrate_every"],
                holdout=merged["recalibrate_holdout"],
                prior_strength=merged["recalibrate_prior"],
                window=merged["recalibrate_window"],
            )
            if merged["recalibrate"] and calibration is not None
            else None,
            sampling=sampling,
            ood_threshold=merged["ood_threshold"],
            drift_psi=merged["drift_psi"],
            max_n=merged["max_n"],
            max_upstream_calls=merged["max_upstream_calls"],
            # 0 in the file lifts a limit an outer layer set: unlimited.
            max_concurrent_requests=merged["max_concurrent_requests"] or None,
            rate_limit_per_second=merged["rate_limit_per_second"] or None,
            rate_limit_burst=merged["rate_limit_burst"],
        )
        self._rules[key] = rule
        return rule


#: Calibration-file ``fitted_on`` keys that a rule's sampling must match.
_FITTED_SAMPLING = {
    "samples": "samples",
    "sample_temperature": "temperature",
    "matcher": "matcher",
    "embedding_threshold": "embedding_threshold",
}


def calibration_mismatches(rule: Rule) -> list[str]:
    """How ``rule`` differs from what its calibration was fitted on (empty when it fits)."""
    problems = []
    if rule.risk is not None and rule.risk.get("threshold") is None:
        problems.append(str(rule.risk.get("reason")))
    if rule.granularity == "sentence" and rule.method != "logprobs":
        problems.append(
            f"granularity sentence needs method logprobs (sentences are scored on their own "
            f"tokens); with method {rule.method} answers are judged as a whole"
        )
    cal = rule.calibration
    # Without a calibration there is nothing to drift from (a tenant-wide drift_psi spans
    # uncalibrated models too): only a calibration lacking a reference is worth a word.
    if rule.drift_psi is not None and cal is not None:
        if cal.reference is None:
            problems.append(
                "drift_psi needs a calibration with a reference distribution: "
                "this one records none, so the traffic's drift is not measured"
            )
        elif rule.ood_threshold is None or rule.ood_threshold <= rule.threshold:
            problems.append(
                "drift_psi has no effect on decisions: ood_threshold is not above threshold "
                "(drifted traffic is only marked in the verdict)"
            )
    if cal is None:
        return problems
    fitted_unit = cal.fitted_on.get("granularity", "answer")
    if rule.method == "logprobs" and fitted_unit != rule.granularity:
        problems.append(
            f"granularity is {rule.granularity} but the calibration was fitted on "
            f"{fitted_unit}s: its P(correct) does not mean what it says"
        )
    sampled = cal.method in ("consistency", "hybrid")
    if sampled != (rule.method in ("consistency", "hybrid")) or (
        cal.method == "hybrid" and rule.method != "hybrid"
    ):
        problems.append(f"method {rule.method} with a calibration fitted for {cal.method}")
    needs_top_k = needing_top_k(cal.inputs)
    if needs_top_k and rule.top_logprobs == 0:
        problems.append(
            f"top_logprobs is 0 but the calibration reads {', '.join(needs_top_k)}, "
            "which needs the top-k alternatives: answers will get no P(correct)"
        )
    if sampled and rule.sampling is not None:
        for key, attr in _FITTED_SAMPLING.items():
            fitted = cal.fitted_on.get(key)
            if key == "embedding_threshold" and rule.sampling.matcher != "embedding":
                continue
            mine = getattr(rule.sampling, attr)
            if fitted is not None and fitted != mine:
                problems.append(f"{key} is {mine!r} but the calibration was fitted with {fitted!r}")
    return problems


def decide(p_correct: float | None, rule: Rule) -> Decision:
    """Answer iff P(correct) > t; otherwise the rule's action.

    With a calibrated p, answering scores p − (1−p)·t/(1−t) in expectation, which is
    positive exactly when p > t: the threshold is the price of a wrong answer.
    """
    if p_correct is None:
        return "answer" if rule.on_missing_score == "answer" else rule.action
    return "answer" if p_correct > rule.threshold else rule.action
