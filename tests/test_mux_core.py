"""
The multiplexer's pure state machine (nova.mux.core, protocol.md §5-§6): a
server and an agent instance wired back to back, every frame passed through
the real encoder and decoder on the way.
"""

from __future__ import annotations

import random
import tracemalloc
from collections import deque
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

from nova.mux.core import (
    DataAvailable,
    Event,
    GoAwayReceived,
    OpenAccepted,
    OpenRefused,
    PongReceived,
    Role,
    StreamEnded,
    StreamRequested,
    StreamReset,
    WindowOpened,
)
from nova.mux.core import Multiplexer as CoreMultiplexer
from nova.wire.codec import FrameDecoder
from nova.wire.errors import ErrorCode, FlowControlError, OpenFailReason, ProtocolError
from nova.wire.frames import (
    MAX_DATA_PAYLOAD,
    MAX_WINDOW,
    Data,
    Fin,
    Frame,
    GoAway,
    Open,
    OpenFail,
    OpenOk,
    Ping,
    Pong,
    Rst,
    WindowUpdate,
    encode,
)

from .reference_mux import ReferenceMultiplexer as Multiplexer  # the core plus its one-at-a-time model

WINDOW = 16_384


def over_the_wire(frame: Frame) -> Frame:
    """Encode and decode C{frame}: the multiplexer only emits valid frames."""
    (decoded,) = FrameDecoder().feed(b"".join(encode(frame)))
    assert decoded == frame
    return decoded


def pump(src: Multiplexer, dst: Multiplexer, limit: int | None = None, data_allowed: bool = True) -> list[Event]:
    """Move frames from C{src} to C{dst} until C{src} has none (or C{limit}); return C{dst}'s events."""
    events: list[Event] = []
    moved = 0
    while limit is None or moved < limit:
        frame = src.next_frame(data_allowed)
        if frame is None:
            break
        events += dst.receive(over_the_wire(frame))
        moved += 1
    return events


def frames_of(mux: Multiplexer, data_allowed: bool = True) -> list[Frame]:
    out = []
    while (frame := mux.next_frame(data_allowed)) is not None:
        out.append(frame)
    return out


def take_all(mux: Multiplexer, sid: int) -> bytes:
    out = b""
    while (chunk := mux.take(sid)) is not None:
        out += chunk
    return out


def make_pair(
    server_window: int = WINDOW, agent_window: int = WINDOW, max_streams: int = 1024
) -> tuple[Multiplexer, Multiplexer]:
    server = Multiplexer(Role.SERVER, local_window=server_window, peer_window=agent_window)
    agent = Multiplexer(Role.AGENT, local_window=agent_window, peer_window=server_window, max_streams=max_streams)
    return server, agent


def open_stream(server: Multiplexer, agent: Multiplexer, host: str = "db", port: int = 5432) -> int:
    sid = server.open(host, port)
    assert pump(server, agent) == [StreamRequested(sid, host, port)]
    agent.accept(sid)
    assert pump(agent, server) == [OpenAccepted(sid)]
    return sid


@pytest.fixture
def pair() -> tuple[Multiplexer, Multiplexer]:
    return make_pair()


@pytest.fixture
def stream(pair: tuple[Multiplexer, Multiplexer]) -> tuple[Multiplexer, Multiplexer, int]:
    server, agent = pair
    return server, agent, open_stream(server, agent)


# Opening (§5.1) --------------------------------------------------------------


def test_open_sends_open_with_increasing_ids(pair: tuple[Multiplexer, Multiplexer]) -> None:
    server, _agent = pair
    assert [server.open("a", 1), server.open("b", 2), server.open("c", 65535)] == [1, 2, 3]
    assert frames_of(server) == [Open(1, "a", 1), Open(2, "b", 2), Open(3, "c", 65535)]


def test_open_is_requested_on_the_agent(pair: tuple[Multiplexer, Multiplexer]) -> None:
    server, agent = pair
    sid = server.open("10.0.0.5", 22)
    assert pump(server, agent) == [StreamRequested(sid, "10.0.0.5", 22)]
    assert sid in agent and sid in server
    assert frames_of(agent) == []  # no answer until the adapter decides


def test_accept(pair: tuple[Multiplexer, Multiplexer]) -> None:
    server, agent = pair
    sid = server.open("db", 5432)
    pump(server, agent)
    agent.accept(sid)
    assert agent.next_frame() == OpenOk(sid)
    assert server.receive(OpenOk(sid)) == [OpenAccepted(sid)]


