"""
A hand-driven agent for bad-input tests: it speaks NOVA frames over TLS (or
plain TCP) one by one, so tests can send exactly the malformed or hostile
thing they mean to.
"""

from __future__ import annotations

import select
import socket
import time
from typing import Any

from OpenSSL import SSL

from nova.wire.codec import FrameDecoder
from nova.wire.errors import ProtocolError
from nova.wire.frames import Frame, Hello, encode
from nova.wire.handshake import BINDING_SIZE, EXPORTER_LABEL, make_auth


class RawAgent:
    def __init__(self, port: int, tls: bool = True, source: str | None = None) -> None:
        """C{source}: the loopback address to connect from (the server throttles and reports per source)."""
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(source, 0) if source else None
        )
        self.conn: Any = self.sock
        self.tls = tls
        self.handshake_failed = False
        if tls:
            ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
            ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
            self.conn = SSL.Connection(ctx, self.sock)
            self.conn.set_connect_state()
            deadline = time.monotonic() + 10
            while True:
                try:
                    self.conn.do_handshake()
                    break
                except SSL.WantReadError:
                    if time.monotonic() > deadline:
                        raise TimeoutError("TLS handshake") from None
                    select.select([self.sock], [], [], 0.1)
                except (SSL.Error, OSError):
                    # The server refused us before or during the TLS handshake.
                    self.handshake_failed = True
                    break
        self.decoder = FrameDecoder()
        self.pending: list[Frame] = []

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.conn.send(view[:16384])
            except SSL.WantWriteError:
                select.select([], [self.sock], [], 0.1)
                continue
            except SSL.WantReadError:
                select.select([self.sock], [], [], 0.1)
                continue
            view = view[sent:]

    def send_frame(self, frame: Frame) -> None:
        self.send(b"".join(encode(frame)))

    def binding(self) -> bytes:
        if not self.tls:
            return b""
        value: bytes = self.conn.export_keying_material(EXPORTER_LABEL, BINDING_SIZE)
        return value

    def _recv(self) -> bytes:
        try:
            data: bytes = self.conn.recv(65536)
            return data
        except SSL.WantReadError:
            raise
        except (SSL.Error, ConnectionResetError):
            return b""  # closed, cleanly or by a reset (NOVAS drops refused handshakes)

    def next_frame(self, timeout: float = 10.0) -> Frame | None:
        """The next frame, or None once the server has closed."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            if time.monotonic() > deadline:
                raise TimeoutError("no frame from the server")
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data = self._recv()
            except (TimeoutError, SSL.WantReadError):
                select.select([self.sock], [], [], 0.05)
                continue
            if not data:
                return None
            try:
                self.pending += self.decoder.feed(data)
            except ProtocolError as e:
                raise AssertionError(f"the server sent a malformed frame: {e}") from None
        return self.pending.pop(0)

    def hello(self) -> bytes:
        frame = self.next_frame()
        assert isinstance(frame, Hello), frame
        return frame.nonce

    def register(self, token: bytes, name: str, tags: tuple[tuple[str, str], ...] = (), window: int = 65536) -> Frame:
        nonce = self.hello()
        self.send_frame(make_auth(token, nonce, self.binding(), name, tags, window))
        frame = self.next_frame()
        assert frame is not None
        return frame

    def closed_by_server(self, timeout: float = 10.0) -> bool:
        """Read (discarding frames) until the server closes; False on timeout."""
        if self.handshake_failed:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                if not self._recv():
                    return True
            except (TimeoutError, SSL.WantReadError):
                select.select([self.sock], [], [], 0.05)
                continue
            except OSError:
                return True
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
