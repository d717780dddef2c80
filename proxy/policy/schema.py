"""The policy file's schema: strict, frozen pydantic models of what a user writes.

Unknown keys are errors and every model is frozen, so a loaded policy cannot drift.
:mod:`proxy.policy` compiles a validated :class:`PolicyFile` into rules for the hot path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from proxy.confidence.features import AGREEMENT_SCORES, LOGPROB_SCORES
from proxy.confidence.recalibration import DEFAULT_PRIOR

Action = Literal["abstain", "hedge", "annotate"]
Method = Literal["logprobs", "consistency", "hybrid", "none"]
StreamMode = Literal["buffer", "passthrough", "sentence"]
Granularity = Literal["answer", "sentence"]
MatcherName = Literal["exact", "numeric", "embedding"]
SamplingFallback = Literal["fallback", "answer", "abstain", "error"]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    """Upstream timeouts in seconds."""

    connect: float = Field(5.0, gt=0)
    read: float = Field(120.0, gt=0)
    total: float = Field(300.0, gt=0)


class Retries(_Strict):
    """Retries of connect failures, resets, 429 and 502/503/504, with full-jitter backoff.

    The wait before retry ``k`` (0-based) is uniform in
    ``[0, min(backoff_max_seconds, backoff_base_seconds * 2**k)]``, or the upstream's
    ``Retry-After`` when it sends one; no retry starts past the upstream's
    ``timeouts.total`` or after a byte reached the client.
    """

    #: retries after the first attempt; 0 turns retrying off
    max_retries: int = Field(2, ge=0, le=10)
    backoff_base_seconds: float = Field(0.25, gt=0, le=60)
    backoff_max_seconds: float = Field(2.0, gt=0, le=300)

    @model_validator(mode="after")
    def _ordered(self) -> Retries:
        if self.backoff_max_seconds < self.backoff_base_seconds:
            raise ValueError("backoff_max_seconds cannot be below backoff_base_seconds")
        return self


class CircuitBreaker(_Strict):
    """Fail fast (503) after consecutive upstream failures, for a cool-down, then probe."""

    #: consecutive failed attempts that open the breaker; 0 turns the breaker off
    failure_threshold: int = Field(5, ge=0, le=10_000)
    #: seconds the breaker stays open before one probe call is let through
    cooldown_seconds: float = Field(30.0, ge=0, le=3600)


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
    retries: Retries = Retries()
    circuit_breaker: CircuitBreaker = CircuitBreaker()

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
    #: instead of a threshold: the highest error among answered the tenant accepts; the
    #: threshold is chosen from the calibration's validation labels (proxy.confidence.risk_control)
    target_error: float | None = Field(None, gt=0.0, lt=1.0)
    #: how sure that bound must be (1 − δ)
    target_confidence: float | None = Field(None, gt=0.5, lt=1.0)
    keepalive_seconds: float | None = Field(None, gt=0)
    #: judge the answer as a whole, or each sentence (list line) on its own tokens
    granularity: Granularity | None = None
    #: what replaces a withheld sentence (granularity sentence, action abstain)
    sentence_abstention: str | None = Field(None, max_length=1000)
    #: what goes in front of a doubtful sentence (granularity sentence, action hedge)
    sentence_hedge: str | None = Field(None, max_length=1000)
    #: streaming sentence: stop the generation at the first withheld sentence, rather
    #: than pay the model to go on guessing
    stop_on_withheld: bool | None = None
    #: put prompt and answer text in the decision log (off: scores and verdicts only)
    log_text: bool | None = None
    #: learn a recalibration of the calibration from this tenant's feedback (issue 12.2;
    #: see docs/calibration.md, "Learning from feedback"); needs a calibration
    recalibrate: bool | None = None
    #: labels needed before the first fit
    recalibrate_min_labels: int | None = Field(None, ge=20, le=1_000_000)
    #: new labels between two refits
    recalibrate_every: int | None = Field(None, ge=1, le=1_000_000)
    #: share of the labels (the newest) a candidate is judged on before it is swapped in
    recalibrate_holdout: float | None = Field(None, ge=0.1, le=0.5)
    #: weight of the prior centred on the shipped map, in labels' worth (0: none)
    recalibrate_prior: float | None = Field(None, ge=0.0, le=10_000.0)
    #: the most recent labels a fit reads (at least recalibrate_min_labels)
    recalibrate_window: int | None = Field(None, ge=20, le=1_000_000)

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
    #: the threshold for an answer whose inputs lie outside what the calibration was
    #: fitted on (``out_of_distribution``); never below ``threshold``. Unset: the same t
    ood_threshold: float | None = Field(None, ge=0.0, lt=1.0)
    #: judge every answer at ``ood_threshold`` while the tenant's recent traffic reads a
    #: PSI at least this high against the calibration's reference (proxy.drift_monitor),
    #: until a map or a threshold learnt from the tenant's feedback answers for it
    drift_psi: float | None = Field(None, gt=0.0, le=100.0)

    # Limits (proxy.limits). Per request: the client's n, and the upstream calls one
    # request makes (the answer, fanned out when the upstream ignores n, plus samples).
    max_n: int | None = Field(None, ge=1, le=128)
    max_upstream_calls: int | None = Field(None, ge=1, le=1024)
    #: per tenant: requests in flight at once; 0 in the file means unlimited
    max_concurrent_requests: int | None = Field(None, ge=0, le=1_000_000)
    #: per tenant: a token bucket refilling at this rate; 0 in the file means unlimited
    rate_limit_per_second: float | None = Field(None, ge=0.0, le=1_000_000.0)
    #: the bucket's size; unset: one second's worth of the rate (at least 1)
    rate_limit_burst: int | None = Field(None, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _known_score(self) -> RuleFields:
        if self.score is not None and self.score not in LOGPROB_SCORES:
            raise ValueError(f"score must be one of {', '.join(LOGPROB_SCORES)}")
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
    target_confidence: float | None = Field(0.95, gt=0.5, lt=1.0)
    keepalive_seconds: float | None = Field(10.0, gt=0)
    granularity: Granularity | None = "answer"
    sentence_abstention: str | None = Field("(not sure about this part)", max_length=1000)
    sentence_hedge: str | None = Field("(not sure) ", max_length=1000)
    stop_on_withheld: bool | None = False
    log_text: bool | None = False
    recalibrate: bool | None = False
    recalibrate_min_labels: int | None = Field(100, ge=20, le=1_000_000)
    recalibrate_every: int | None = Field(25, ge=1, le=1_000_000)
    recalibrate_holdout: float | None = Field(0.3, ge=0.1, le=0.5)
    recalibrate_prior: float | None = Field(DEFAULT_PRIOR, ge=0.0, le=10_000.0)
    recalibrate_window: int | None = Field(2000, ge=20, le=1_000_000)
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
    ood_threshold: float | None = Field(None, ge=0.0, lt=1.0)
    drift_psi: float | None = Field(None, gt=0.0, le=100.0)
    max_n: int | None = Field(16, ge=1, le=128)
    max_upstream_calls: int | None = Field(64, ge=1, le=1024)


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
        problems = reference_problems(self.model_dump())
        if problems:
            raise ValueError("; ".join(problems))
        return self


def reference_problems(data: Mapping[str, Any]) -> list[str]:
    """Names that point nowhere: a model's upstream, the default tenant.

    Works on the raw mapping too, so that a file with field errors still gets its
    dangling references reported in the same run (pydantic skips model validators then).
    """

    def mapping(value: Any) -> Mapping[str, Any]:
        return value if isinstance(value, Mapping) else {}

    upstreams, tenants = mapping(data.get("upstreams")), mapping(data.get("tenants"))
    problems = [
        f"models.{name}.upstream: no upstream named {route['upstream']!r}"
        for name, route in mapping(data.get("models")).items()
        if isinstance(route, Mapping)
        and isinstance(route.get("upstream"), str)
        and route["upstream"] not in upstreams
    ]
    default = mapping(data.get("auth")).get("default_tenant")
    if isinstance(default, str) and default not in tenants:
        problems.append(f"auth.default_tenant: no tenant named {default!r}")
    return problems
