"""Building upstreams from a policy's ``upstreams``, and the set in force.

Each upstream module is imported here only when the policy configures one of its kind:
litellm's import costs about 2 s and 100 MiB, so a deployment without it never pays.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import httpx

from proxy.errors import UpstreamError
from proxy.policy.schema import UpstreamConfig
from proxy.upstream.base import UnconfiguredUpstream, Upstream

log = logging.getLogger("abstain.upstream")


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