def test_refuse(pair: tuple[Multiplexer, Multiplexer]) -> None:
    server, agent = pair
    sid = server.open("db", 5432)
    server.send(sid, b"queued before the answer")
    pump(server, agent)
    agent.refuse(sid, OpenFailReason.REFUSED, "connection refused")
    assert sid not in agent
    assert pump(agent, server) == [OpenRefused(sid, OpenFailReason.REFUSED, "connection refused")]
    assert sid not in server
    assert frames_of(server) == []  # the queued data is dropped with the stream


def test_refuse_truncates_a_long_message(pair: tuple[Multiplexer, Multiplexer]) -> None:
    server, agent = pair
    sid = server.open("db", 5432)
    pump(server, agent)
    agent.refuse(sid, OpenFailReason.OTHER, "é" * 5000)
    (event,) = pump(agent, server)  # over_the_wire checks it encodes
    assert isinstance(event, OpenRefused) and event.message


def test_server_data_waits_for_open_ok(pair: tuple[Multiplexer, Multiplexer]) -> None:
    server, agent = pair
    sid = server.open("db", 5432)
    server.send(sid, b"early")
    server.close_send(sid)
    assert frames_of(server) == [Open(sid, "db", 5432)]  # no DATA or FIN yet
    agent.receive(Open(sid, "db", 5432))
    agent.accept(sid)
    pump(agent, server)
    assert frames_of(server) == [Data(sid, b"early"), Fin(sid)]


