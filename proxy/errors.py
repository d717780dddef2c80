"""The proxy's error tree, rendered in OpenAI's error shape.

::

    ProxyError                      500 internal_error
    ├── BadRequest                  400 invalid_request_error
    ├── Unauthorized                401 authentication_error
    ├── ModelNotFound               404 model_not_found
    ├── NotFound                    404 not_found
    ├── PayloadTooLarge             413 request_too_large
    └── UpstreamError               502 upstream_error
        └── UpstreamTimeout         504 upstream_timeout

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

    def __init__(self, message: str, *, kind: str = "error", upstream_status: int | None = None):
        super().__init__(message)
        #: short, label-safe reason used in metrics ("connect", "status_500", "malformed", ...)
        self.kind = kind
        self.upstream_status = upstream_status


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within the configured timeout."""

    status = 504
    type = "upstream_error"
    code = "upstream_timeout"

    def __init__(self, message: str = "The upstream model timed out.") -> None:
        super().__init__(message, kind="timeout")
