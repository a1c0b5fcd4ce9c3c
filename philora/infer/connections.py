"""How `philora serve` holds its HTTP connections: uvicorn's HTTP/1.1 protocol (h11) with a read deadline, and a
shutdown that does not wait for clients still sending.

uvicorn times out only idle keep-alive connections. A client that sends its headers or its body a byte at a time
(a slowloris), or opens a connection and sends nothing, holds the connection, and the request's task, for as long
as it likes; and on shutdown uvicorn waits for a request whose body is still arriving, so a signal could not stop
the server. Here a request's headers and body must all arrive within `read_timeout` seconds of its first byte (of
the connection's opening, for its first request): a request that is late is answered 408 and its connection closed,
and a connection that never sent a byte is closed. On shutdown a request whose body is still arriving is answered
503 and closed at once. The time the server takes to answer is not limited: the deadline ends once the request is in.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from philora.infer.openai_api import ApiError
from philora.infer.worker import SHUTTING_DOWN

ARRIVING = (h11.IDLE, h11.SEND_BODY)  # the client's side while its request is not all in (IDLE: its headers)


class TimedH11Protocol(H11Protocol):
    """uvicorn's H11Protocol with the read deadline and the shutdown above; made with `read_timeout` by keyword
    (functools.partial), as uvicorn makes it with its own arguments."""

    def __init__(self, *args: Any, read_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout
        self.deadline: asyncio.TimerHandle | None = None  # armed while a request is arriving

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state not in ARRIVING:
            self._disarm()
        elif self.deadline is None:  # the first bytes of a request after a response on this connection
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self.conn.our_state is h11.SEND_RESPONSE and self.conn.their_state is h11.SEND_BODY:
            self._refuse(SHUTTING_DOWN)  # its body is still arriving: there is no answer to finish
        else:
            super().shutdown()

    def _arm(self) -> None:
        self.deadline = self.loop.call_later(self.read_timeout, self._late)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _late(self) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        state = self.conn.our_state
        if state is h11.SEND_RESPONSE or (state is h11.IDLE and self.conn.trailing_data[0]):
            message = f"the request did not arrive within {self.read_timeout:g} s (the server's --read-timeout)"
            self._refuse(ApiError(408, message, code="request_timeout"))
        else:  # nothing sent yet, or already answered (a 413 while the body kept coming): no one to tell
            self.transport.close()

    def _refuse(self, error: ApiError) -> None:
        """Answer `error` and close. Written out here, not through h11, which cannot answer a request whose
        headers have not all arrived."""
        body = json.dumps(error.body()).encode()
        head = (
            f"HTTP/1.1 {error.status_code} {HTTPStatus(error.status_code).phrase}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        self.access_logger.info("%s - request not read in full: %d", client, error.status_code)
        self.transport.write(head.encode() + body)
        self.transport.close()
