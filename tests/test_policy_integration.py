"""
The agent's destination policy between real processes on loopback.  The
parser and the decisions are tests/test_policy.py.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from .processes import echo_roundtrip, fingerprint, free_port, novac, novas, target

pytestmark = pytest.mark.integration


def test_policy_between_real_processes(tmp_path: Path) -> None:
    """
    NOVAC allows one loopback port (by address, and by the name localhost,
    which the real resolver turns into loopback addresses); a route to
    another loopback port that is listening is closed at once, DENIED.
    """
    route_a, route_name, route_b = free_port(), free_port(), free_port()
    with socket.create_server(("127.0.0.1", 0)) as denied_listener:
        port_b = denied_listener.getsockname()[1]
        with (
            target("echo") as port_a,
            novas(
                tmp_path,
                [f"{route_a}:127.0.0.1:{port_a}", f"{route_name}:localhost:{port_a}", f"{route_b}:127.0.0.1:{port_b}"],
            ) as (server, port),
        ):
            env = {
                "NOVAC_SERVER": f"127.0.0.1:{port}",
                "NOVAC_TLS_FINGERPRINT": fingerprint(server),
                "NOVAC_ALLOW": f"127.0.0.1/32:{port_a},localhost:{port_a}",
            }
            with novac(tmp_path, env) as agent:
                server.wait_log("agent agent-1 registered")
                assert echo_roundtrip(route_a, b"allowed by address") == b"allowed by address"
                assert echo_roundtrip(route_name, b"allowed by name") == b"allowed by name"
                with socket.create_connection(("127.0.0.1", route_b), timeout=10) as s:
                    assert s.recv(10) == b""
                server.wait_log("DENIED")
                agent.wait_log(f"policy denied 127.0.0.1:{port_b}")
                assert "no --allow rule matches" in server.text()
        # The agent never connected to the denied port.
        denied_listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            denied_listener.accept()
