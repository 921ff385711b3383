"""
Attacks on a real NOVAS's agent port, one test per defect of the second
security review (issue 14: defects 1, 3, 4, 5, 7, 8, 14), each asserting
what an operator would notice: agents keep registering during the attack,
the impostor gets no stream, the log and the audit stay bounded.

Each attacker connects from its own loopback address (127.0.2.x): NOVAS
throttles and reports per source, and the real agents dial from 127.0.0.1.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import ssl
from pathlib import Path

import pytest

from nova.wire.errors import ErrorCode, OpenFailReason
from nova.wire.frames import GoAway, Open, OpenFail, Reject, Welcome

from .processes import (
    TOKEN,
    Proc,
    echo_roundtrip,
    fd_count,
    fingerprint,
    free_port,
    metric_total,
    novac,
    novas,
    target,
    tunnels,
    wait_for,
)
from .rawagent import RawAgent

pytestmark = pytest.mark.integration


def _pin(server: Proc, port: int) -> dict[str, str]:
    return {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_FINGERPRINT": fingerprint(server)}


def _audit(tmp: Path) -> list[dict[str, object]]:
    with sqlite3.connect(tmp / "state" / "audit.sqlite3") as db:
        rows = db.execute("SELECT kind, agent, data FROM events ORDER BY id").fetchall()
    return [{"kind": k, "agent": a, **json.loads(d)} for k, a, d in rows]


def _partial_client_hello() -> bytes:
    """The first 60 bytes of a real TLS ClientHello: the server waits for the rest."""
    out = ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()[:60]


def _closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset


def test_stalled_tls_handshakes_are_dropped_and_agents_still_register(tmp_path: Path) -> None:
    """Defect 1: 300 half-sent ClientHellos neither keep agents out nor stay open."""
    env = {"NOVAS_HANDSHAKE_TIMEOUT": "3", "NOVAS_MAX_PENDING_HANDSHAKES": "200"}
    with novas(tmp_path, [], env) as (server, port):
        baseline = fd_count(server.proc.pid)
        hello = _partial_client_hello()
        stalled = []
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.2.1", 0))
            s.sendall(hello)
            s.setblocking(False)
            stalled.append(s)
        try:
            # The attack is on: a real agent (from another address) still registers.
            with novac(tmp_path, _pin(server, port), name="db-agent-0"):
                server.wait_log("agent db-agent-0 registered", timeout=20)
            # And every stalled connection is dropped after the handshake timeout.
            wait_for(lambda: all(_closed_by_peer(s) for s in stalled), 20, "every stalled handshake dropped")
        finally:
            for s in stalled:
                s.close()
        wait_for(lambda: fd_count(server.proc.pid) <= baseline + 2, 10, "NOVAS's descriptors back to where they were")


def test_parallel_guesses_check_at_most_the_budget(tmp_path: Path) -> None:
    """Defect 3: 120 wrong tokens sent at once from one address: only the first 20 are checked."""
    with novas(tmp_path, [], {"NOVAS_AUTH_BLOCK_AFTER": "20"}) as (server, port):
        guessers = [RawAgent(port, source="127.0.2.2") for _ in range(120)]
        nonces = [g.hello() for g in guessers]  # every one is past the connect-time check
        from nova.wire.handshake import make_auth

        for i, (g, nonce) in enumerate(zip(guessers, nonces, strict=True)):
            g.send_frame(make_auth(b"wrong-token-guess-%04d" % i, nonce, g.binding(), f"guess-{i}", (), 65536))
        answers = [g.next_frame() for g in guessers]
        assert all(isinstance(a, Reject) and a.code == ErrorCode.AUTH_FAILED for a in answers)
        for g in guessers:
            g.close()
        checked = metric_total(server, "nova_auth_failures_total", reason="AUTH_FAILED")
        unchecked = metric_total(server, "nova_auth_failures_total", reason="BLOCKED")
        assert checked <= 20, f"{checked:.0f} MACs were checked after the budget of 20"
        assert unchecked >= 100
        # Another address is not affected.
        with novac(tmp_path, _pin(server, port), name="db-agent-0"):
            server.wait_log("agent db-agent-0 registered")


def test_agents_sharing_a_failing_address_still_register(tmp_path: Path) -> None:
    """Defect 4: after 12 failures from the agents' own address, a valid agent still gets in."""
    with novas(tmp_path, [], {}) as (server, port):
        guessers = [RawAgent(port) for _ in range(12)]  # from 127.0.0.1, like the agent
        for i, g in enumerate(guessers):
            answer = g.register(b"wrong-token-guess-%04d" % i, f"guess-{i}")
            assert isinstance(answer, Reject)
            g.close()
        # NOVAC's own handshake timeout (10 s) must cover the delay.
        with novac(tmp_path, _pin(server, port), name="db-agent-0") as agent:
            server.wait_log("agent db-agent-0 registered", timeout=30)
        assert "HANDSHAKE_TIMEOUT" not in agent.text()


