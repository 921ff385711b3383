"""
Window tuning between real processes: a version 1 agent gets a grown window
and every byte.  The window arithmetic is tests/test_window_tuning.py.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path

import pytest

from nova.wire.frames import Data, Fin, Open, OpenOk, Ping, Pong, Welcome, WindowUpdate
from nova.wire.handshake import make_auth

from .processes import TOKEN, free_port, novas
from .rawagent import RawAgent

pytestmark = pytest.mark.integration


def test_version1_agent_gets_a_grown_window_and_every_byte(tmp_path: Path) -> None:
    """
    A hand-driven version-1 agent that honours its credit to the byte sends
    bulk data to a user that reads fast, over a "link" whose round trip it
    makes 250 ms by answering PINGs late.  NOVAS grows the stream's window
    with ordinary WINDOW_UPDATEs (the agent sees more than the initial
    window of credit, never more than NOVAS_MAX_WINDOW), nothing is a
    protocol error, and the user gets every byte in order.
    """
    route = free_port()
    initial, most_allowed = 65_536, 1 << 20
    link_rtt = 0.25
    env = {"NOVAS_WINDOW": str(initial), "NOVAS_MAX_WINDOW": str(most_allowed)}
    total = 16 << 20
    with novas(tmp_path, [f"{route}:127.0.0.1:9@name:bulk"], env) as (server, port):
        agent = RawAgent(port)
        nonce = agent.hello()
        # The emulated link's latency, on the handshake too (NOVAS times
        # HELLO to AUTH): not a wait for an event, the link being slow.
        time.sleep(link_rtt)
        agent.send_frame(make_auth(TOKEN.encode(), nonce, agent.binding(), "bulk", (), initial))
        welcome = agent.next_frame()
        assert isinstance(welcome, Welcome) and welcome.initial_window == initial
        user = socket.create_connection(("127.0.0.1", route), timeout=30)
        got = hashlib.sha256()
        count = [0]

        def read() -> None:
            while data := user.recv(1 << 20):
                got.update(data)
                count[0] += len(data)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        frame = agent.next_frame()
        while not isinstance(frame, Open):
            frame = agent.next_frame()
        sid = frame.stream_id
        agent.send_frame(OpenOk(sid))
        chunk = bytes(range(256)) * 64  # 16 KiB
        sent_hash = hashlib.sha256()
        credit = most_credit = initial
        sent = 0
        pongs: list[tuple[float, bytes]] = []
        deadline = time.monotonic() + 120
        while sent < total:
            assert time.monotonic() < deadline, f"sent {sent} of {total} bytes"
            while credit and sent < total:
                n = min(len(chunk), credit, total - sent)
                agent.send_frame(Data(sid, chunk[:n]))
                sent_hash.update(chunk[:n])
                credit -= n
                sent += n
            try:
                frame = agent.next_frame(timeout=0.01)
            except TimeoutError:
                frame = None
            if isinstance(frame, WindowUpdate) and frame.stream_id == sid:
                credit += frame.increment
                most_credit = max(most_credit, credit)
            elif isinstance(frame, Ping):
                pongs.append((time.monotonic() + link_rtt, frame.opaque))
            else:
                assert frame is None or isinstance(frame, Pong), frame  # no GOAWAY, no RST
            while pongs and pongs[0][0] <= time.monotonic():
                agent.send_frame(Pong(pongs.pop(0)[1]))
        agent.send_frame(Fin(sid))
        reader.join(60)
        assert count[0] == total
        assert got.hexdigest() == sent_hash.hexdigest()
        assert initial < most_credit <= most_allowed, most_credit
        agent.close()
        user.close()
        assert "protocol error" not in server.text()
