"""The gateway's HTTP server: uvicorn with h11, guarded against clients that hold connections open (the one module that
imports uvicorn).

uvicorn alone closes a connection only when it idles between two requests (its keep-alive timeout); a client that
sends nothing, half a request head, or part of a declared body keeps its connection, and a request head may grow to
uvicorn's buffer. `GuardedH11Protocol` adds, per connection:

- a request-head deadline: the head (request line and headers) must be complete within `head_timeout` seconds of its
  first byte, or of the connection's opening; else 408 and close (a connection that sent nothing is just closed);
- a body stall limit: while a request body is being read, `body_timeout` seconds without a byte (while the gateway
  is ready to read) gets 408 and close; the request's handler sees the client as gone;
- a request-head size limit: a head over `max_head_bytes` gets 431 and close, read no further;
- uvicorn's keep-alive timeout: an idle connection between requests is closed after `keep_alive_timeout` seconds.
Every refusal is a JSON error naming the gateway option that sets the limit, and one log line.
"""
import asyncio
import dataclasses
import json
import logging
import socket
from typing import Optional

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("vision_attribution.gateway")


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection limits of the gateway (seconds, bytes); the defaults are its command-line defaults."""

    head_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    max_head_bytes: int = 32 * 2**10


def error_response(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 response with a JSON error body, closing the connection."""
    body = json.dumps({"error": message}).encode()
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the head deadline, body stall limit and head size limit of `limits`."""

    limits = ConnectionLimits()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard: Optional[asyncio.TimerHandle] = None
        self.guarding: Optional[str] = None  # "head" or "body": what the armed timer waits for
        self.protocol_error: Optional[h11.RemoteProtocolError] = None
        next_event = self.conn.next_event

        def recorded_next_event():
            try:
                return next_event()
            except h11.RemoteProtocolError as error:
                self.protocol_error = error
                raise

        self.conn.next_event = recorded_next_event

    @classmethod
    def with_limits(cls, limits: ConnectionLimits) -> type:
        return type(cls.__name__, (cls,), {"limits": limits})

    def connection_made(self, transport):
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch(data_arrived=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc):
        self._disarm()
        super().connection_lost(exc)

    def _client_name(self) -> str:
        return "%s:%d" % self.client if self.client else "a client"

    def _arm(self, waiting_for: str, seconds: float) -> None:
        self._disarm()
        self.guarding, self.guard = waiting_for, self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self.guard is not None:
            self.guard.cancel()
        self.guard = self.guarding = None

    def _watch(self, data_arrived: bool = False) -> None:
        """Arm the timer that the connection's state calls for: the head deadline (counted from the head's first byte,
        not re-armed by later ones), the body stall timer (re-armed by every byte), or none while the request is
        complete or the connection idles under uvicorn's keep-alive timer."""
        if self.transport.is_closing():
            return self._disarm()
        state = self.conn.their_state
        if state is h11.IDLE and self.timeout_keep_alive_task is None:
            if self.guarding != "head":
                self._arm("head", self.limits.head_timeout)
        elif state is h11.SEND_BODY:
            if data_arrived or self.guarding != "body":
                self._arm("body", self.limits.body_timeout)
        else:
            self._disarm()

    def _expired(self) -> None:
        waiting_for, self.guard, self.guarding = self.guarding, None, None
        if self.transport.is_closing():
            return
        if waiting_for == "body" and (self.flow.read_paused or self.conn.their_state is not h11.SEND_BODY):
            return self._watch()  # the gateway, not the client, is behind: wait on
        client = self._client_name()
        if waiting_for == "head":
            if self.conn.trailing_data[0] or self.conn.their_state is not h11.IDLE:
                message = f"the request's head (request line and headers) did not arrive within {self.limits.head_timeout:g} s (--head-timeout)"
                self.transport.write(error_response(408, "Request Timeout", message))
                log.info("closed the connection of %s: %s", client, message)
            else:
                log.debug("closed the connection of %s: it sent nothing for %g s (--head-timeout)", client, self.limits.head_timeout)
        else:
            message = f"the request's body stalled: no byte for {self.limits.body_timeout:g} s (--body-timeout)"
            if self.cycle is not None and not self.cycle.response_started:
                self.transport.write(error_response(408, "Request Timeout", message))
            log.info("closed the connection of %s: %s", client, message)
            if self.cycle is not None:
                self.cycle.disconnected = True
                self.cycle.message_event.set()
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse, as a JSON error: 431 for a head over the size limit."""
        error, self.protocol_error = self.protocol_error, None
        client = self._client_name()
        if error is not None and error.error_status_hint == 431:
            message = f"the request's head (request line and headers) is over this gateway's limit of {self.limits.max_head_bytes} bytes (--max-head-kb)"
            response = error_response(431, "Request Header Fields Too Large", message)
        else:
            message = f"not a valid HTTP/1.1 request ({error or msg})"
            response = error_response(400, "Bad Request", message)
        log.info("refused a request of %s: %s", client, message)
        self._disarm()
        self.transport.write(response)
        self.transport.close()


async def serve_on(app, sockets: list[socket.socket], limits: ConnectionLimits, log_level: str) -> None:
    """Serve the ASGI `app` on the listening `sockets` until the server is stopped (SIGINT, SIGTERM)."""
    config = uvicorn.Config(
        app,
        http=GuardedH11Protocol.with_limits(limits),
        lifespan="off",
        log_level=log_level,
        timeout_keep_alive=limits.keep_alive_timeout,
        h11_max_incomplete_event_size=limits.max_head_bytes,
    )
    await uvicorn.Server(config).serve(sockets=sockets)
