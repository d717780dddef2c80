"""A client header timeout for uvicorn, which has none of its own.

uvicorn closes a connection that stays idle after a response (``timeout_keep_alive``),
but a connection that sends nothing, or sends its headers one byte a second, stays open
for ever: 50 such clients hold 50 connections. nginx bounds that time with
``client_header_timeout`` (60 s); :class:`HeaderTimeoutProtocol` does the same for
uvicorn's httptools protocol: the clock starts when a connection opens or a new request
begins, and the connection is closed if the headers are not complete in time.
:class:`HeaderTimeoutProtocol` is passed to uvicorn as its ``http`` protocol.

It subclasses uvicorn's protocol class (public in its package, though not documented as
an extension point): the test suite runs it against a real server, so an uvicorn change
that breaks it fails a test rather than production.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: Seconds when the uvicorn config carries no ``client_header_timeout`` (nginx's default).
DEFAULT_SECONDS = 60.0


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing connections whose headers are late.

    The limit is read from the uvicorn config (``config.client_header_timeout``), which
    travels to worker processes with it: a class made per value could not be pickled.
    """

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._header_seconds = float(getattr(config, "client_header_timeout", DEFAULT_SECONDS))
        self._header_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self._header_seconds, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that never sends a byte

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # the next request on a kept-alive connection

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Between requests uvicorn's own keep-alive timeout governs.
        self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
