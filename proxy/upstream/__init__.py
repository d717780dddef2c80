"""Upstreams: where completions come from.

:class:`~proxy.upstream.base.Upstream` is the protocol and :mod:`.pool` builds the
configured ones; :mod:`.openai_http` speaks the OpenAI wire format over one shared
:mod:`.wire` (aiohttp's connection pool in service); :mod:`.litellm_upstream` reaches
every other provider through litellm, imported only when such an upstream is
configured. Nothing is imported here, so importing the protocol pulls in no HTTP client.
"""
