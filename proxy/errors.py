"""The proxy's error tree, rendered in OpenAI's error shape.

::

    ProxyError                      500 internal_error
    ├── BadRequest                  400 invalid_request_error
    ├── Unauthorized                401 authentication_error
    ├── ModelNotFound               404 model_not_found
    ├── NotFound                    404 not_found
    ├── PayloadTooLarge             413 request_too_large
    └── UpstreamError               502 upstream_error        (any other upstream status)
        ├── UpstreamRejected        400 invalid_request       (upstream 400 / 422)
        ├── UpstreamRateLimited     429 rate_limit_exceeded   (upstream 429)
        ├── UpstreamUnreachable     502 upstream_error        (connect failure, reset)
        ├── UpstreamMalformed       502 upstream_error        (not a completion)
        └── UpstreamTimeout         504 upstream_timeout

Both upstream kinds (OpenAI-compatible HTTP and litellm) raise the same classes, through
:func:`upstream_status_error` for an HTTP status, so retry and metrics code can tell a
rejected request from an overloaded or unreachable upstream without knowing which spoke.

Messages are written for the client: they never carry a stack trace, an upstream URL
or a key, so an error body can be shown to end users and logged as is.
"""

from __future__ import annotations

from typing import Any


class ProxyError(Exception):
    """Base of every error the proxy turns into an HTTP response."""

    status = 500
    type = "internal_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        """The OpenAI-shaped error object."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequest(ProxyError):
    """The request is not valid JSON or not a valid OpenAI request."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(ProxyError):
    """The API key is missing or unknown and the policy rejects unknown keys."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(ProxyError):
    """The policy routes no model of the requested name."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(ProxyError):
    """A resource other than a model (a response id, say) does not exist."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLarge(ProxyError):
    """The request body exceeds the configured limit."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UpstreamError(ProxyError):
    """The upstream failed, refused, or answered something that is not a completion."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"

    #: whether this counts against the upstream's health (metrics, alerts); a request
    #: the upstream rejects as invalid is the client's fault, not the upstream's
    upstream_fault = True

    def __init__(self, message: str, *, kind: str = "error", upstream_status: int | None = None):
        super().__init__(message)
        #: short, label-safe reason used in metrics ("connect", "status_500", "malformed", ...)
        self.kind = kind
        self.upstream_status = upstream_status


class UpstreamRejected(UpstreamError):
    """The upstream refused the request as invalid (400, 422): the client's to fix."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"
    upstream_fault = False


class UpstreamRateLimited(UpstreamError):
    """The upstream is rate limiting (429): the client may try again later."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamUnreachable(UpstreamError):
    """No connection to the upstream could be made or kept."""

    def __init__(self, message: str = "The upstream model could not be reached.") -> None:
        super().__init__(message, kind="connect")


class UpstreamMalformed(UpstreamError):
    """The upstream answered something that is not a completion."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind="malformed")


def upstream_status_error(status: int, message: str = "") -> UpstreamError:
    """The error for an upstream's HTTP error status; ``message`` is the upstream's own."""
    message = message[:500]
    if status in (400, 422):
        return UpstreamRejected(
            f"The upstream model rejected the request: {message}",
            kind=f"status_{status}",
            upstream_status=status,
        )
    if status == 429:
        return UpstreamRateLimited(
            f"The upstream model is rate limited: {message}",
            kind="status_429",
            upstream_status=status,
        )
    return UpstreamError(
        f"The upstream model failed (status {status}).",
        kind=f"status_{status}",
        upstream_status=status,
    )


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within the configured timeout."""

    status = 504
    type = "upstream_error"
    code = "upstream_timeout"

    def __init__(self, message: str = "The upstream model timed out.") -> None:
        super().__init__(message, kind="timeout")
