"""Any provider litellm knows, behind the same Upstream protocol.

Bounded like an HTTP upstream, as far as litellm lets it be: a total deadline, and
``max_response_bytes`` on an answer (as JSON) and on a stream's chunks together.

litellm is imported when the first such upstream is built, never at module import, so a
deployment that only talks to OpenAI-compatible servers never pays its start-up time
(about 2 s) or memory (about 100 MiB).
"""

from __future__ import annotations

import asyncio
import importlib
import re
import time
from collections.abc import AsyncIterator, Mapping
from types import ModuleType
from typing import Any

import orjson

from proxy.errors import (
    ProxyError,
    UpstreamError,
    UpstreamMalformed,
    UpstreamTimeout,
    UpstreamUnreachable,
    upstream_status_error,
)
from proxy.policy.schema import UpstreamConfig
from proxy.protocol import Kind
from proxy.redaction import Redactor
from proxy.settings import quiet_litellm
from proxy.upstream.base import DEFAULT_CAPS, ResponseCaps, api_key_from_env

#: The OpenAI request fields a client may pass to litellm; nothing else reaches it.
#: litellm also reads where, how often and with which key to call from its keyword
#: arguments (``fallbacks`` with another ``api_base``, ``max_retries``, ``api_key``,
#: ``mock_response``, ``metadata`` for callbacks, ...): those come from the policy's
#: ``litellm_params`` alone, so a client cannot send the upstream key elsewhere.
_COMMON_FIELDS = frozenset(
    {
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "max_tokens",
        "n",
        "presence_penalty",
        "seed",
        "stop",
        "stream_options",
        "temperature",
        "top_p",
        "user",
    }
)
_FIELDS: dict[Kind, frozenset[str]] = {
    "chat": _COMMON_FIELDS
    | {
        "messages",
        "max_completion_tokens",
        "parallel_tool_calls",
        "reasoning_effort",
        "response_format",
        "tool_choice",
        "tools",
        "top_logprobs",
    },
    "completions": _COMMON_FIELDS | {"prompt", "best_of", "echo", "suffix"},
}


#: "litellm.BadRequestError: OpenAIException - " and the like, before the upstream's text.
_LITELLM_PREFIX = re.compile(r"^(?:litellm\.\w+:\s*)?(?:\w+Exception\s*-\s*)?")


def _load_litellm() -> ModuleType:
    quiet_litellm()
    litellm = importlib.import_module("litellm")
    # Providers without logprobs would otherwise fail the request; the proxy then
    # falls back to the policy's on_missing_score instead.
    setattr(litellm, "drop_params", True)  # noqa: B010 - module attribute, untyped
    setattr(litellm, "suppress_debug_info", True)  # noqa: B010
    return litellm


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    dump = getattr(obj, "model_dump", None)
    if dump is None:
        raise UpstreamMalformed("litellm returned an unexpected object.")
    data = dump(exclude_none=False)
    if not isinstance(data, dict):
        raise UpstreamMalformed("litellm returned an unexpected object.")
    return data


class LiteLLMUpstream:
    """Completions through ``litellm.acompletion`` / ``litellm.atext_completion``."""

    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        env: Mapping[str, str],
        *,
        caps: ResponseCaps = DEFAULT_CAPS,
    ) -> None:
        assert config.litellm_model is not None
        self._caps = caps
        self.name = name
        self.supports_n = config.supports_n
        self._litellm = _load_litellm()
        self._prefix = config.litellm_model
        self._params = dict(config.litellm_params)
        self._total = config.timeouts.total
        self._params["timeout"] = config.timeouts.read
        # The proxy retries (proxy.upstream.resilience, the policy's ``retries``); the
        # OpenAI client under litellm would retry twice more on each of those attempts.
        self._params.setdefault("max_retries", 0)
        key = api_key_from_env(config, env)
        self._redact = Redactor([key])
        if key:
            self._params["api_key"] = key

    def _model(self, upstream_model: str) -> str:
        # "openai/" routes to any OpenAI-compatible server given as api_base, etc.
        if upstream_model.startswith(self._prefix) or "/" in upstream_model:
            return upstream_model
        return f"{self._prefix.rstrip('/')}/{upstream_model}"

    def _args(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        allowed = _FIELDS[kind]
        args = {k: v for k, v in body.items() if k in allowed}
        args.update(self._params)
        args["model"] = self._model(str(body.get("model", "")))
        return args

    def _message(self, exc: Exception) -> str:
        """The upstream's own words in a litellm error: no litellm prefix, no secret."""
        message = _LITELLM_PREFIX.sub("", str(getattr(exc, "message", "") or ""))
        return self._redact(message)

    def _error(self, exc: Exception) -> UpstreamError:
        """The proxy's error for one of litellm's, by the same status classes as HTTP."""
        lt = self._litellm
        if isinstance(exc, asyncio.TimeoutError | lt.Timeout):
            return UpstreamTimeout()
        if isinstance(exc, lt.BadRequestError):
            return upstream_status_error(400, self._message(exc))
        if isinstance(exc, lt.APIConnectionError):
            return UpstreamUnreachable()
        status = getattr(exc, "status_code", None)
        if isinstance(status, int) and status in (400, 422, 429):
            return upstream_status_error(status, self._message(exc))
        kind = f"status_{status}" if isinstance(status, int) else "error"
        return UpstreamError("The upstream model failed.", kind=kind, upstream_status=status)

    async def complete(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        call = self._litellm.acompletion if kind == "chat" else self._litellm.atext_completion
        try:
            async with asyncio.timeout(self._total):
                result = await call(**self._args(kind, body))
        except ProxyError:
            raise
        except Exception as exc:  # litellm raises its own tree; map it, never leak it
            raise self._error(exc) from None
        data = _as_dict(result)
        # litellm has read and parsed the answer itself, so the cap cannot stop that read
        # (its own client bounds it); it keeps the proxy from judging, logging and sending
        # an answer past max_response_bytes, as for every other upstream.
        limit = self._caps.max_response_bytes
        if len(orjson.dumps(data, default=str)) > limit:
            raise UpstreamError(
                f"The upstream answer exceeds the limit of {limit} bytes.", kind="too_large"
            )
        return data

    async def stream(self, kind: Kind, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The chunks, within the total deadline and ``max_response_bytes`` of chunks (as
        JSON) together: every mode holds a streamed answer for its verdict. litellm reads
        the wire itself, so a stall between chunks is cut by its read timeout."""
        call = self._litellm.acompletion if kind == "chat" else self._litellm.atext_completion
        deadline = time.monotonic() + self._total
        limit, total = self._caps.max_response_bytes, 0
        try:
            chunks = await call(**self._args(kind, body), stream=True)
            async for chunk in chunks:
                data = _as_dict(chunk)
                total += len(orjson.dumps(data, default=str))
                if total > limit:
                    raise UpstreamError(
                        f"The upstream stream exceeds the limit of {limit} bytes.",
                        kind="too_large",
                    )
                if time.monotonic() > deadline:
                    raise UpstreamTimeout()
                yield data
        except ProxyError:
            raise
        except Exception as exc:
            raise self._error(exc) from None
