"""A role's or a user's line to a request/reply service (control, the writer's live results):
one request, one reply, every wait bounded. A client of control made from the config carries the
session token when CURVE is off (transport.session_token)."""

from __future__ import annotations

from pathlib import Path

import zmq

from stemstream.transport import session_token
from stemstream.transport.messages import MessageError, pack_control, unpack_control


class ControlUnavailable(RuntimeError):
    """The service (control, the writer's live results) did not answer within the timeout."""


class ControlClient:
    """Request/reply over a DEALER socket. After a timeout the socket is replaced, so a reply that
    arrives late is never mistaken for the answer to the next request."""

    def __init__(self, endpoint: str, context: zmq.Context | None = None, timeout_s: float = 5.0, curve=None,
                 token_file: Path | None = None):
        """curve: a stemstream.transport.curve.Curve when [security] curve is on; token_file: where
        control's session token is, sent with every request (see for_config)."""
        self.endpoint = endpoint
        self.curve = curve
        self.token_file = token_file
        self._token: str | None = None  # read from token_file when first needed, again after a refusal
        self.context = context or zmq.Context.instance()
        self.timeout_ms = int(timeout_s * 1000)
        self._socket = None

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self.curve is not None:
                self.curve.client(sock)
            sock.connect(self.endpoint)
            self._socket = sock
        return self._socket

    @classmethod
    def for_config(cls, config, context: zmq.Context | None = None, timeout_s: float = 5.0) -> "ControlClient":
        """A client of the config's control: with CURVE when ``[security] curve`` is on, else with
        the session token."""
        from stemstream.transport.curve import curve_for

        curve = curve_for(config)
        token_file = None if curve is not None else session_token.token_path(config)
        return cls(config.network.control(), context, timeout_s, curve=curve, token_file=token_file)

    def request(self, op: str, timeout_s: float | None = None, **fields) -> dict:
        """Send ``{op, **fields}``; return the reply. Raises ControlUnavailable on timeout."""
        reply, _ = self.request_parts(op, timeout_s, **fields)
        return reply

    def request_parts(self, op: str, timeout_s: float | None = None, **fields) -> tuple[dict, list[bytes]]:
        """Like :meth:`request`, for services whose replies carry big payloads (PNG images) as
        frames of their own after the small map: (the map, the payload frames)."""
        sent_token = self._token_to_send()
        reply, parts = self._exchange(op, timeout_s, fields, sent_token)
        if reply.get(session_token.REFUSED_FIELD) and self.token_file is not None:
            self._token = None  # control was restarted with another token, or wrote it only now
            token = self._token_to_send()
            if token is not None and token != sent_token:
                return self._exchange(op, timeout_s, fields, token)
            what = "holds no token" if token is None else "holds another token than control's"
            reply["error"] = (f"{reply.get('error')} ({self.token_file} {what}: run this where control runs, "
                              "or set [security] token_file to control's token file)")
        return reply, parts

    def _token_to_send(self) -> str | None:
        if self._token is None and self.token_file is not None:
            self._token = session_token.read_token(self.token_file)
        return self._token

    def _exchange(self, op: str, timeout_s: float | None, fields: dict, token: str | None) -> tuple[dict, list[bytes]]:
        request = {"op": op, **fields}
        if token is not None:
            request[session_token.TOKEN_FIELD] = token
        sock = self._connect()
        sock.send_multipart([b"", pack_control(request)])
        timeout = self.timeout_ms if timeout_s is None else int(timeout_s * 1000)
        if not sock.poll(timeout, zmq.POLLIN):
            self.close()
            raise ControlUnavailable(f"{self.endpoint} did not answer '{op}' within {timeout / 1000:g} s")
        parts = sock.recv_multipart()
        if len(parts) > 1 and parts[0] == b"":  # a REQ-style empty delimiter, if the service sent one
            parts = parts[1:]
        try:
            return unpack_control(parts[0]), parts[1:]
        except MessageError as exc:
            raise ControlUnavailable(f"{self.endpoint} sent an unreadable reply ({exc})") from None

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None