def test_a_live_agents_name_cannot_be_taken(tmp_path: Path) -> None:
    """Defect 5: an impostor with the shared token is refused; every stream goes to the real agent."""
    route = free_port()
    with target("echo") as echo, novas(tmp_path, [f"{route}:127.0.0.1:{echo}@name:db-agent-0"]) as (server, port):
        with novac(tmp_path, _pin(server, port), name="db-agent-0"):
            server.wait_log("agent db-agent-0 registered")
            for _ in range(5):
                impostor = RawAgent(port, source="127.0.2.3")
                answer = impostor.register(TOKEN.encode(), "db-agent-0")
                assert isinstance(answer, Reject) and answer.code == ErrorCode.NAME_IN_USE, answer
                assert "in use by a live agent connected from 127.0.0.1" in answer.message
                assert impostor.closed_by_server(10)
            for i in range(25):
                assert echo_roundtrip(route, b"request %d" % i, timeout=10) == b"request %d" % i
            assert server.text().count("agent db-agent-0 registered") == 1
            [tunnel] = tunnels(server)
            assert tunnel["address"] and str(tunnel["address"]).startswith("127.0.0.1:")


def test_a_frozen_agent_is_replaced_and_counted_out(tmp_path: Path) -> None:
    """Defects 5 and 7: a tunnel that stops answering is replaced within seconds; gauge and audit stay exact."""
    route = free_port()
    (tmp_path / "second").mkdir()
    with target("echo") as echo, novas(tmp_path, [f"{route}:127.0.0.1:{echo}@name:db-agent-0"]) as (server, port):
        with novac(tmp_path, _pin(server, port), name="db-agent-0") as first:
            server.wait_log("agent db-agent-0 registered")
            first.proc.send_signal(signal.SIGSTOP)  # alive to TCP, deaf to pings
            try:
                with novac(tmp_path / "second", _pin(server, port), name="db-agent-0"):
                    wait_for(lambda: server.text().count("agent db-agent-0 registered") == 2, 20, "the replacement")
                    assert "it did not answer a ping when db-agent-0 registered again" in server.text()
                    assert echo_roundtrip(route, b"through the new one") == b"through the new one"
                    assert metric_total(server, "nova_tunnels_connected") == 1
            finally:
                first.proc.send_signal(signal.SIGCONT)
    kinds = [r["kind"] for r in _audit(tmp_path) if r["agent"] == "db-agent-0"]
    assert kinds.count("tunnel_registered") == 2
    assert kinds.count("tunnel_unregistered") == 2  # the replaced one too, and the last at shutdown


def test_token_scopes_limit_names_and_tags(tmp_path: Path) -> None:
    """Defect 5: a token's scope bounds the names and tags its holder may register; SIGHUP re-reads it."""
    prod, dev = "prod-token-0123456789abcdef", "dev-token-0123456789abcdef"
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{prod} id=prod name=db-* tags=Env=Production\n{dev} id=dev tags=Env=Dev;Team=*\n")
    route = free_port()
    env = {"NOVAS_AGENT_TOKEN_FILE": str(token_file), "NOVAS_AGENT_TOKEN": ""}
    with target("echo") as echo, novas(tmp_path, [f"{route}:127.0.0.1:{echo}@Env=Production"], env) as (server, port):
        pin = _pin(server, port)
        with novac(tmp_path, pin | {"NOVAC_TOKEN": prod, "NOVAC_TAGS": "Env=Production"}, name="db-prod-0"):
            server.wait_log("agent db-prod-0 registered")
            with novac(tmp_path, pin | {"NOVAC_TOKEN": dev, "NOVAC_TAGS": "Env=Production"}, name="db-dev-0") as d:
                d.wait_log("FORBIDDEN")
                server.wait_log("may not claim Env=Production")
                with novac(tmp_path, pin | {"NOVAC_TOKEN": prod, "NOVAC_TAGS": "Env=Production"}, name="web-0") as w:
                    w.wait_log("may not register the name 'web-0'")
                for i in range(12):
                    assert echo_roundtrip(route, b"%d" % i) == b"%d" % i
                assert server.text().count("through db-prod-0") >= 12
            [tunnel] = tunnels(server)
            assert tunnel["token_id"] == "prod"
            # Narrow the scope: the tunnel it no longer admits is closed.
            token_file.write_text(f"{prod} id=prod name=web-*\n{dev} id=dev\n")
            server.proc.send_signal(signal.SIGHUP)
            server.wait_log("agent db-prod-0 disconnected: this token may not register the name 'db-prod-0'")
    refusals = [r for r in _audit(tmp_path) if r["kind"] == "auth_failed" and r.get("code") == "FORBIDDEN"]
    assert {r.get("token_id") for r in refusals} >= {"dev", "prod"}
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".sqlite3"):
            data = path.read_bytes()
            assert prod.encode() not in data and dev.encode() not in data, path


