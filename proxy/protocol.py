"""OpenAI wire format: request checks, logprob injection, choice access, SSE framing.

Requests and responses stay plain dicts: the proxy must pass through every field it
does not know, and building full models of every upstream response would cost more
than the rest of the hot path together. Only what the proxy reads is checked.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson

from proxy.errors import BadRequest, UpstreamError

Kind = Literal["chat", "completions"]

JSON_FORMATS = ("json_object", "json_schema")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Parse a request body; a clear 400 for anything but a JSON object."""
    if not raw:
        raise BadRequest("The request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


def validate_request(kind: Kind, body: dict[str, Any]) -> None:
    """Check the fields the proxy relies on; the upstream validates the rest."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a string.", param="model")
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty array.", param="messages")
        if not all(isinstance(m, dict) for m in messages):
            raise BadRequest("Every message must be an object.", param="messages")
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str | list) or (isinstance(prompt, list) and not prompt):
            raise BadRequest("'prompt' must be a string or a non-empty array.", param="prompt")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
        raise BadRequest("'n' must be an integer between 1 and 128.", param="n")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean.", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object.", param="stream_options")
    logprobs = body.get("logprobs")
    if kind == "chat":
        if logprobs is not None and not isinstance(logprobs, bool):
            raise BadRequest("'logprobs' must be a boolean.", param="logprobs")
    elif logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)):
        raise BadRequest("'logprobs' must be an integer for completions.", param="logprobs")
    top = body.get("top_logprobs")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool)):
        raise BadRequest("'top_logprobs' must be an integer.", param="top_logprobs")


def client_wants_logprobs(kind: Kind, body: dict[str, Any]) -> bool:
    if kind == "chat":
        return bool(body.get("logprobs"))
    return body.get("logprobs") is not None


def client_top_logprobs(kind: Kind, body: dict[str, Any]) -> int | None:
    """How many alternatives per token the client asked for; None when it asked for no
    logprobs at all."""
    if kind == "chat":
        if not body.get("logprobs"):
            return None
        top = body.get("top_logprobs")
    else:
        top = body.get("logprobs")
        if top is None:
            return None
    return top if isinstance(top, int) and not isinstance(top, bool) and top > 0 else 0


def trim_top_logprobs(logprobs: Any, k: int) -> None:
    """Cut each token's alternatives to the ``k`` the client asked for (in place).

    The proxy may ask the upstream for more alternatives than the client did (its
    scores read them); the client still gets exactly what it asked for.
    """
    if not isinstance(logprobs, dict):
        return
    # llama-server answers completions' logprobs in the chat shape too: read the shape.
    if "content" in logprobs:
        for token in logprobs.get("content") or ():
            if isinstance(token, dict):
                top = token.get("top_logprobs")
                if isinstance(top, list) and len(top) > k:
                    token["top_logprobs"] = top[:k]
        return
    tops = logprobs.get("top_logprobs")
    if isinstance(tops, list):
        for i, top in enumerate(tops):
            if isinstance(top, dict) and len(top) > k:
                # Completions' alternatives are a {token: logprob} map: keep the k best.
                best = sorted(top.items(), key=lambda kv: -float(kv[1] or -1e30))[:k]
                tops[i] = dict(best)


def upstream_body(
    kind: Kind, body: dict[str, Any], upstream_model: str, top_logprobs: int | None
) -> dict[str, Any]:
    """The request to send upstream: the client's, with the upstream model name and,
    when ``top_logprobs`` is not None, logprobs switched on (keeping the client's wider ask).
    """
    out = dict(body)
    out["model"] = upstream_model
    if top_logprobs is not None:
        if kind == "chat":
            out["logprobs"] = True
            if top_logprobs or body.get("top_logprobs"):
                out["top_logprobs"] = max(top_logprobs, body.get("top_logprobs") or 0)
        else:
            out["logprobs"] = max(top_logprobs, body.get("logprobs") or 0)
    return out


def choices_of(response: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``choices`` of an upstream completion; 502 when it has none."""
    choices = response.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise UpstreamError("The upstream answer has no valid 'choices'.", kind="malformed")
    return choices


def choice_text(kind: Kind, choice: dict[str, Any]) -> str | None:
    if kind == "chat":
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        return content if isinstance(content, str) else None
    text = choice.get("text")
    return text if isinstance(text, str) else None


def set_choice_text(kind: Kind, choice: dict[str, Any], text: str) -> None:
    if kind == "chat":
        message = choice.get("message")
        if not isinstance(message, dict):
            message = choice["message"] = {"role": "assistant"}
        message["content"] = text
    else:
        choice["text"] = text


def prompt_texts(kind: Kind, body: dict[str, Any]) -> list[str]:
    """Every text of the request's prompt: the messages' contents, or the prompt(s).

    Content parts that are not text (images, audio) are left out; so is anything not a
    string, which validation let through only where OpenAI allows it.
    """
    if kind == "completions":
        prompt = body.get("prompt")
        items = prompt if isinstance(prompt, list) else [prompt]
        return [p for p in items if isinstance(p, str)]
    texts: list[str] = []
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [
                part["text"]
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            ]
    return texts


def is_tool_call(kind: Kind, choice: dict[str, Any]) -> bool:
    if kind != "chat":
        return False
    message = choice.get("message") or choice.get("delta")
    if not isinstance(message, dict):
        return False
    return bool(message.get("tool_calls") or message.get("function_call"))


def wants_json(body: dict[str, Any]) -> bool:
    fmt = body.get("response_format")
    return isinstance(fmt, dict) and fmt.get("type") in JSON_FORMATS


def sse(data: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + dump_json(data) + b"\n\n"


def dump_json(data: dict[str, Any]) -> bytes:
    """An upstream answer as JSON for the client; 502 when it cannot be written back.

    orjson refuses objects nested deeper than 255 levels, which an upstream (or a
    client's field it echoes) can produce: that is a broken answer, not a proxy crash.
    """
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError:
        raise UpstreamError(
            "The upstream answer cannot be relayed (nested too deeply or not JSON).",
            kind="malformed",
        ) from None


def request_json(body: dict[str, Any]) -> bytes:
    """A request body as JSON for the upstream; 400 when it cannot be written.

    orjson parses deeper nesting than it writes (255 levels): a client's body can be
    valid JSON that no upstream request can carry.
    """
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:
        raise BadRequest("The request body is nested too deeply to forward.") from None


SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"
