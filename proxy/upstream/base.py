"""The Upstream protocol, the key lookup both upstreams share, and the stand-in for a
missing key. Building upstreams from a policy is :mod:`proxy.upstream.pool`'s job, so
that this module imports no upstream and no upstream imports the factory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.errors import UpstreamError
from proxy.policy.schema import UpstreamConfig
from proxy.protocol import Kind


class Upstream(Protocol):
    """A source of OpenAI-shaped completions."""

    name: str
    #: whether the upstream honours ``n`` (else the proxy sends concurrent requests)
    supports_n: bool

    async def complete(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        """One non-streaming completion, as an OpenAI-shaped dict."""
        ...

    def stream(self, kind: Kind, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Streamed completion chunks, as OpenAI-shaped dicts (``[DONE]`` not included)."""
        ...


def api_key_from_env(config: UpstreamConfig, env: Mapping[str, str]) -> str | None:
    """The upstream's key, read from the environment variable the policy names.

    A named but unset variable never gets this far:
    :func:`~proxy.upstream.pool.build_upstreams` puts an :class:`UnconfiguredUpstream`
    in that upstream's place.
    """
    return env.get(config.api_key_env) or None if config.api_key_env else None


@dataclass(frozen=True, slots=True)
class ResponseCaps:
    """How much of an upstream answer the proxy will hold (process settings).

    Counted after decompression, so a small gzip that expands to hundreds of MiB is
    refused as it expands, not after.
    """

    #: bytes of one answer, non-streamed or streamed: every mode but passthrough holds a
    #: streamed answer's text and tokens until its verdict, so a stream is capped too
    max_response_bytes: int = 8 * 1024 * 1024
    #: bytes of one line of a streamed answer (one SSE event)
    max_line_bytes: int = 1024 * 1024


DEFAULT_CAPS = ResponseCaps()


class UnconfiguredUpstream:
    """Stands in for an upstream whose API key is missing from the environment.

    The proxy still starts and serves every other upstream; requests routed here fail
    with a 502 that names the variable to set (never a value).
    """

    def __init__(self, name: str, variable: str) -> None:
        self.name = name
        self.supports_n = True
        self._error = f"The upstream's API key is not configured (set {variable})."

    async def complete(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        raise UpstreamError(self._error, kind="config")

    async def stream(self, kind: Kind, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        raise UpstreamError(self._error, kind="config")
        yield {}  # pragma: no cover - makes this an async generator like the others
