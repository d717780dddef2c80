"""Process settings, read from ``ABSTAIN_*`` environment variables (or passed in).

This is the only module that reads the process environment; everything else receives
a :class:`Settings` and, for upstream keys, the mapping :func:`environment` returns.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """How this process runs; what it decides lives in the policy file."""

    model_config = SettingsConfigDict(env_prefix="ABSTAIN_", extra="forbid", frozen=True)

    policy: Path = Path("policies/default.yaml")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    #: requests larger than this are refused with 413 before any parsing
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    #: seconds a client has to send its whole request body (nginx's client_body_timeout)
    client_body_timeout_seconds: float = Field(60.0, gt=0)
    #: seconds a client has to send its request headers, on a new or kept-alive
    #: connection (nginx's client_header_timeout; uvicorn has none of its own)
    client_header_timeout_seconds: float = Field(60.0, gt=0)
    #: open connections at most; past it new requests get 503 (uvicorn's limit_concurrency)
    max_connections: int | None = Field(1000, ge=1)
    #: how often the policy file is checked for changes; 0 turns polling off (SIGHUP still works)
    reload_interval_seconds: float = Field(1.0, ge=0)
    #: bytes of one upstream answer (decompressed, streamed or not) the proxy holds at
    #: most; past it, 502 (or an error event once a stream is under way)
    #: (measured: 16 answers at the cap at once held ~16 × cap of RSS after; size to that)
    max_upstream_response_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    #: bytes of one line (SSE event) of a streamed upstream answer; past it, 502
    max_upstream_line_bytes: int = Field(1024 * 1024, ge=1024)
    #: connections kept to all OpenAI-compatible upstreams together
    max_upstream_connections: int = Field(512, ge=1)
    #: install the SIGHUP handler (only possible in the main thread)
    handle_signals: bool = True
    #: FastAPI's native OpenTelemetry spans and metrics, for a process that configures
    #: OpenTelemetry providers. Off by default: the proxy's metrics are Prometheus', and
    #: on, FastAPI looks the providers up on every request (13 µs each, measured).
    opentelemetry: bool = False
    log_level: str = "info"
    #: a serving process's garbage collector: objects alive at start are frozen (never
    #: scanned again) and the youngest generation is collected after this many
    #: allocations instead of Python's 700; 0 leaves Python's defaults (proxy.gc_tuning)
    gc_gen0_threshold: int = Field(10_000, ge=0)
    #: on SIGTERM, how long in-flight requests and streams may take to finish
    graceful_shutdown_seconds: int = Field(30, ge=0)
    #: JSON Lines decision log (and feedback records); None keeps no log file, and
    #: ``-`` writes the records to standard output (for platforms that collect stdout).
    #: The file is reopened when it is rotated (renamed) or deleted.
    decision_log: Path | None = None
    #: how many recent responses are remembered so that feedback can find them
    feedback_memory: int = Field(100_000, ge=1)
    #: where feedback labels and learnt recalibrations are kept (one JSON Lines file per
    #: tenant and model); None: ``recalibration/`` beside the decision log when it is a
    #: file, else in memory only (lost at exit). See proxy.recalibration_store.
    recalibration_dir: Path | None = None
    #: when set, GET /metrics needs ``Authorization: Bearer <token>``: the metrics name
    #: tenants and show their traffic, which not every client should see
    metrics_token: SecretStr | None = None
    #: Redis shared by every pod and worker (``redis://[user:password@]host:port/db``,
    #: ``rediss://`` for TLS): feedback memory, per-tenant limits and recalibration. Unset
    #: keeps them in this process. Credentials belong here (the environment), never in the policy.
    redis_url: SecretStr | None = None
    #: seconds any one Redis call may take; past it the call counts as failed (limits
    #: fall back to this process, feedback answers 503)
    redis_timeout_seconds: float = Field(0.05, gt=0, le=5)
    #: after a failed Redis call, seconds during which Redis is not tried again
    redis_retry_seconds: float = Field(1.0, ge=0)
    #: prefix of every Redis key, so deployments can share one Redis
    redis_key_prefix: str = "abstain:"
    #: with Redis: how long a response stays known to /v1/feedback
    feedback_ttl_seconds: int = Field(86_400, ge=1)
    #: with Redis: the longest a concurrency slot is held if its pod dies before releasing it
    redis_lease_seconds: float = Field(600.0, gt=0)
    #: with Redis: recalibration labels kept per tenant and model (the newest; a rule's
    #: recalibrate_window above this reads only these). About 60 bytes of Redis each.
    redis_recalibration_labels: int = Field(10_000, ge=20, le=1_000_000)


def environment() -> Mapping[str, str]:
    """The process environment, where upstream API keys are read from."""
    return dict(os.environ)


def quiet_litellm() -> None:
    """Keep litellm from fetching its model-cost map over the network at import.

    litellm reads this switch from the environment only; without it, every start in a
    closed network waits on retries before falling back to the bundled copy.
    """
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
