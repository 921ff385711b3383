"""
Data may follow OPEN (protocol.md §7.2; nova.mux.core's rule): the server's
first DATA goes right after OPEN, within the early-data budget, and the agent
holds it until it accepts the stream; refused streams drop it; without the
feature nothing changes.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import error
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IProtocol
from twisted.python.failure import Failure

from nova.mux.core import DataAvailable, OpenAccepted, OpenRefused, Role, StreamRequested
from nova.server.early import EarlyData
from nova.server.tunnel import OpenFailed, ServerTunnel
from nova.wire.codec import FrameDecoder
from nova.wire.errors import EarlyDataExceeded, FlowControlError, OpenFailReason, ProtocolError
from nova.wire.frames import EARLY_DATA_BUDGET, Data, Fin, Frame, Open, OpenOk

from .reference_mux import ReferenceMultiplexer as Multiplexer
from .test_mux_core import frames_of, over_the_wire, pump, take_all
from .test_tunnel import Harness, Recorder, TargetTransport

WINDOW = 256 * 1024


def early_pair(
    budget: int = EARLY_DATA_BUDGET, window: int = WINDOW, max_streams: int = 1024
) -> tuple[Multiplexer, Multiplexer]:
    server = Multiplexer(Role.SERVER, local_window=window, peer_window=window)
    agent = Multiplexer(Role.AGENT, local_window=window, peer_window=window, max_streams=max_streams)
    server.early_budget = agent.early_budget = budget
    return server, agent


def test_first_data_follows_open_without_waiting_for_open_ok() -> None:
    server, agent = early_pair()
    sid = server.open("db", 5432)
    server.send(sid, b"GET / HTTP/1.1\r\n\r\n")
    frames = frames_of(server)
    assert frames == [Open(sid, "db", 5432), Data(sid, b"GET / HTTP/1.1\r\n\r\n")]
    events = [e for f in frames for e in agent.receive(over_the_wire(f))]
    assert events == [StreamRequested(sid, "db", 5432), DataAvailable(sid)]
    # Held until accepted: the window is spent, no credit is returned yet.
    assert agent.inbox_bytes(sid) == 18
    assert agent.receive_window(sid) == WINDOW - 18
    agent.accept(sid)
    assert take_all(agent, sid) == b"GET / HTTP/1.1\r\n\r\n"
    assert pump(agent, server) == [OpenAccepted(sid)]
    agent.check_invariants()
    server.check_invariants()


def test_only_the_budget_goes_before_open_ok_the_rest_after() -> None:
    server, agent = early_pair(budget=1000)
    sid = server.open("db", 5432)
    server.send(sid, b"x" * 5000)
    sent = frames_of(server)
    assert [type(f) for f in sent] == [Open, Data]
    assert sum(len(f.data) for f in sent if isinstance(f, Data)) == 1000
    for f in sent:
        agent.receive(over_the_wire(f))
    assert server.send_window(sid) == WINDOW - 1000  # early bytes use the window like any others
    agent.accept(sid)
    pump(agent, server)
    pump(server, agent)
    assert take_all(agent, sid) == b"x" * 5000
    server.check_invariants()
    agent.check_invariants()


def test_fin_waits_for_open_ok() -> None:
    server, _ = early_pair()
    sid = server.open("db", 5432)
    server.send(sid, b"hi")
    server.close_send(sid)
    assert frames_of(server) == [Open(sid, "db", 5432), Data(sid, b"hi")]
    server.receive(OpenOk(sid))
    assert frames_of(server) == [Fin(sid)]


def test_open_goes_before_its_data_even_while_control_frames_wait() -> None:
    """Data allowed but control held (the transport pushes back on control): the early DATA waits too."""
    server, _ = early_pair()
    sid = server.open("db", 5432)
    server.send(sid, b"hello")
    out: list[bytes | memoryview] = []
    assert server.pull(out, 1 << 20, data_allowed=True, control_allowed=False) == (0, [])
    assert out == []
    server.pull(out, 1 << 20)
    frames = frames_of_bytes(b"".join(bytes(p) for p in out))
    assert frames == [Open(sid, "db", 5432), Data(sid, b"hello")]


def frames_of_bytes(data: bytes) -> list[Frame]:
    return list(FrameDecoder().feed(data))


@pytest.mark.parametrize("reason", [OpenFailReason.REFUSED, OpenFailReason.DENIED])
def test_refused_stream_discards_early_data_and_nothing_reaches_the_next(reason: OpenFailReason) -> None:
    server, agent = early_pair()
    sid = server.open("db", 5432)
    server.send(sid, b"secret")
    pump(server, agent)
    agent.refuse(sid, reason, "no")
    assert pump(agent, server) == [OpenRefused(sid, reason, "no")]
    assert sid not in agent and sid not in server
    # DATA that crossed the OPEN_FAIL is discarded, not held.
    assert agent.receive(Data(sid, b"late")) == []
    nxt = server.open("db", 5432)
    server.send(nxt, b"public")
    pump(server, agent)
    agent.accept(nxt)
    assert take_all(agent, nxt) == b"public"
    agent.check_invariants()


def test_a_server_that_sends_more_than_the_budget_is_a_protocol_error() -> None:
    _, agent = early_pair(budget=1000)
    agent.receive(Open(1, "db", 5432))
    agent.receive(Data(1, b"x" * 600))
    with pytest.raises(EarlyDataExceeded) as caught:
        agent.receive(Data(1, b"x" * 401))
    assert isinstance(caught.value, ProtocolError)
    assert agent.inbox_bytes(1) == 600  # the excess was never held


def test_agent_holds_at_most_max_streams_times_the_budget() -> None:
    _, agent = early_pair(budget=1000, max_streams=3)
    for sid in range(1, 6):
        agent.receive(Open(sid, "db", 5432))
        agent.receive(Data(sid, b"x" * 1000))  # streams 4 and 5 were refused (OVERLOADED): dropped
    assert sum(agent.inbox_bytes(s) for s in range(1, 6)) == 3 * 1000


def test_early_data_within_the_budget_but_beyond_the_window_is_a_flow_control_error() -> None:
    agent = Multiplexer(Role.AGENT, local_window=16_384, peer_window=16_384)
    agent.early_budget = 64 * 1024
    agent.receive(Open(1, "db", 5432))
    with pytest.raises((FlowControlError, EarlyDataExceeded)):
        agent.receive(Data(1, b"x" * 16_385))


@pytest.mark.parametrize("side", ["server", "agent"])
def test_without_the_feature_nothing_changes(side: str) -> None:
    """Version 1, or a version-2 peer without the bit: DATA waits for OPEN_OK, and DATA before it is an error."""
    server, agent = early_pair(budget=0)
    sid = server.open("db", 5432)
    server.send(sid, b"hi")
    assert frames_of(server) == [Open(sid, "db", 5432)]
    agent.receive(Open(sid, "db", 5432))
    with pytest.raises(ProtocolError, match="before it was opened"):
        agent.receive(Data(sid, b"hi"))


def test_only_the_feature_on_the_agent_does_not_make_the_server_send_early() -> None:
    server, agent = early_pair(budget=0)
    agent.early_budget = EARLY_DATA_BUDGET
    sid = server.open("db", 5432)
    server.send(sid, b"hi")
    assert frames_of(server) == [Open(sid, "db", 5432)]


# Any interleaving of OPEN, DATA, OPEN_OK and OPEN_FAIL keeps byte accounting exact.


class _Interleaving:
    """Drives a server and an agent through one schedule, keeping what was written and delivered."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.server, self.agent = early_pair(budget=budget, window=65_536)
        self.opened: list[int] = []
        self.requested: list[int] = []
        self.accepted: set[int] = set()
        self.refused: set[int] = set()
        self.written: dict[int, bytes] = {}
        self.delivered: dict[int, bytes] = {}
        self.counter = 0

    def move(self, to_agent: bool, n: int) -> None:
        src, dst = (self.server, self.agent) if to_agent else (self.agent, self.server)
        for _ in range(n):
            frame = src.next_frame()
            if frame is None:
                return
            for e in dst.receive(over_the_wire(frame)):
                if isinstance(e, StreamRequested):
                    self.requested.append(e.stream_id)

    def send(self, index: int, size: int) -> None:
        if self.opened:
            sid = self.opened[index % len(self.opened)]
            if sid in self.server:
                self.counter += 1
                data = bytes([self.counter % 256]) * size
                self.server.send(sid, data)
                self.written[sid] = self.written.get(sid, b"") + data

    def answer(self, index: int, accept: bool) -> None:
        if self.requested:
            sid = self.requested.pop(index % len(self.requested))
            if accept:
                self.agent.accept(sid)
                self.accepted.add(sid)
            else:
                self.agent.refuse(sid, OpenFailReason.REFUSED, "no")
                self.refused.add(sid)

    def take(self) -> None:
        for sid in self.accepted:
            self.delivered[sid] = self.delivered.get(sid, b"") + take_all(self.agent, sid)

    def step(self, step: tuple[str, int, int]) -> None:
        kind, a, b = step
        actions = {
            "open": lambda: self.opened.append(self.server.open("db", 5432)),
            "send": lambda: self.send(a, b),
            "to_agent": lambda: self.move(True, a),
            "to_server": lambda: self.move(False, a),
            "accept": lambda: self.answer(a, True),
            "refuse": lambda: self.answer(a, False),
            "take": self.take,
        }
        actions[kind]()
        # What the agent holds for a stream it has not accepted stays within the budget.
        assert all(self.agent.inbox_bytes(sid) <= self.budget for sid in self.requested)
        self.agent.check_invariants()
        self.server.check_invariants()


