"""The Upstream protocol and the factory that builds upstreams from a policy."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import httpx

from proxy.errors import UpstreamError
from proxy.policy import UpstreamConfig
from proxy.protocol import Kind

log = logging.getLogger("abstain.upstream")


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

    A named but unset variable never gets this far: :func:`build_upstreams` puts an
    :class:`UnconfiguredUpstream` in that upstream's place.
    """
    return env.get(config.api_key_env) or None if config.api_key_env else None


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


def build_upstreams(
    configs: Mapping[str, UpstreamConfig],
    client: httpx.AsyncClient,
    env: Mapping[str, str],
) -> dict[str, Upstream]:
    """One Upstream per configured name; litellm is imported only if one needs it."""
    from proxy.upstream.openai_http import OpenAIHTTPUpstream

    upstreams: dict[str, Upstream] = {}
    for name, config in configs.items():
        if config.api_key_env and not env.get(config.api_key_env):
            log.warning("upstream %s: %s is not set; its models will answer 502", name,
                        config.api_key_env)  # fmt: skip
            upstreams[name] = UnconfiguredUpstream(name, config.api_key_env)
        elif config.base_url is not None:
            upstreams[name] = OpenAIHTTPUpstream(name, config, client, env)
        else:
            from proxy.upstream.litellm_upstream import LiteLLMUpstream

            upstreams[name] = LiteLLMUpstream(name, config, env)
    return upstreams


class UpstreamPool:
    """The upstreams of the policy in force; rebuilt when a new policy is loaded."""

    def __init__(self, client: httpx.AsyncClient, env: Mapping[str, str]) -> None:
        self.client = client
        self._env = env
        self._upstreams: dict[str, Upstream] = {}

    def rebuild(self, configs: Mapping[str, UpstreamConfig]) -> None:
        self._upstreams = build_upstreams(configs, self.client, self._env)

    def get(self, name: str) -> Upstream:
        try:
            return self._upstreams[name]
        except KeyError:
            raise UpstreamError("The model's upstream is not configured.", kind="config") from None

    def __len__(self) -> int:
        return len(self._upstreams)
