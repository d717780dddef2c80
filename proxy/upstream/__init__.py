"""Upstreams: where completions come from.

:class:`~proxy.upstream.base.Upstream` is the protocol; :mod:`.openai_http` speaks the
OpenAI wire format over one shared ``httpx.AsyncClient``; :mod:`.litellm_upstream` reaches
every other provider through litellm, imported only when such an upstream is configured.
"""

from proxy.upstream.base import Upstream, build_upstreams

__all__ = ["Upstream", "build_upstreams"]