_steps = st.lists(
    st.tuples(
        st.sampled_from(["open", "send", "to_agent", "to_server", "accept", "refuse", "take"]),
        st.integers(0, 7),
        st.integers(1, 40_000),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=_steps, budget=st.sampled_from([0, 1000, EARLY_DATA_BUDGET]))
def test_any_interleaving_keeps_byte_accounting_exact(steps: list[tuple[str, int, int]], budget: int) -> None:
    run = _Interleaving(budget)
    for step in steps:
        run.step(step)
    # Let everything settle: every accepted stream gets exactly what was written, in order.
    for _ in range(200):
        run.move(True, 1000)
        run.move(False, 1000)
        run.take()
    for sid in run.accepted:
        assert run.delivered.get(sid, b"") == run.written.get(sid, b"")
    for sid in run.refused:
        assert sid not in run.agent and sid not in run.server


# The adapters, in memory (tests/test_tunnel.py's harness): NOVAS and NOVAC over TLS.


class _PendingTargets(Harness):
    """The harness with target connections that complete when the test says."""

    def __init__(self, agent_version: int = 2) -> None:
        self.pending: list[tuple[Deferred[IProtocol], IProtocol]] = []
        self.connected: IProtocol | None = None
        super().__init__(max_version=agent_version)

    def _connect_target(self, host: str, port: int, protocol: IProtocol) -> Deferred[IProtocol]:
        if (host, port) in self.refuse:
            return fail(self.refuse[(host, port)])
        d: Deferred[IProtocol] = Deferred()
        self.pending.append((d, protocol))
        return d

    def connect_next(self) -> TargetTransport:
        d, protocol = self.pending.pop(0)
        transport = TargetTransport()
        protocol.makeConnection(transport)
        d.callback(protocol)
        self.flush()
        self.connected = protocol
        return transport

    def open_early(self, data: bytes, host: str = "db.internal", port: int = 5432) -> tuple[list[Any], EarlyData]:
        tunnel = self.server_context.registry.get("db-agent")
        assert isinstance(tunnel, ServerTunnel)
        paused: list[bool] = [True]
        early = EarlyData(lambda: paused.append(True), lambda: paused.append(False))
        results: list[Any] = []
        tunnel.open_stream(host, port, early).addBoth(results.append)
        early.write(data)
        self.flush()
        return results, early


def test_in_memory_both_sides_agree_on_the_feature_and_data_waits_for_the_connect() -> None:
    h = _PendingTargets()
    assert h.server.mux is not None and h.agent.mux is not None
    assert h.server.mux.early_budget == h.agent.mux.early_budget == EARLY_DATA_BUDGET
    results, early = h.open_early(b"*1\r\n$4\r\nPING\r\n")
    assert results == [] and early.attached
    (sid,) = h.agent.mux.stream_ids
    assert h.agent.mux.inbox_bytes(sid) == 14  # held by the agent while it connects
    target = h.connect_next()
    assert target.value() == b"*1\r\n$4\r\nPING\r\n"
    stream = results[0]
    assert early.unsent() == b""  # the tunnel took it all: nothing is written twice
    user = Recorder()
    stream.makeConnection(user)
    assert h.connected is not None
    h.connected.dataReceived(b"+PONG\r\n")  # the target answers
    h.flush()
    assert user.received == b"+PONG\r\n"
    h.server.mux.check_invariants()
    h.agent.mux.check_invariants()


def test_in_memory_refused_target_discards_early_data_and_the_next_stream_gets_only_its_own() -> None:
    h = _PendingTargets()
    h.refuse[("db.internal", 1)] = error.ConnectionRefusedError()
    results, _ = h.open_early(b"secret", port=1)
    (failure,) = results
    assert isinstance(failure, Failure) and isinstance(failure.value, OpenFailed)
    assert failure.value.reason == OpenFailReason.REFUSED
    assert h.agent.mux is not None and h.agent.mux.stream_ids == []
    results, _ = h.open_early(b"public")
    target = h.connect_next()
    assert target.value() == b"public"


def test_in_memory_a_version_1_agent_gets_no_data_before_open_ok() -> None:
    h = _PendingTargets(agent_version=1)
    assert h.server.mux is not None and h.server.mux.early_budget == 0
    _, early = h.open_early(b"hello")
    assert not early.attached  # the entry stays paused, as with version 1
    assert h.agent.mux is not None
    (sid,) = h.agent.mux.stream_ids
    assert h.agent.mux.inbox_bytes(sid) == 0
    h.connect_next()
    assert early.unsent() == b"hello"  # written to the stream once it is open


def test_early_data_is_replayed_to_the_next_attempt_and_reading_stops_at_the_budget() -> None:
    reading: list[bool] = []
    early = EarlyData(lambda: reading.append(False), lambda: reading.append(True), budget=10)
    first: list[bytes] = []
    early.attach(first.append)
    assert reading == [True]  # an agent that takes early data: the entry reads
    early.write(b"abcd")
    early.detach()  # that agent refused: reading pauses, the bytes stay
    assert first == [b"abcd"] and reading == [True, False]
    second: list[bytes] = []
    early.attach(second.append)
    early.write(b"efghijk")  # past the budget: reading pauses again
    assert second == [b"abcd", b"efghijk"] and reading[-1] is False
    assert early.unsent() == b""  # the second tunnel took it all
    # No tunnel took any (version-1 agents): everything is written once the stream is open.
    early = EarlyData(lambda: None, lambda: None)
    early.write(b"x")
    assert early.unsent() == b"x"


def test_attaching_reads_what_the_user_sent_already_after_resuming() -> None:
    """The entry's waiting bytes are read as the OPEN is written (one write for both), never while paused."""
    calls: list[str] = []
    early = EarlyData(
        lambda: calls.append("pause"), lambda: calls.append("resume"), budget=4, read_now=lambda: calls.append("read")
    )
    early.attach(lambda data: calls.append(f"sink {data!r}"))
    assert calls == ["resume", "read"]
    early.write(b"abcd")  # the budget: reading pauses
    early.detach()
    calls.clear()
    early.attach(lambda data: calls.append(f"sink {data!r}"))
    assert calls == ["sink b'abcd'"]  # the budget is spent: neither resumed nor read