def test_a_refusal_flood_leaves_log_and_audit_bounded(tmp_path: Path) -> None:
    """Defect 8: 5,000 connect-and-close from one address: a few log lines and records, all counted."""
    with novas(tmp_path, [], {}) as (server, port):
        for _ in range(5000):
            with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.2.5", 0)):
                pass
        claimant = RawAgent(port, source="127.0.2.6")
        assert isinstance(claimant.register(b"wrong-token-guess-0000", "db-agent-0"), Reject)
        claimant.close()
        # Closed at once (CLOSED_EARLY), or refused while 128 were pending (OVERLOADED): all counted.
        wait_for(lambda: metric_total(server, "nova_auth_failures_total") >= 5001, 30, "every refusal counted")
        during = [line for line in server.text().splitlines() if "127.0.2.5" in line]
        assert len(during) <= 2, during[:5]
    # At shutdown what was only counted is summarised: nothing is lost.
    assert "connection(s) from 127.0.2.5 that did not register" in server.text()
    lines = [line for line in server.text().splitlines() if "127.0.2.5" in line]
    assert len(lines) <= 3, lines[:5]
    records = [r for r in _audit(tmp_path) if r["kind"] == "auth_failed" and str(r["source"]).startswith("127.0.2.5")]
    assert len(records) <= 3
    assert sum(int(r["count"]) for r in records) == 5000  # type: ignore[call-overload]
    [claimed] = [r for r in _audit(tmp_path) if r["kind"] == "auth_failed" and str(r["source"]).startswith("127.0.2.6")]
    assert claimed["agent"] == "" and claimed["claimed_name"] == "db-agent-0"


def test_peer_text_is_escaped_in_the_log_and_the_audit(tmp_path: Path) -> None:
    """Defect 14: OPEN_FAIL and GOAWAY messages with CR LF and bidi controls cannot forge log lines."""
    route = free_port()
    forged = "agent db-agent-0 registered from 10.9.9.9"
    with novas(tmp_path, [f"{route}:127.0.0.1:9@name:evil-text"]) as (server, port):
        agent = RawAgent(port, source="127.0.2.7")
        assert isinstance(agent.register(TOKEN.encode(), "evil-text"), Welcome)
        user = socket.create_connection(("127.0.0.1", route), timeout=10)
        frame = agent.next_frame()
        while not isinstance(frame, Open):
            frame = agent.next_frame()
        agent.send_frame(OpenFail(frame.stream_id, OpenFailReason.REFUSED, f"no\r\n{forged}\u202e"))
        assert user.recv(10) == b""
        user.close()
        agent.send_frame(GoAway(ErrorCode.NO_ERROR, f"bye\r\n{forged}"))
        server.wait_log("bye\\r\\nagent db-agent-0")
        server.wait_log("no\\r\\nagent db-agent-0")
        agent.close()
    assert not any(line.lstrip().startswith(forged) for line in server.text().splitlines())
    assert forged not in server.text().replace(f"\\n{forged}", "")
    messages = [str(r.get("message", "")) for r in _audit(tmp_path) if r["kind"] == "open_failed"]
    assert messages and all("\r" not in m and "\n" not in m and "\u202e" not in m for m in messages)
