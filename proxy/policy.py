"""Policy file models, per-tenant rules, and the answer/abstain decision.

The policy file says where each model lives (``upstreams``, ``models``), how confident an
answer must be (``defaults``, overridden per model and per ``tenants``), and who is who
(``auth``). Models are strict (unknown keys are errors) and frozen; a loaded policy is
compiled once into a :class:`Policy` that answers the hot-path questions (which tenant,
which route, which rule) without re-validating anything.

Pure: no web or HTTP imports. File reading lives in :mod:`proxy.policy_loader`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from proxy.confidence.calibration import Calibration
from proxy.confidence.consistency import SCORES as AGREEMENT_SCORES
from proxy.confidence.logprobs import SCORES

Action = Literal["abstain", "hedge", "annotate"]
Method = Literal["logprobs", "consistency", "hybrid", "none"]
StreamMode = Literal["buffer", "passthrough"]
MatcherName = Literal["exact", "numeric", "embedding"]
SamplingFallback = Literal["fallback", "answer", "abstain", "error"]
Decision = Literal["answer", "abstain", "hedge", "annotate", "unjudged"]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    """Upstream timeouts in seconds."""

    connect: float = Field(5.0, gt=0)
    read: float = Field(120.0, gt=0)
    total: float = Field(300.0, gt=0)


class UpstreamConfig(_Strict):
    """One upstream: an OpenAI-compatible ``base_url`` or a litellm model string."""

    base_url: str | None = None
    litellm_model: str | None = None
    #: name of the environment variable holding the key; keys never live in the file
    api_key_env: str | None = None
    #: extra litellm keyword arguments (api_base, api_version, ...), never secrets
    litellm_params: dict[str, Any] = Field(default_factory=dict)
    supports_n: bool = True
    timeouts: Timeouts = Timeouts()
    max_connections: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _one_target(self) -> UpstreamConfig:
        if (self.base_url is None) == (self.litellm_model is None):
            raise ValueError("give exactly one of base_url or litellm_model")
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return self


class RuleFields(_Strict):
    """Everything a tenant or a model may override. ``None`` means 'inherit'."""

    threshold: float | None = Field(None, ge=0.0, lt=1.0)
    action: Action | None = None
    method: Method | None = None
    score: str | None = None
    calibration: str | None = None
    abstention_message: str | None = None
    hedge_prefix: str | None = None
    streaming: StreamMode | None = None
    judge_tool_calls: bool | None = None
    judge_json: bool | None = None
    on_missing_score: Literal["answer", "abstain"] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    keepalive_seconds: float | None = Field(None, gt=0)
    #: put prompt and answer text in the decision log (off: scores and verdicts only)
    log_text: bool | None = None

    # Sampling, for method consistency and hybrid.
    #: the agreement score read by method consistency
    consistency_score: str | None = None
    #: extra samples drawn at most (the budget)
    samples: int | None = Field(None, ge=1, le=64)
    sample_temperature: float | None = Field(None, ge=0.0, le=2.0)
    #: samples per round; the stopping rule is consulted between rounds
    sample_round_size: int | None = Field(None, ge=1, le=64)
    #: concurrent upstream calls per request when the upstream ignores n
    sample_concurrency: int | None = Field(None, ge=1, le=64)
    #: samples that must come back to decide on agreement at all
    min_samples: int | None = Field(None, ge=1, le=64)
    sample_timeout: float | None = Field(None, gt=0)
    #: cap on each sample's length; unset keeps the client's max_tokens
    sample_max_tokens: int | None = Field(None, ge=1)
    #: stop sampling once the decision is settled (adaptive), or always draw the budget
    adaptive: bool | None = None
    #: accepted chance that adaptive stopping lands on the other side of t
    stop_risk: float | None = Field(None, gt=0.0, lt=0.5)
    matcher: MatcherName | None = None
    embedding_threshold: float | None = Field(None, ge=-1.0, le=1.0)
    #: which answer the client sees: the one it asked for, or the samples' majority
    show: Literal["requested", "majority"] | None = None
    #: too few samples came back: judge on logprobs when there are some ("fallback"),
    #: or answer, abstain (the rule's action) or fail with 502
    on_sampling_error: SamplingFallback | None = None

    @model_validator(mode="after")
    def _known_score(self) -> RuleFields:
        if self.score is not None and self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}")
        if self.consistency_score is not None and self.consistency_score not in AGREEMENT_SCORES:
            raise ValueError(f"consistency_score must be one of {', '.join(AGREEMENT_SCORES)}")
        if (
            self.min_samples is not None
            and self.samples is not None
            and self.min_samples > self.samples
        ):
            raise ValueError("min_samples cannot exceed samples")
        return self


class Defaults(RuleFields):
    """The rule every request starts from."""

    threshold: float | None = Field(0.5, ge=0.0, lt=1.0)
    action: Action | None = "abstain"
    method: Method | None = "logprobs"
    score: str | None = "min_logprob"
    abstention_message: str | None = "I don't know."
    hedge_prefix: str | None = "I'm not sure, but: "
    streaming: StreamMode | None = "buffer"
    judge_tool_calls: bool | None = False
    judge_json: bool | None = False
    on_missing_score: Literal["answer", "abstain"] | None = "abstain"
    top_logprobs: int | None = Field(5, ge=0, le=20)
    keepalive_seconds: float | None = Field(10.0, gt=0)
    log_text: bool | None = False
    consistency_score: str | None = "agreement"
    samples: int | None = Field(8, ge=1, le=64)
    sample_temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    sample_round_size: int | None = Field(2, ge=1, le=64)
    sample_concurrency: int | None = Field(4, ge=1, le=64)
    min_samples: int | None = Field(2, ge=1, le=64)
    sample_timeout: float | None = Field(30.0, gt=0)
    adaptive: bool | None = True
    stop_risk: float | None = Field(0.05, gt=0.0, lt=0.5)
    matcher: MatcherName | None = "exact"
    embedding_threshold: float | None = Field(0.8, ge=-1.0, le=1.0)
    show: Literal["requested", "majority"] | None = "requested"
    on_sampling_error: SamplingFallback | None = "fallback"


class ModelRoute(RuleFields):
    """The model name a client sends, mapped to an upstream and its model name."""

    upstream: str
    upstream_model: str | None = None


class Tenant(RuleFields):
    """A tenant: its API keys (SHA-256 hex only) and its overrides."""

    api_key_sha256: list[Sha256Hex] = Field(default_factory=list)


class Auth(_Strict):
    """What to do with a missing or unknown API key."""

    unknown_keys: Literal["reject", "default"] = "reject"
    default_tenant: str | None = None

    @model_validator(mode="after")
    def _default_named(self) -> Auth:
        if self.unknown_keys == "default" and not self.default_tenant:
            raise ValueError("unknown_keys: default needs default_tenant")
        return self


class PolicyFile(_Strict):
    """The whole policy file as written."""

    upstreams: dict[str, UpstreamConfig]
    models: dict[str, ModelRoute]
    defaults: Defaults = Defaults()
    auth: Auth = Auth()
    tenants: dict[str, Tenant] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> PolicyFile:
        problems = [
            f"models.{name}.upstream: no upstream named {route.upstream!r}"
            for name, route in self.models.items()
            if route.upstream not in self.upstreams
        ]
        if self.auth.default_tenant and self.auth.default_tenant not in self.tenants:
            problems.append(f"auth.default_tenant: no tenant named {self.auth.default_tenant!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


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
    consistency_score: str = "agreement"
    #: the logprob score, even when a calibration or the method reads another one
    logprob_score: str = "min_logprob"
    sampling: SamplingRule | None = None


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

    @property
    def model_names(self) -> list[str]:
        return list(self._routes)

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
        rule = Rule(
            tenant=tenant or "anonymous",
            threshold=merged["threshold"],
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
            consistency_score=merged["consistency_score"],
            logprob_score=merged["score"],
            sampling=sampling,
        )
        self._rules[key] = rule
        return rule


def decide(p_correct: float | None, rule: Rule) -> Decision:
    """Answer iff P(correct) > t; otherwise the rule's action.

    With a calibrated p, answering scores p − (1−p)·t/(1−t) in expectation, which is
    positive exactly when p > t: the threshold is the price of a wrong answer.
    """
    if p_correct is None:
        return "answer" if rule.on_missing_score == "answer" else rule.action
    return "answer" if p_correct > rule.threshold else rule.action


def penalty(threshold: float) -> float:
    """Points a wrong answer costs at threshold t: t/(1−t)."""
    return threshold / (1.0 - threshold)
