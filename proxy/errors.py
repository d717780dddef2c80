"""The proxy's error tree, rendered in OpenAI's error shape.

::

    ProxyError                      500 internal_error
    ├── BadRequest                  400 invalid_request_error
    ├── Unauthorized                401 authentication_error
    ├── ModelNotFound               404 model_not_found
    ├── NotFound                    404 not_found
    ├── MethodNotAllowed            405 method_not_allowed
    ├── RequestTimeout              408 request_timeout       (body not sent in time)
    ├── Conflict                    409 conflict              (e.g. feedback given twice)
    ├── PayloadTooLarge             413 request_too_large
    ├── RateLimited                 429 rate_limit_exceeded   (a tenant limit; Retry-After)
    ├── ClientClosedRequest         499 client_closed_request (client gone; only counted)
    └── UpstreamError               502 upstream_error        (other statuses; 503 kept)
        ├── UpstreamRejected        400 invalid_request       (upstream 400; 422 kept)
        ├── UpstreamRateLimited     429 rate_limit_exceeded   (upstream 429)
        ├── UpstreamUnreachable     502 upstream_error        (connect failure, reset)
        ├── UpstreamMalformed       502 upstream_error        (not a completion)
        ├── UpstreamUnavailable     503 upstream_unavailable  (circuit breaker open)
        └── UpstreamTimeout         504 upstream_timeout

Both upstream kinds (OpenAI-compatible HTTP and litellm) raise the same classes, through
:func:`upstream_status_error` for an HTTP status, so retry and metrics code can tell a
rejected request from an overloaded or unreachable upstream without knowing which spoke.

Messages are written for the client: they never carry a stack trace, an upstream URL
or a key, so an error body can be shown to end users and logged as is.
"""

from __future__ import annotations

import math
from typing import Any

from proxy.redaction import PATTERNS_ONLY


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

    def headers(self) -> dict[str, str]:
        """Extra response headers (``Retry-After``, say); none by default."""
        return {}


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


class MethodNotAllowed(ProxyError):
    """The endpoint exists but not for this HTTP method."""

    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Conflict(ProxyError):
    """The request contradicts what was already recorded (feedback given twice, differently)."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RequestTimeout(ProxyError):
    """The client did not send its request body in time (a slow client holds a slot)."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class ClientClosedRequest(ProxyError):
    """The client went away before its answer was ready (nginx's 499; nobody reads it)."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


class PayloadTooLarge(ProxyError):
    """The request body exceeds the configured limit."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(ProxyError):
    """A tenant's rate or concurrency limit refused the request: retry after a while."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, param: str | None = None):
        super().__init__(message, param=param)
        #: seconds until the request may be admitted
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        # Retry-After takes whole seconds; round up so a retry on time is admitted.
        return {"retry-after": str(max(1, math.ceil(self.retry_after)))}


class UpstreamError(ProxyError):
    """The upstream failed, refused, or answered something that is not a completion."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"

    #: whether this counts against the upstream's health (metrics, alerts); a request
    #: the upstream rejects as invalid is the client's fault, not the upstream's
    upstream_fault = True

    def __init__(
        self,
        message: str,
        *,
        kind: str = "error",
        upstream_status: int | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        #: short, label-safe reason used in metrics ("connect", "status_500", "malformed", ...)
        self.kind = kind
        self.upstream_status = upstream_status
        #: seconds the upstream asked us to wait (its ``Retry-After``), when it said
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        # The upstream's own Retry-After reaches the client, as a proxy should pass it.
        if self.retry_after is None:
            return {}
        return {"retry-after": str(max(0, math.ceil(self.retry_after)))}


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


class UpstreamUnavailable(UpstreamError):
    """The upstream's circuit breaker is open: failing fast instead of calling it.

    ``retry_after`` is the rest of the cool-down (``None`` while a probe is in flight).
    """

    status = 503
    type = "upstream_error"
    code = "upstream_unavailable"

    def __init__(
        self,
        message: str = "The upstream model is unavailable; try again later.",
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, kind="circuit_open", retry_after=retry_after)

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        # Whole seconds, rounded up: a client that waits that long finds a probe allowed.
        return {"retry-after": str(max(1, math.ceil(self.retry_after)))}


def upstream_status_error(status: int, message: str = "") -> UpstreamError:
    """The error for an upstream's HTTP error status; ``message`` is the upstream's own.

    Upstreams echo requests in their errors, keys included: the message is cut to 500
    characters and stripped of anything key-shaped before a client can see it.
    """
    message = PATTERNS_ONLY(message[:500])
    if status in (400, 422):
        rejected = UpstreamRejected(
            f"The upstream model rejected the request: {message}",
            kind=f"status_{status}",
            upstream_status=status,
        )
        rejected.status = status  # 422 stays 422: the client may tell the two apart
        return rejected
    if status == 429:
        return UpstreamRateLimited(
            f"The upstream model is rate limited: {message}",
            kind="status_429",
            upstream_status=status,
        )
    if status == 503:
        overloaded = UpstreamError(
            "The upstream model is unavailable (status 503); try again later.",
            kind="status_503",
            upstream_status=status,
        )
        overloaded.status, overloaded.code = 503, "upstream_unavailable"
        return overloaded
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