def test_second_open_ok_is_a_protocol_error(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, _agent, sid = stream
    with pytest.raises(ProtocolError):
        server.receive(OpenOk(sid))


def test_open_fail_after_open_ok_is_a_protocol_error(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, _agent, sid = stream
    with pytest.raises(ProtocolError):
        server.receive(OpenFail(sid, OpenFailReason.OTHER, "late"))


def test_open_from_the_agent_is_a_protocol_error(pair: tuple[Multiplexer, Multiplexer]) -> None:
    server, agent = pair
    with pytest.raises(ProtocolError) as caught:
        server.receive(Open(1, "evil", 80))
    assert caught.value.code is ErrorCode.PROTOCOL_ERROR
    with pytest.raises(RuntimeError):
        agent.open("x", 1)


@pytest.mark.parametrize("frame", [OpenOk(1), OpenFail(1, OpenFailReason.OTHER, "x")], ids=["OpenOk", "OpenFail"])
def test_open_answers_sent_to_the_agent_are_protocol_errors(
    stream: tuple[Multiplexer, Multiplexer, int], frame: Frame
) -> None:
    _server, agent, _sid = stream
    with pytest.raises(ProtocolError):
        agent.receive(frame)


def test_open_must_use_a_new_higher_id(pair: tuple[Multiplexer, Multiplexer]) -> None:
    _server, agent = pair
    agent.receive(Open(5, "h", 1))
    for sid in (5, 4, 1):
        with pytest.raises(ProtocolError):
            agent.receive(Open(sid, "h", 1))


def test_max_streams_gives_open_fail_overloaded() -> None:
    server, agent = make_pair(max_streams=2)
    a = open_stream(server, agent)
    b = open_stream(server, agent)
    c = server.open("db", 5432)
    assert pump(server, agent) == []
    assert c not in agent
    (frame,) = frames_of(agent)
    assert isinstance(frame, OpenFail) and (frame.stream_id, frame.reason) == (c, OpenFailReason.OVERLOADED)
    assert server.receive(frame) == [OpenRefused(c, OpenFailReason.OVERLOADED, frame.message)]
    assert c not in server
    # A late frame for the refused id is not a protocol error on the agent.
    assert agent.receive(Rst(c, ErrorCode.CANCEL)) == []
    # Closing one stream makes room again.
    server.reset(a, ErrorCode.CANCEL)
    assert pump(server, agent) == [StreamReset(a, ErrorCode.CANCEL)]
    d = open_stream(server, agent)
    assert set(agent.stream_ids) == {b, d}


# Data and half-close (§5.2) ----------------------------------------------------


def test_data_both_ways(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, agent, sid = stream
    server.send(sid, b"GET / HTTP/1.0\r\n\r\n")
    assert pump(server, agent) == [DataAvailable(sid)]
    assert agent.inbox_bytes(sid) == 18
    assert take_all(agent, sid) == b"GET / HTTP/1.0\r\n\r\n"
    assert agent.take(sid) is None
    agent.send(sid, b"HTTP/1.0 200 OK\r\n")
    agent.send(sid, b"\r\nbody")
    assert pump(agent, server) == [DataAvailable(sid)]  # small writes are coalesced
    assert take_all(server, sid) == b"HTTP/1.0 200 OK\r\n\r\nbody"


def test_large_write_is_split_into_frames_within_limits() -> None:
    server, agent = make_pair(agent_window=1_000_000)
    sid = open_stream(server, agent)
    payload = random.Random(1).randbytes(200_000)
    server.send(sid, payload)
    frames = frames_of(server)
    assert all(isinstance(f, Data) and 1 <= len(f.data) <= MAX_DATA_PAYLOAD for f in frames)
    assert b"".join(f.data for f in frames if isinstance(f, Data)) == payload
    assert server.send_window(sid) == 1_000_000 - 200_000


def test_send_on_unknown_stream_or_empty_is_ignored(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, _agent, sid = stream
    server.send(99, b"x")
    server.send(sid, b"")
    assert frames_of(server) == []


def test_server_fin_then_agent_still_sends(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, agent, sid = stream
    server.send(sid, b"request")
    server.close_send(sid)
    assert pump(server, agent) == [DataAvailable(sid), StreamEnded(sid)]
    assert take_all(agent, sid) == b"request"
    with pytest.raises(RuntimeError):
        server.send(sid, b"more")
    # The other direction is still open.
    agent.send(sid, b"response")
    assert pump(agent, server) == [DataAvailable(sid)]
    assert take_all(server, sid) == b"response"
    assert sid in server and sid in agent
    agent.close_send(sid)
    assert pump(agent, server) == [StreamEnded(sid)]
    assert sid not in server and sid not in agent


def test_agent_fin_then_server_still_sends(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, agent, sid = stream
    agent.close_send(sid)
    assert pump(agent, server) == [StreamEnded(sid)]
    server.send(sid, b"still talking")
    assert pump(server, agent) == [DataAvailable(sid)]
    assert take_all(agent, sid) == b"still talking"
    server.close_send(sid)
    assert pump(server, agent) == [StreamEnded(sid)]
    assert sid not in server and sid not in agent


def test_stream_is_forgotten_only_once_its_inbox_is_taken(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, agent, sid = stream
    agent.close_send(sid)
    pump(agent, server)
    server.send(sid, b"last words")
    server.close_send(sid)
    assert pump(server, agent) == [DataAvailable(sid), StreamEnded(sid)]
    assert sid in agent
    assert agent.take(sid) == b"last words"
    assert sid not in agent
    assert frames_of(agent) == []  # no credit is returned for a finished direction


def test_fin_waits_behind_queued_data(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, agent, sid = stream
    payload = bytes(range(256)) * 160  # 40 960 bytes: more than the window
    server.send(sid, payload)
    server.close_send(sid)
    server.close_send(sid)  # idempotent
    got, ended = b"", 0
    for _ in range(20):
        events = pump(server, agent)
        got += take_all(agent, sid)
        if StreamEnded(sid) in events:
            ended += 1
            assert events[-1] == StreamEnded(sid)
            assert got == payload  # everything arrived before the FIN
        pump(agent, server)
    assert got == payload
    assert ended == 1


def test_rst_from_the_server(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, agent, sid = stream
    server.reset(sid, ErrorCode.CANCEL)
    assert sid not in server
    assert pump(server, agent) == [StreamReset(sid, ErrorCode.CANCEL)]
    assert sid not in agent
    server.reset(sid, ErrorCode.CANCEL)  # already gone: nothing sent
    assert frames_of(server) == []


def test_rst_from_the_agent_drops_queued_data(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, agent, sid = stream
    agent.send(sid, b"x" * 1000)
    agent.reset(sid, ErrorCode.INTERNAL_ERROR)
    assert frames_of(agent) == [Rst(sid, ErrorCode.INTERNAL_ERROR)]
    assert server.receive(Rst(sid, ErrorCode.INTERNAL_ERROR)) == [StreamReset(sid, ErrorCode.INTERNAL_ERROR)]
    assert sid not in server


def test_rst_crossing_data_in_flight(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, agent, sid = stream
    agent.send(sid, b"in flight")
    agent.close_send(sid)
    in_flight = frames_of(agent)
    server.reset(sid, ErrorCode.CANCEL)
    for frame in in_flight:
        assert server.receive(frame) == []  # crossed our RST: discarded
    assert frames_of(server) == [Rst(sid, ErrorCode.CANCEL)]


def test_late_open_ok_after_cancel_is_ignored(pair: tuple[Multiplexer, Multiplexer]) -> None:
    server, agent = pair
    sid = server.open("db", 5432)
    pump(server, agent)
    server.reset(sid, ErrorCode.CANCEL)
    agent.accept(sid)  # the agent accepts before the RST arrives
    assert pump(agent, server) == []
    assert frames_of(server) == [Rst(sid, ErrorCode.CANCEL)]


@pytest.mark.parametrize(
    "frame",
    [Data(1, b"x"), Fin(1), WindowUpdate(1, 10), Rst(1, ErrorCode.CANCEL)],
    ids=["Data", "Fin", "WindowUpdate", "Rst"],
)
def test_frames_for_a_closed_stream_are_ignored(stream: tuple[Multiplexer, Multiplexer, int], frame: Frame) -> None:
    server, agent, sid = stream
    assert sid == 1
    server.close_send(sid)
    agent.close_send(sid)
    pump(server, agent)
    pump(agent, server)
    assert sid not in server and sid not in agent
    for side in (server, agent):
        assert side.receive(frame) == []
        assert frames_of(side) == []
    for late in (OpenOk(sid), OpenFail(sid, OpenFailReason.OTHER, "late")):
        assert server.receive(late) == []


@pytest.mark.parametrize(
    "frame",
    [Data(7, b"x"), Fin(7), WindowUpdate(7, 10), Rst(7, ErrorCode.CANCEL)],
    ids=["Data", "Fin", "WindowUpdate", "Rst"],
)
def test_frames_for_a_never_opened_stream_are_protocol_errors(
    stream: tuple[Multiplexer, Multiplexer, int], frame: Frame
) -> None:
    server, agent, _sid = stream
    for side in (server, agent):
        with pytest.raises(ProtocolError) as caught:
            side.receive(frame)
        assert caught.value.code is ErrorCode.PROTOCOL_ERROR
    with pytest.raises(ProtocolError):
        server.receive(OpenOk(7))


@pytest.mark.parametrize("late", [Data(1, b"x"), Fin(1)], ids=["Data", "Fin"])
def test_data_or_fin_after_fin_resets_the_stream(stream: tuple[Multiplexer, Multiplexer, int], late: Frame) -> None:
    server, agent, sid = stream
    assert sid == 1
    assert agent.receive(Fin(sid)) == [StreamEnded(sid)]
    assert agent.receive(late) == [StreamReset(sid, ErrorCode.STREAM_CLOSED)]
    assert sid not in agent
    assert frames_of(agent) == [Rst(sid, ErrorCode.STREAM_CLOSED)]
    # The same on the server side.
    assert server.receive(Fin(sid)) == [StreamEnded(sid)]
    assert server.receive(late) == [StreamReset(sid, ErrorCode.STREAM_CLOSED)]
    assert frames_of(server) == [Rst(sid, ErrorCode.STREAM_CLOSED)]


def test_data_before_open_ok_is_a_protocol_error(pair: tuple[Multiplexer, Multiplexer]) -> None:
    server, _agent = pair
    sid = server.open("db", 5432)
    for frame in (Data(sid, b"x"), Fin(sid), WindowUpdate(sid, 1)):
        with pytest.raises(ProtocolError):
            server.receive(frame)


def test_write_after_close_send_raises(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, _agent, sid = stream
    server.close_send(sid)
    with pytest.raises(RuntimeError):
        server.send(sid, b"x")


# Flow control (§5.3) ------------------------------------------------------------


def test_data_beyond_the_window_is_a_flow_control_error(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    _server, agent, sid = stream
    with pytest.raises(FlowControlError) as caught:
        agent.receive(Data(sid, b"x" * (WINDOW + 1)))
    assert caught.value.code is ErrorCode.FLOW_CONTROL_ERROR


def test_cumulative_data_beyond_the_window_is_a_flow_control_error(
    stream: tuple[Multiplexer, Multiplexer, int],
) -> None:
    server, agent, sid = stream
    assert agent.receive(Data(sid, b"x" * (WINDOW - 1))) == [DataAvailable(sid)]
    assert agent.receive(Data(sid, b"y")) == [DataAvailable(sid)]
    assert agent.receive_window(sid) == 0
    assert agent.inbox_bytes(sid) == WINDOW
    with pytest.raises(FlowControlError):
        agent.receive(Data(sid, b"z"))
    # And towards the server.
    server.receive(Data(sid, b"x" * WINDOW))
    with pytest.raises(FlowControlError):
        server.receive(Data(sid, b"z"))


def test_window_update_overflow_is_a_flow_control_error(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, agent, sid = stream
    assert server.send_window(sid) == WINDOW
    server.receive(WindowUpdate(sid, MAX_WINDOW - WINDOW))  # exactly to the maximum
    assert server.send_window(sid) == MAX_WINDOW
    with pytest.raises(FlowControlError) as caught:
        server.receive(WindowUpdate(sid, 1))
    assert caught.value.code is ErrorCode.FLOW_CONTROL_ERROR
    with pytest.raises(FlowControlError):
        agent.receive(WindowUpdate(sid, MAX_WINDOW))


def test_sender_stops_at_the_window_and_credit_needs_take(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, agent, sid = stream
    server.send(sid, b"a" * (3 * WINDOW))
    assert pump(server, agent) == [DataAvailable(sid)]
    assert server.send_window(sid) == 0
    assert server.outbox_bytes(sid) == 2 * WINDOW
    assert agent.inbox_bytes(sid) == WINDOW
    # The inbox is full and not taken: no credit goes back, nothing more flows.
    for _ in range(3):
        assert frames_of(agent) == []
        assert frames_of(server) == []
    assert agent.take(sid) == b"a" * WINDOW
    assert frames_of(agent) == [WindowUpdate(sid, WINDOW)]
    assert server.receive(WindowUpdate(sid, WINDOW)) == [WindowOpened(sid)]
    assert server.send_window(sid) == WINDOW
    assert pump(server, agent) == [DataAvailable(sid)]
    assert server.outbox_bytes(sid) == WINDOW


def test_credit_is_returned_in_batches_of_half_the_window(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, agent, sid = stream
    for _ in range(4):
        server.send(sid, b"q" * 4096)
        pump(server, agent)  # four separate DATA frames
    assert server.send_window(sid) == 0
    assert agent.take(sid) == b"q" * 4096
    assert frames_of(agent) == []  # 4096 < WINDOW / 2
    assert agent.take(sid) == b"q" * 4096
    assert frames_of(agent) == [WindowUpdate(sid, WINDOW // 2)]
    assert agent.take(sid) == b"q" * 4096
    assert frames_of(agent) == []
    assert agent.take(sid) == b"q" * 4096
    assert frames_of(agent) == [WindowUpdate(sid, WINDOW // 2)]
    assert agent.receive_window(sid) == WINDOW


def test_coalescing_never_exceeds_the_window(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, _agent, sid = stream
    server.send(sid, b"a" * (WINDOW - 4))
    server.send(sid, b"b" * 5)
    # The second write does not fit beside the first: it is split to use the
    # last 4 bytes of window exactly, and its last byte waits.
    assert frames_of(server) == [Data(sid, b"a" * (WINDOW - 4)), Data(sid, b"bbbb")]
    assert server.send_window(sid) == 0
    assert server.outbox_bytes(sid) == 1


def test_coalescing_never_exceeds_the_frame_limit() -> None:
    server, agent = make_pair(agent_window=1_000_000)
    sid = open_stream(server, agent)
    server.send(sid, b"a" * (MAX_DATA_PAYLOAD - 6))
    server.send(sid, b"b" * 10)
    server.send(sid, b"c" * 10)
    assert frames_of(server) == [Data(sid, b"a" * (MAX_DATA_PAYLOAD - 6)), Data(sid, b"b" * 10 + b"c" * 10)]


def test_fin_does_not_need_window(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, _agent, sid = stream
    server.send(sid, b"x" * WINDOW)
    server.close_send(sid)
    assert frames_of(server) == [Data(sid, b"x" * WINDOW), Fin(sid)]


def test_no_credit_is_returned_after_the_peers_fin(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, agent, sid = stream
    server.send(sid, b"x" * (WINDOW // 2))
    pump(server, agent)
    server.send(sid, b"y" * (WINDOW // 2))
    server.close_send(sid)
    assert pump(server, agent) == [DataAvailable(sid), StreamEnded(sid)]
    assert take_all(agent, sid) == b"x" * (WINDOW // 2) + b"y" * (WINDOW // 2)
    assert frames_of(agent) == []  # the server will send no more DATA: credit would be wasted


def test_window_opened_only_when_the_sender_was_blocked(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, _agent, sid = stream
    assert server.receive(WindowUpdate(sid, 100)) == []
    assert server.send_window(sid) == WINDOW + 100


def test_one_blocked_stream_does_not_block_another(pair: tuple[Multiplexer, Multiplexer]) -> None:
    server, agent = pair
    slow, fast = open_stream(server, agent), open_stream(server, agent)
    server.send(slow, b"s" * (2 * WINDOW))
    pump(server, agent)  # slow's inbox is full and never taken
    for i in range(5):
        server.send(fast, bytes([i]) * WINDOW)
        assert pump(server, agent) == [DataAvailable(fast)]
        assert take_all(agent, fast) == bytes([i]) * WINDOW
        pump(agent, server)
    assert agent.inbox_bytes(slow) == WINDOW
    assert server.outbox_bytes(slow) == WINDOW


# Scheduling ----------------------------------------------------------------------


def test_control_frames_only(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, _agent, sid = stream
    server.send(sid, b"data")
    server.close_send(sid)
    server.ping(b"12345678")
    server.goaway(ErrorCode.SHUTDOWN, "bye")
    assert frames_of(server, data_allowed=False) == [Ping(b"12345678"), GoAway(ErrorCode.SHUTDOWN, "bye")]
    assert server.next_frame(data_allowed=False) is None
    assert server.outbox_bytes(sid) == 4
    assert frames_of(server) == [Data(sid, b"data"), Fin(sid)]


def test_control_frames_jump_the_data_queue(stream: tuple[Multiplexer, Multiplexer, int]) -> None:
    server, _agent, sid = stream
    server.send(sid, b"x" * WINDOW)
    server.ping(b"pingpong")
    assert server.next_frame() == Ping(b"pingpong")
    assert isinstance(server.next_frame(), Data)


def test_ping_pong_and_goaway(pair: tuple[Multiplexer, Multiplexer]) -> None:
    server, agent = pair
    server.ping(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    assert pump(server, agent) == []
    assert agent.next_frame() == Pong(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    assert server.receive(Pong(b"\x00\x01\x02\x03\x04\x05\x06\x07")) == [
        PongReceived(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    ]
    agent.goaway(ErrorCode.NO_ERROR, "draining" * 1000)
    (event,) = pump(agent, server)
    assert isinstance(event, GoAwayReceived) and event.code is ErrorCode.NO_ERROR


def test_round_robin_between_streams() -> None:
    server, agent = make_pair(agent_window=1_000_000)
    a, b = open_stream(server, agent), open_stream(server, agent)
    server.send(a, b"a" * 300_000)
    server.send(b, b"b" * 300_000)
    order = [f.stream_id for f in frames_of(server)]
    assert order[:8] == [a, b] * 4
    assert order.count(a) == order.count(b) == 5  # 4 full frames and a remainder each


def test_round_robin_three_streams_with_many_small_writes() -> None:
    server, agent = make_pair(agent_window=1_000_000)
    sids = [open_stream(server, agent) for _ in range(3)]
    for _ in range(100):
        for sid in sids:
            server.send(sid, bytes([sid]) * 4000)
    frames = frames_of(server)
    assert [f.stream_id for f in frames[:9]] == sids * 3
    # Small writes are coalesced up to the frame limit.
    assert all(isinstance(f, Data) and len(f.data) <= MAX_DATA_PAYLOAD for f in frames)
    assert max(len(f.data) for f in frames if isinstance(f, Data)) > 4000


def test_round_robin_skips_a_blocked_stream(pair: tuple[Multiplexer, Multiplexer]) -> None:
    server, agent = pair
    a, b = open_stream(server, agent), open_stream(server, agent)
    server.send(a, b"a" * (3 * WINDOW))
    server.send(b, b"b" * 10)
    assert [f.stream_id for f in frames_of(server)] == [a, b]


# Random interleavings --------------------------------------------------------


class TunnelMachine(RuleBasedStateMachine):
    """
    A server and an agent with frames in flight both ways, driven by random
    sends, closes, deliveries and takes.  The adapter side "pauses" a stream
    simply by not taking from it.
    """

    MAX_STREAMS = 4

    streams = Bundle("streams")

    def __init__(self) -> None:
        super().__init__()
        self.server, self.agent = make_pair()
        # Frames taken from next_frame() and not yet delivered: the transport.
        self.wire: dict[Role, deque[Frame]] = {Role.SERVER: deque(), Role.AGENT: deque()}
        self.sids: list[int] = []
        self.accepted: set[int] = set()
        self.pending: set[int] = set()
        self.sent: dict[tuple[Role, int], bytearray] = {}
        self.received: dict[tuple[Role, int], bytearray] = {}
        self.closed: set[tuple[Role, int]] = set()  # (sender, sid) whose sender called close_send
        self.ended: dict[tuple[Role, int], int] = {}  # (sender, sid) -> StreamEnded seen by the receiver
        self.seed = 0

    def mux(self, role: Role) -> Multiplexer:
        return self.server if role is Role.SERVER else self.agent

    @staticmethod
    def peer(role: Role) -> Role:
        return Role.AGENT if role is Role.SERVER else Role.SERVER

    def chunk(self, size: int) -> bytes:
        self.seed += 1
        return random.Random(self.seed).randbytes(size)

    # Rules.

    @precondition(lambda self: len(self.sids) < self.MAX_STREAMS)
    @rule(target=streams, eager=st.booleans())
    def open(self, eager: bool) -> int:
        """Open a stream; if C{eager}, run the exchange to OPEN_OK at once."""
        sid = self.server.open("target", 7)
        self.sids.append(sid)
        for role in Role:
            self.sent[role, sid] = bytearray()
            self.received[role, sid] = bytearray()
        if eager:
            self.exchange(Role.SERVER, 100, accept_now=True)
            self.exchange(Role.AGENT, 100, accept_now=True)
        return sid

    @rule(sid=streams)
    def accept(self, sid: int) -> None:
        if sid in self.pending:
            self.pending.discard(sid)
            self.accepted.add(sid)
            self.agent.accept(sid)

    @rule(sid=streams, role=st.sampled_from(Role), size=st.integers(1, 3 * WINDOW))
    def send(self, sid: int, role: Role, size: int) -> None:
        if (role, sid) in self.closed or (role is Role.AGENT and sid not in self.accepted):
            return
        data = self.chunk(size)
        self.mux(role).send(sid, data)
        self.sent[role, sid] += data

    @rule(sid=streams, role=st.sampled_from(Role))
    def close_send(self, sid: int, role: Role) -> None:
        if role is Role.AGENT and sid not in self.accepted:
            return
        self.mux(role).close_send(sid)
        self.closed.add((role, sid))

    @rule(role=st.sampled_from(Role), n=st.integers(1, 8), data_allowed=st.booleans())
    def transmit(self, role: Role, n: int, data_allowed: bool) -> None:
        """Up to C{n} frames from C{role} onto the wire (the transport takes them)."""
        mux = self.mux(role)
        for _ in range(n):
            frame = mux.next_frame(data_allowed)
            if frame is None:
                break
            if not data_allowed:
                assert not isinstance(frame, (Data, Fin))
            self.wire[role].append(over_the_wire(frame))

    @rule(role=st.sampled_from(Role), n=st.integers(1, 8), accept_now=st.booleans())
    def deliver(self, role: Role, n: int, accept_now: bool = False) -> None:
        """Up to C{n} frames in flight from C{role} arrive at its peer."""
        for _ in range(n):
            if not self.wire[role]:
                break
            self.handle(self.peer(role), self.mux(self.peer(role)).receive(self.wire[role].popleft()))
        if accept_now:
            for sid in sorted(self.pending):
                self.accept(sid)

    @rule(role=st.sampled_from(Role), n=st.integers(1, 8), accept_now=st.booleans())
    def exchange(self, role: Role, n: int, accept_now: bool) -> None:
        """Transmit up to C{n} frames from C{role} and deliver everything in flight from it."""
        self.transmit(role, n, True)
        self.deliver(role, len(self.wire[role]), accept_now)

    @rule(sid=streams, role=st.sampled_from(Role), n=st.integers(1, 4))
    def take(self, sid: int, role: Role, n: int) -> None:
        """C{role} hands up to C{n} chunks of C{sid}'s inbox to its local connection."""
        for _ in range(n):
            chunk = self.mux(role).take(sid)
            if chunk is None:
                break
            self.received[self.peer(role), sid] += chunk

    @rule(role=st.sampled_from(Role))
    def take_everything(self, role: Role) -> None:
        """C{role}'s local connections all resume and drain their inboxes."""
        for sid in self.sids:
            self.take(sid, role, 10_000)

    def handle(self, receiver: Role, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, StreamRequested):
                assert receiver is Role.AGENT
                assert event.stream_id in self.sids and event.stream_id not in self.pending
                self.pending.add(event.stream_id)
            elif isinstance(event, OpenAccepted):
                assert receiver is Role.SERVER and event.stream_id in self.accepted
            elif isinstance(event, StreamEnded):
                key = (self.peer(receiver), event.stream_id)
                assert key in self.closed, f"{event} without close_send"
                self.ended[key] = self.ended.get(key, 0) + 1
            elif isinstance(event, (DataAvailable, WindowOpened)):
                assert event.stream_id in self.sids
            else:  # no resets, refusals, pings or goaways in this model
                raise AssertionError(f"unexpected {event} at the {receiver.value}")

    # Invariants.

    @invariant()
    def windows_hold(self) -> None:
        for role in Role:
            mux = self.mux(role)
            for sid in self.sids:
                if sid not in mux:
                    continue
                assert mux.send_window(sid) >= 0
                assert mux.receive_window(sid) >= 0
                assert mux.inbox_bytes(sid) <= mux.local_window
                assert mux.inbox_bytes(sid) + mux.receive_window(sid) <= mux.local_window
                assert mux.outbox_bytes(sid) >= 0

    @invariant()
    def in_flight_data_fits_the_receivers_window(self) -> None:
        for role in Role:
            receiver = self.mux(self.peer(role))
            for sid in self.sids:
                in_flight = sum(len(f.data) for f in self.wire[role] if isinstance(f, Data) and f.stream_id == sid)
                if sid in receiver:
                    assert in_flight <= receiver.receive_window(sid)

    @invariant()
    def received_is_a_prefix_of_sent(self) -> None:
        for key, got in self.received.items():
            assert self.sent[key].startswith(got)

    # The end: resume everything, take everything, deliver until quiet.

    def settle(self) -> None:
        for _ in range(10_000):
            moved = False
            for sid in sorted(self.pending):
                self.accept(sid)
            for role in Role:
                while (frame := self.mux(role).next_frame()) is not None:
                    self.wire[role].append(over_the_wire(frame))
                while self.wire[role]:
                    self.deliver(role, 1)
                    moved = True
                for sid in self.sids:
                    while (chunk := self.mux(role).take(sid)) is not None:
                        self.received[self.peer(role), sid] += chunk
                        moved = True
                self.windows_hold()
            if not moved and not self.pending:
                return
        raise AssertionError("the tunnel never went quiet")

    def teardown(self) -> None:
        self.settle()
        for key, sent in self.sent.items():
            assert bytes(self.received[key]) == bytes(sent), f"{key}: bytes lost, duplicated or reordered"
        for sid in self.sids:
            for role in Role:
                assert self.mux(role).outbox_bytes(sid) == 0
                assert self.mux(role).inbox_bytes(sid) == 0
        for key in self.closed:
            assert self.ended.get(key) == 1, f"{key}: StreamEnded seen {self.ended.get(key, 0)} times"
        # Close what is left; then every stream is forgotten on both sides.
        for sid in self.sids:
            for role in Role:
                if (role, sid) not in self.closed:
                    self.close_send(sid, role)
        self.settle()
        for key in self.closed:
            assert self.ended.get(key) == 1
        assert self.server.stream_ids == [] and self.agent.stream_ids == []


TunnelMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_random_interleavings = TunnelMachine.TestCase


# Memory of an idle tunnel (issue 18, item 5) ----------------------------------


def _core(role: Role) -> CoreMultiplexer:
    return CoreMultiplexer(role, WINDOW, WINDOW, 16, max_window=WINDOW)


def _pull_all(mux: CoreMultiplexer) -> list[Frame]:
    out: list[Any] = []
    mux.pull(out, 1 << 30)
    return FrameDecoder().feed(b"".join(out))


def test_an_idle_multiplexer_holds_no_send_queues() -> None:
    """
    Most of ten thousand registered tunnels are idle: once what they queued
    is taken, they keep no control or ready queue (an empty deque is over
    600 bytes), and what is queued later is still sent, in order.
    """
    server, agent = _core(Role.SERVER), _core(Role.AGENT)
    assert server._control is None and server._ready is None and not server.has_output()
    sid = server.open("db", 5432)
    for frame in _pull_all(server):
        agent.receive(frame)
    agent.accept(sid)
    for frame in _pull_all(agent):
        server.receive(frame)
    assert agent._control is None and agent._ready is None
    server.send(sid, b"x" * 1000)
    server.ping(b"12345678")
    assert server.has_output()
    assert _pull_all(server) == [Ping(b"12345678"), Data(sid, b"x" * 1000)]
    assert server._control is None and server._ready is None and not server.has_output()
    server.send(sid, b"more")
    server.ping(b"87654321")
    assert _pull_all(server) == [Ping(b"87654321"), Data(sid, b"more")]


def test_control_frames_held_back_stay_queued() -> None:
    """Control frames not allowed out yet are kept (the queue is dropped only once empty)."""
    server = _core(Role.SERVER)
    server.ping(b"12345678")
    assert server.pull([], 1 << 30, control_allowed=False) == (0, [])
    assert server.has_output()
    assert _pull_all(server) == [Ping(b"12345678")]


def test_an_idle_multiplexer_costs_under_a_kibibyte() -> None:
    """
    Python memory of a registered multiplexer after a keepalive came and
    went: 1.9 KiB before its queues were made at first use, 0.4 KiB after.
    """

    def idle() -> CoreMultiplexer:
        mux = _core(Role.SERVER)
        mux.ping(b"12345678")
        mux.pull([], 1 << 16)
        return mux

    idle()
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [idle() for _ in range(200)]
        per_mux = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        if started:
            tracemalloc.stop()
    assert per_mux < 1024, per_mux
