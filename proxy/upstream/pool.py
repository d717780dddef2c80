"""Building upstreams from a policy's ``upstreams``, and the set in force.

Each upstream module is imported here only when the policy configures one of its kind:
litellm's import costs about 2 s and 100 MiB, so a deployment without it never pays.

Every configured upstream is wrapped in a
:class:`~proxy.upstream.resilience.ResilientUpstream` (retries, circuit breaker). Its
breaker outlives a policy reload when that upstream's configuration is unchanged, so a
reload neither forgets an outage nor re-opens traffic to a dead upstream.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from proxy.errors import UpstreamError
from proxy.policy.schema import UpstreamConfig
from proxy.upstream.base import DEFAULT_CAPS, ResponseCaps, UnconfiguredUpstream, Upstream
from proxy.upstream.resilience import (
    STATE_VALUES,
    Breaker,
    OnRetry,
    OnState,
    ResilientUpstream,
    State,
)
from proxy.upstream.wire import Wire

if TYPE_CHECKING:
    from proxy.metrics import Metrics

log = logging.getLogger("abstain.upstream")


def build_upstreams(
    configs: Mapping[str, UpstreamConfig],
    wire: Wire,
    env: Mapping[str, str],
    *,
    breakers: Mapping[str, Breaker] | None = None,
    on_retry: OnRetry | None = None,
    on_state: OnState | None = None,
    caps: ResponseCaps = DEFAULT_CAPS,
) -> dict[str, Upstream]:
    """One Upstream per configured name; litellm is imported only if one needs it.

    Each is wrapped with retries and a circuit breaker (``breakers[name]`` when given,
    else a new one); the stand-in for a missing key is not (its error is permanent).
    """
    from proxy.upstream.openai_http import OpenAIHTTPUpstream

    upstreams: dict[str, Upstream] = {}
    for name, config in configs.items():
        inner: Upstream
        if config.api_key_env and not env.get(config.api_key_env):
            log.warning("upstream %s: %s is not set; its models will answer 502", name,
                        config.api_key_env)  # fmt: skip
            upstreams[name] = UnconfiguredUpstream(name, config.api_key_env)
            continue
        if config.base_url is not None:
            inner = OpenAIHTTPUpstream(name, config, wire, env, caps=caps)
        else:
            from proxy.upstream.litellm_upstream import LiteLLMUpstream

            inner = LiteLLMUpstream(name, config, env, caps=caps)
        upstreams[name] = ResilientUpstream(
            inner,
            config,
            breaker=(breakers or {}).get(name),
            on_retry=on_retry,
            on_state=on_state,
        )
    return upstreams


class UpstreamPool:
    """The upstreams of the policy in force; rebuilt when a new policy is loaded."""

    def __init__(
        self,
        wire: Wire,
        env: Mapping[str, str],
        metrics: Metrics | None = None,
        caps: ResponseCaps = DEFAULT_CAPS,
    ) -> None:
        self.wire = wire
        self._env = env
        self._metrics = metrics
        self._caps = caps
        self._upstreams: dict[str, Upstream] = {}

    def rebuild(self, configs: Mapping[str, UpstreamConfig]) -> None:
        # Keep the breaker of every upstream whose configuration did not change.
        kept: dict[str, Breaker] = {}
        for name, upstream in self._upstreams.items():
            if isinstance(upstream, ResilientUpstream) and configs.get(name) == upstream.config:
                kept[name] = upstream.breaker
        self._upstreams = build_upstreams(
            configs,
            self.wire,
            self._env,
            breakers=kept,
            on_retry=self._retried,
            on_state=self._state_changed,
            caps=self._caps,
        )
        if self._metrics is not None:
            for name, upstream in self._upstreams.items():
                if isinstance(upstream, ResilientUpstream) and name not in kept:
                    self._state_changed(name, upstream.breaker.state)

    def _retried(self, upstream: str, reason: str) -> None:
        log.info("upstream %s: retrying after %s", upstream, reason)
        if self._metrics is not None:
            self._metrics.upstream_retries.labels(upstream, reason).inc()

    def _state_changed(self, upstream: str, state: State) -> None:
        if state != "closed":
            log.warning("upstream %s: circuit breaker %s", upstream, state.replace("_", "-"))
        if self._metrics is not None:
            self._metrics.upstream_circuit_state.labels(upstream).set(STATE_VALUES[state])

    def get(self, name: str) -> Upstream:
        try:
            return self._upstreams[name]
        except KeyError:
            raise UpstreamError("The model's upstream is not configured.", kind="config") from None

    def __len__(self) -> int:
        return len(self._upstreams)
