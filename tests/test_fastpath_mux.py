"""
The multiplexer's fast paths (nova.mux.core) against its reference model
(tests/reference_mux.py): pull() against next_frame(), take_upto() against
take(), receive_data() against receive(Data), and
has_output(); and nova.transport.fastpath's record_chunks(), write_tcp() and
writev_tcp() (the last two against a fake TCP connection).
"""

from __future__ import annotations

import itertools
import struct
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import tcp

from nova.mux.core import Buffer, DataAvailable, Event, Role, StreamReset
from nova.transport import fastpath
from nova.transport.fastpath import record_chunks, write_tcp, writev_tcp
from nova.wire.codec import FrameDecoder
from nova.wire.errors import ErrorCode, FlowControlError, ProtocolError
from nova.wire.frames import (
    HEADER_SIZE,
    MAX_DATA_PAYLOAD,
    Data,
    Fin,
    Frame,
    GoAway,
    OpenOk,
    Ping,
    Pong,
    Rst,
    WindowUpdate,
    encode,
)

from .reference_mux import ReferenceMultiplexer as Multiplexer  # the core plus its one-at-a-time model
from .test_mux_core import frames_of

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WINDOW = 16_384


def server(local_window: int = WINDOW, peer_window: int = WINDOW) -> Multiplexer:
    return Multiplexer(Role.SERVER, local_window=local_window, peer_window=peer_window)


def opened(mux: Multiplexer, n: int = 1) -> list[int]:
    """Open C{n} streams on a server multiplexer and accept them as the agent would."""
    sids = [mux.open("db", 5432) for _ in range(n)]
    for sid in sids:
        mux.receive(OpenOk(sid))
    frames_of(mux, data_allowed=False)  # the OPENs
    return sids


def decode(blob: bytes) -> list[Frame]:
    decoder = FrameDecoder()
    frames = decoder.feed(blob)
    assert decoder.buffered == 0, "pull() left a partial frame"
    return frames


def joined(parts: list[Buffer]) -> bytes:
    return b"".join(parts)


def pattern(tag: int, size: int) -> bytes:
    """C{size} bytes unique to write number C{tag} (so reordering shows)."""
    unit = struct.pack(">I", tag)
    return (unit * (size // 4 + 1))[:size]


# pull() against next_frame() ---------------------------------------------------

KINDS = (
    ["send"] * 5
    + ["send_now"] * 2
    + ["pull"] * 5
    + ["credit"] * 3
    + ["open", "ok", "close", "peer_fin", "peer_rst", "reset"]
)
KINDS += ["ping", "goaway"]


@st.composite
def ops(draw: st.DrawFn) -> tuple[object, ...]:
    """One step of PullRun: mostly writes, pulls and credit."""
    kind = draw(st.sampled_from(KINDS))
    if kind in ("open", "ping", "goaway"):
        return (kind,)
    if kind == "pull":
        limit = draw(st.one_of(st.integers(-1, 5000), st.integers(1, 300_000)))
        data_allowed = draw(st.sampled_from([True, True, True, False]))
        return (kind, limit, data_allowed, draw(st.sampled_from(["pull", "pull", "pull", "next_frame"])))
    i = draw(st.integers(0, 5))
    if kind in ("send", "send_now"):
        size = draw(st.one_of(st.integers(1, 64), st.integers(1, 3000), st.integers(1, 3 * MAX_DATA_PAYLOAD)))
        return (kind, i, size)
    if kind == "credit":
        return (kind, i, draw(st.one_of(st.integers(1, 5000), st.integers(1, 200_000))))
    return (kind, i)


class PullRun:
    """Two multiplexers driven alike: A written with pull(), B with next_frame() + encode()."""

    def __init__(self, peer_window: int) -> None:
        self.a = server(peer_window=peer_window)
        self.b = server(peer_window=peer_window)
        self.sids: list[int] = []
        self.tag = 0
        self.written: dict[int, bytearray] = {}  # per stream: everything send() queued
        self.sent: dict[int, bytearray] = {}  # per stream: DATA payload pulled from A
        self.fins: list[int] = []
        self.accepted: set[int] = set()
        self.peer_done: set[int] = set()

    def both(self, action: str, *args: object) -> bool:
        """Call C{action} on both; they must return the same thing or raise the same error."""
        results = []
        for mux in (self.a, self.b):
            try:
                results.append(("ok", getattr(mux, action)(*args)))
            except (ProtocolError, RuntimeError) as e:
                results.append((type(e).__name__, str(e)))
        assert results[0] == results[1]
        return results[0][0] == "ok"

    def sid(self, i: int) -> int | None:
        return self.sids[i % len(self.sids)] if self.sids else None

    def step(self, op: tuple[object, ...]) -> None:
        kind = op[0]
        if kind == "open":
            if len(self.sids) < 6:
                sid_a, sid_b = self.a.open("h", 1), self.b.open("h", 1)
                assert sid_a == sid_b
                self.sids.append(sid_a)
                self.written[sid_a] = bytearray()
                self.sent[sid_a] = bytearray()
            return
        if kind in ("ping", "goaway"):
            if kind == "ping":
                self.both("receive", Ping(b"pingpong"))
            else:
                self.both("goaway", ErrorCode.SHUTDOWN, "bye")
            return
        if kind == "pull":
            assert isinstance(op[1], int) and isinstance(op[2], bool)
            self.pull(op[1], op[2], op[3] == "next_frame")
            return
        assert isinstance(op[1], int)
        sid = self.sid(op[1])
        if sid is None:
            return
        present = sid in self.a
        assert present == (sid in self.b)
        if kind == "ok":
            if present and sid not in self.accepted:
                self.accepted.add(sid)
                self.both("receive", OpenOk(sid))
        elif kind == "send":
            assert isinstance(op[2], int)
            self.tag += 1
            data = pattern(self.tag, op[2])
            if self.both("send", sid, data) and present:
                self.written[sid] += data
        elif kind == "send_now":
            assert isinstance(op[2], int)
            self.tag += 1
            self.send_now(sid, pattern(self.tag, op[2]), present)
        elif kind == "close":
            self.both("close_send", sid)
        elif kind == "credit":
            if present and sid in self.accepted:
                assert isinstance(op[2], int)
                self.both("receive", WindowUpdate(sid, op[2]))
        elif kind == "peer_fin":
            if present and sid in self.accepted and sid not in self.peer_done:
                self.peer_done.add(sid)
                self.both("receive", Fin(sid))
        elif kind == "peer_rst":
            self.both("receive", Rst(sid, ErrorCode.CANCEL))
        elif kind == "reset":
            self.both("reset", sid, ErrorCode.CANCEL)

    def send_now(self, sid: int, data: bytes, present: bool) -> None:
        """
        A writes with send_now(), B with send(): when A frames the write at
        once, it is exactly the one frame B's next_frame() then gives, and
        nothing else waited; otherwise both queued it alike.
        """
        a, b = self.a, self.b
        waiting = a.has_output()
        out: list[Buffer] = []
        try:
            queued = a.send_now(sid, data, out)
        except RuntimeError as e:
            with pytest.raises(RuntimeError, match=str(e)):
                b.send(sid, data)
            return
        b_queued = b.send(sid, data)
        if present:
            self.written[sid] += data
        if not out:
            assert queued == b_queued
        else:
            assert present and not waiting, "framed while something else waited"
            assert queued == 0 and b_queued == len(data)
            frame = b.next_frame(True)
            assert frame == Data(sid, data)
            assert joined(out) == b"".join(encode(frame))
            assert b.next_frame(True) is None, "send_now() jumped a frame that was waiting"
            self.note(decode(joined(out)))
        self.same_state()

    def pull(self, limit: int, data_allowed: bool, a_uses_next_frame: bool = False) -> None:
        a, b = self.a, self.b
        had_output = a.has_output()
        assert had_output == b.has_output()
        if a_uses_next_frame:
            # The paths mix on one multiplexer: A's outbox may hold views left by pull().
            frame = a.next_frame(data_allowed)
            expected = b.next_frame(data_allowed)
            assert frame == expected
            if frame is not None:
                self.note(decode(b"".join(encode(frame))))
            self.same_state()
            return
        out: list[Buffer] = []
        taken, fins = a.pull(out, limit, data_allowed)
        for part in out:
            assert isinstance(part, (bytes, memoryview))
        got = decode(joined(out))
        if not had_output:
            assert out == [], "has_output() said nothing was waiting"
        # B: as many frames from next_frame(), encoded one by one.
        reference = [b.next_frame(data_allowed) for _ in got]
        assert None not in reference
        ref_frames = cast(list[Frame], reference)
        assert joined(out) == b"".join(b"".join(encode(f)) for f in ref_frames)
        assert got == ref_frames
        # What pull() reports.
        data_lens = [len(f.data) for f in got if isinstance(f, Data)]
        assert taken == sum(data_lens)
        assert fins == [f.stream_id for f in got if isinstance(f, Fin)]
        # Control frames first, then DATA/FIN only if allowed and within the limit.
        kinds = [isinstance(f, (Data, Fin)) for f in got]
        assert kinds == sorted(kinds)
        if not data_allowed or limit <= 0:
            assert not any(kinds)
        if taken < limit:
            # Stopped short of the limit: nothing else could be sent.
            assert b.next_frame(data_allowed) is None
            assert a.next_frame(data_allowed) is None
            if data_allowed:
                assert not a.has_output()
        elif any(kinds):
            # About limit bytes: only the last frame may go over it, and it ends the pull.
            assert isinstance(got[-1], Data)
            assert taken - len(got[-1].data) < limit
        else:
            assert limit <= 0
        self.note(got)
        self.same_state()

    def note(self, got: list[Frame]) -> None:
        for f in got:
            if isinstance(f, Data):
                assert f.stream_id not in self.fins, "DATA after FIN"
                self.sent[f.stream_id] += f.data
            elif isinstance(f, Fin):
                assert f.stream_id not in self.fins, "second FIN"
                # FIN only once everything written has gone out.
                assert bytes(self.sent[f.stream_id]) == bytes(self.written[f.stream_id])
                self.fins.append(f.stream_id)

    def same_state(self) -> None:
        a, b = self.a, self.b
        assert a.stream_ids == b.stream_ids
        assert a.has_output() == b.has_output()
        for sid in self.sids:
            assert (sid in a) == (sid in b)
            assert a.outbox_bytes(sid) == b.outbox_bytes(sid)
            assert a.send_window(sid) == b.send_window(sid) >= 0
            # Every byte pulled is the next of what was written to the stream.
            assert self.written[sid].startswith(self.sent[sid])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    peer_window=st.one_of(st.integers(1, 3000), st.integers(16_384, 300_000)),
    accept=st.lists(st.sampled_from([True, True, True, False]), min_size=1, max_size=4),
    steps=st.lists(ops(), min_size=10, max_size=40),
)
def test_pull_writes_what_next_frame_writes(
    peer_window: int, accept: list[bool], steps: list[tuple[object, ...]]
) -> None:
    run = PullRun(peer_window)
    for i, now in enumerate(accept):
        run.step(("open",))
        if now:
            run.step(("ok", i))
    for op in steps:
        run.step(op)
    # The end: all credit, then everything out.
    for sid in run.sids:
        if sid in run.a and sid in run.accepted:
            run.both("receive", WindowUpdate(sid, 10_000_000))
    run.pull(2**40, True)
    assert not run.a.has_output() and not run.b.has_output()
    for sid in run.sids:
        if sid in run.a and sid in run.accepted:
            assert run.a.outbox_bytes(sid) == 0
            assert bytes(run.sent[sid]) == bytes(run.written[sid])


def test_pull_control_frames_first_then_round_robin() -> None:
    a = server(peer_window=1_000_000)
    s1, s2 = opened(a, 2)
    a.send(s1, b"a" * 100_000)
    a.send(s2, b"b" * 10)
    a.close_send(s2)
    a.ping(b"12345678")
    out: list[Buffer] = []
    taken, fins = a.pull(out, 10**9)
    assert decode(joined(out)) == [
        Ping(b"12345678"),
        Data(s1, b"a" * MAX_DATA_PAYLOAD),
        Data(s2, b"b" * 10),
        Data(s1, b"a" * (100_000 - MAX_DATA_PAYLOAD)),
        Fin(s2),
    ]
    assert (taken, fins) == (100_010, [s2])


def test_pull_limit_allows_one_frame_over() -> None:
    a = server(peer_window=1_000_000)
    s1, s2 = opened(a, 2)
    a.send(s1, b"a" * 50_000)
    a.send(s2, b"b" * 50_000)
    out: list[Buffer] = []
    assert a.pull(out, 1) == (50_000, [])
    assert decode(joined(out)) == [Data(s1, b"a" * 50_000)]
    out = []
    assert a.pull(out, 50_001) == (50_000, [])  # all that is left
    assert decode(joined(out)) == [Data(s2, b"b" * 50_000)]
    assert not a.has_output()


def test_pull_separates_headers_from_payloads_and_merges_small_writes() -> None:
    a = server(peer_window=1_000_000)
    (sid,) = opened(a)
    frames_of(a)
    writes = [pattern(i, 100) for i in range(5)]
    for w in writes:
        a.send(sid, w)
    earlier = b"".join(encode(Ping(b"earlier!")))
    out: list[Buffer] = [earlier]  # pull() appends to what the caller has
    assert a.pull(out, 10**9) == (500, [])
    assert out[0] is earlier
    # One DATA frame: its header, then the written byte strings themselves, not copies.
    assert len(out) == 7 and len(out[1]) == HEADER_SIZE
    assert all(part is w for part, w in zip(out[2:], writes, strict=True))
    assert decode(joined(out)) == [Ping(b"earlier!"), Data(sid, b"".join(writes))]


@pytest.mark.parametrize("window", [1000, 10 * MAX_DATA_PAYLOAD])
def test_pull_merges_writes_up_to_exactly_the_budget(window: int) -> None:
    """Writes that fill the window (or the frame limit) exactly go in one frame, as next_frame() sends them."""
    budget = min(window, MAX_DATA_PAYLOAD)
    writes = [pattern(1, budget - 300), pattern(2, 200), pattern(3, 100), pattern(4, 5)]
    a, b = server(peer_window=window), server(peer_window=window)
    for mux in (a, b):
        (sid,) = opened(mux)
        for w in writes:
            mux.send(sid, w)
    out: list[Buffer] = []
    a.pull(out, 1)
    assert decode(joined(out)) == [Data(sid, b"".join(writes[:3]))]
    assert [b.next_frame()] == decode(joined(out))


def test_pull_splits_a_large_write_as_views_of_it() -> None:
    a = server(peer_window=1_000_000)
    (sid,) = opened(a)
    frames_of(a)
    big = pattern(7, 2 * MAX_DATA_PAYLOAD + 5)
    a.send(sid, big)
    out: list[Buffer] = []
    a.pull(out, 10**9)
    payloads = out[1::2]
    assert [len(p) for p in payloads] == [MAX_DATA_PAYLOAD, MAX_DATA_PAYLOAD, 5]
    for p in payloads:
        assert isinstance(p, memoryview) and p.obj is big
    assert joined(payloads) == big


def test_pull_respects_the_window_and_resumes_on_credit() -> None:
    a = server(peer_window=1000)
    (sid,) = opened(a)
    frames_of(a)
    a.send(sid, b"x" * 1500)
    a.close_send(sid)
    out: list[Buffer] = []
    assert a.pull(out, 10**9) == (1000, [])
    assert a.send_window(sid) == 0 and a.outbox_bytes(sid) == 500
    assert not a.has_output()
    out = []
    assert a.pull(out, 10**9) == (0, []) and out == []
    a.receive(WindowUpdate(sid, 200))
    assert a.has_output()
    out = []
    assert a.pull(out, 10**9) == (200, [])
    a.receive(WindowUpdate(sid, 10_000))
    out = []
    assert a.pull(out, 10**9) == (300, [sid])
    assert decode(joined(out)) == [Data(sid, b"x" * 300), Fin(sid)]


def test_pull_without_data_allowed_sends_only_control_frames() -> None:
    a = server(peer_window=1_000_000)
    (sid,) = opened(a)
    frames_of(a)
    a.send(sid, b"payload")
    a.close_send(sid)
    a.receive(Ping(b"abcdefgh"))
    a.goaway(ErrorCode.SHUTDOWN, "draining")
    out: list[Buffer] = []
    assert a.pull(out, 10**9, data_allowed=False) == (0, [])
    assert decode(joined(out)) == [Pong(b"abcdefgh"), GoAway(ErrorCode.SHUTDOWN, "draining")]
    assert a.has_output()  # the DATA and FIN still wait
    out = []
    assert a.pull(out, 10**9) == (7, [sid])
    assert decode(joined(out)) == [Data(sid, b"payload"), Fin(sid)]


def test_pull_fin_forgets_a_stream_closed_both_ways() -> None:
    a = server()
    (sid,) = opened(a)
    frames_of(a)
    a.receive(Fin(sid))
    a.close_send(sid)
    out: list[Buffer] = []
    assert a.pull(out, 10**9) == (0, [sid])
    assert sid not in a


# has_output() ----------------------------------------------------------------------


def test_has_output() -> None:
    a = server()
    assert not a.has_output()
    sid = a.open("h", 1)
    assert a.has_output()  # OPEN
    frames_of(a)
    a.send(sid, b"early")
    assert not a.has_output()  # not accepted yet: nothing may be sent
    a.receive(OpenOk(sid))
    assert a.has_output()
    assert a.pull([], 10**9) == (5, [])
    assert not a.has_output()
    a.close_send(sid)
    assert a.has_output()
    assert a.pull([], 10**9) == (0, [sid])
    assert not a.has_output()
    a.ping(b"12345678")
    assert a.has_output()
    a.pull([], 0, data_allowed=False)
    assert not a.has_output()


# take_upto() against take() ------------------------------------------------------


def receiving(local_window: int, payloads: list[bytes], remote_fin: bool) -> tuple[Multiplexer, int]:
    mux = server(local_window=local_window)
    (sid,) = opened(mux)
    for payload in payloads:
        mux.receive(Data(sid, payload))
    if remote_fin:
        mux.receive(Fin(sid))
    return mux, sid


def credit(frames: list[Frame]) -> list[int]:
    assert all(isinstance(f, WindowUpdate) for f in frames)
    return [f.increment for f in frames if isinstance(f, WindowUpdate)]


@FAST
@given(
    window=st.integers(2, 200_000),
    data=st.data(),
    limit=st.one_of(st.integers(-5, 5), st.integers(0, 300_000)),
    remote_fin=st.booleans(),
    local_fin=st.booleans(),
)
def test_take_upto_is_several_takes(
    window: int, data: st.DataObject, limit: int, remote_fin: bool, local_fin: bool
) -> None:
    sizes = data.draw(st.lists(st.integers(1, max(1, window // 3)), max_size=10))
    while sum(sizes) > window:
        sizes.pop()
    before = data.draw(st.integers(0, len(sizes)))  # chunks taken earlier, with take()
    if len(sizes) > before and data.draw(st.booleans()):
        # A limit that a prefix of the inbox reaches exactly.
        limit = sum(sizes[before : before + data.draw(st.integers(1, len(sizes) - before))])
    payloads = [pattern(i, n) for i, n in enumerate(sizes)]
    a, sid = receiving(window, payloads, remote_fin)
    b, _ = receiving(window, payloads, remote_fin)
    for mux in (a, b):
        if local_fin:
            mux.close_send(sid)
            frames_of(mux)
        for _ in range(before):
            mux.take(sid)
        frames_of(mux)  # earlier WINDOW_UPDATEs
    assert a.receive_window(sid) == b.receive_window(sid)
    inbox = a.inbox_bytes(sid)

    chunks = a.take_upto(sid, limit)
    expected = [b.take(sid) for _ in chunks]
    # The same chunks, the same objects, oldest first.
    assert len(chunks) == len(expected)
    assert all(x is y for x, y in zip(chunks, expected, strict=True))
    # Until at least limit bytes are taken or the inbox is empty, and no further.
    n = sum(len(c) for c in chunks)
    assert bool(chunks) == bool(inbox)
    assert n >= limit or n == inbox
    if len(chunks) > 1:
        assert n - len(chunks[-1]) < limit
    assert a.inbox_bytes(sid) == b.inbox_bytes(sid) == inbox - n
    # Credit: one WINDOW_UPDATE when take() would have sent any, with all of it.
    got, ref = credit(frames_of(a)), credit(frames_of(b))
    assert len(got) <= 1
    assert bool(got) == bool(ref)
    if remote_fin:
        assert got == ref == []
    else:
        assert sum(got) >= sum(ref)
        assert sum(got) - sum(ref) < max(window // 2, 1)
        assert a.receive_window(sid) - b.receive_window(sid) == sum(got) - sum(ref)
    # A stream done both ways is forgotten once its inbox is taken.
    assert (sid in a) == (sid in b)
    assert (sid in a) == (not (local_fin and remote_fin and a.inbox_bytes(sid) == 0))


@FAST
@given(
    window=st.integers(2, 100_000),
    rounds=st.lists(
        st.tuples(st.lists(st.integers(1, 20_000), max_size=5), st.integers(0, 100_000)), min_size=1, max_size=12
    ),
)
def test_take_upto_credit_accounting(window: int, rounds: list[tuple[list[int], int]]) -> None:
    """Over many rounds: credit returned never exceeds what was taken, and less than half a window is owed."""
    mux = server(local_window=window)
    (sid,) = opened(mux)
    frames_of(mux)
    received = taken = credited = 0
    for sizes, limit in rounds:
        for n in sizes:
            n = min(n, mux.receive_window(sid))
            if n:
                mux.receive(Data(sid, b"d" * n))
                received += n
        taken += sum(len(c) for c in mux.take_upto(sid, limit))
        credited += sum(credit(frames_of(mux)))
        assert credited <= taken
        assert taken - credited < max(window // 2, 1)
        assert mux.receive_window(sid) == window - received + credited
        assert mux.inbox_bytes(sid) == received - taken


def test_receive_data_errors() -> None:
    mux = server(local_window=1000)
    (sid,) = opened(mux)
    pending = mux.open("h", 1)  # no OPEN_OK yet
    frames_of(mux)
    with pytest.raises(ProtocolError) as caught:
        mux.receive_data(pending + 1, [b"x"], 1)
    assert type(caught.value) is ProtocolError
    assert caught.value.message == f"DATA for stream {pending + 1}, which was never opened"
    with pytest.raises(ProtocolError) as caught:
        mux.receive_data(pending, [b"x"], 1)
    assert caught.value.message == f"DATA on stream {pending} before it was opened"
    assert mux.receive_data(sid, [b"a" * 600, b"b" * 300], 900) is True
    assert mux.receive_window(sid) == 100 and mux.inbox_bytes(sid) == 900
    with pytest.raises(FlowControlError) as flow:
        mux.receive_data(sid, [b"c" * 50, b"d" * 51], 101)
    assert flow.value.code is ErrorCode.FLOW_CONTROL_ERROR
    assert mux.receive_window(sid) == 100 and mux.inbox_bytes(sid) == 900
    assert mux.receive_data(sid, [b"e" * 100], 100) is True
    assert b"".join(mux.take_upto(sid, 10**9)) == b"a" * 600 + b"b" * 300 + b"e" * 100


def test_receive_data_after_fin_resets_the_stream() -> None:
    mux = server()
    (sid,) = opened(mux)
    mux.receive(Fin(sid))
    assert mux.receive_data(sid, [b"late"], 4) == StreamReset(sid, ErrorCode.STREAM_CLOSED)
    assert sid not in mux
    assert frames_of(mux) == [Rst(sid, ErrorCode.STREAM_CLOSED)]
    # Then the stream is closed: more DATA for it crossed our RST and is dropped.
    assert mux.receive_data(sid, [b"later"], 5) is False
    assert frames_of(mux) == []


@pytest.mark.parametrize(
    ("limit", "taken"), [(-1, 1), (0, 1), (1, 1), (100, 1), (101, 2), (200, 2), (201, 3), (10**9, 3)]
)
def test_take_upto_stops_once_limit_is_reached(limit: int, taken: int) -> None:
    payloads = [pattern(i, 100) for i in range(3)]
    mux, sid = receiving(WINDOW, payloads, remote_fin=False)
    chunks = mux.take_upto(sid, limit)
    assert len(chunks) == taken
    assert all(c is p for c, p in zip(chunks, payloads, strict=False))
    assert mux.inbox_bytes(sid) == 100 * (3 - taken)


def test_take_upto_returns_credit_like_take() -> None:
    mux, sid = receiving(WINDOW, [pattern(i, n) for i, n in enumerate([8192, 100, 50])], remote_fin=False)
    assert mux.take_upto(sid, 1) == [pattern(0, 8192)]
    assert frames_of(mux) == [WindowUpdate(sid, 8192)]
    assert mux.take_upto(sid, 10**9) == [pattern(1, 100), pattern(2, 50)]
    assert frames_of(mux) == []  # 150 owed, less than half the window
    assert mux.take_upto(sid, 10) == []
    assert mux.take_upto(999, 10) == []


# receive_data() against receive(Data) ----------------------------------------------

RECV_KINDS = ["data"] * 8 + ["take"] * 3 + ["peer_fin"] * 2 + ["open", "ok", "peer_rst", "reset", "close"]
NEVER_OPENED = 99


@st.composite
def recv_ops(draw: st.DrawFn) -> tuple[object, ...]:
    """One step of the receive_data() comparison: mostly DATA and takes."""
    kind = draw(st.sampled_from(RECV_KINDS))
    if kind == "open":
        return (kind,)
    i = draw(st.integers(0, 3))
    if kind == "data" and draw(st.integers(0, 9)) == 0:
        i = NEVER_OPENED
    if kind != "data":
        return (kind, i)
    size = draw(st.one_of(st.integers(1, 300), st.integers(1, 5000), st.integers(1, 40_000)))
    cuts = draw(st.lists(st.integers(0, size), max_size=4))
    return (kind, i, size, cuts)


def as_events(result: bool | StreamReset, sid: int) -> list[Event]:
    if result is True:
        return [DataAvailable(sid)]
    if result is False:
        return []
    return [result]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    window=st.one_of(st.integers(1, 5000), st.integers(16_384, 100_000)),
    accept=st.lists(st.sampled_from([True, True, True, False]), min_size=1, max_size=4),
    steps=st.lists(recv_ops(), min_size=5, max_size=30),
)
def test_receive_data_is_receive_of_a_data_frame(
    window: int, accept: list[bool], steps: list[tuple[object, ...]]
) -> None:
    a, b = server(local_window=window), server(local_window=window)
    sids: list[int] = []
    accepted: set[int] = set()
    tag = 0
    setup: list[tuple[object, ...]] = []
    for i, now in enumerate(accept):
        setup.append(("open",))
        if now:
            setup.append(("ok", i))
    for op in [*setup, *steps]:
        kind = op[0]
        if kind == "open":
            sids.append(a.open("h", 1))
            assert b.open("h", 1) == sids[-1]
            continue
        assert isinstance(op[1], int)
        if kind == "data":
            i = op[1]
            sid = len(sids) + 1 + i % 3 if i == NEVER_OPENED or not sids else sids[i % len(sids)]
            assert isinstance(op[2], int) and isinstance(op[3], list)
            tag += 1
            payload = pattern(tag, op[2])
            points = [0, *sorted(c % (len(payload) + 1) for c in op[3]), len(payload)]
            pieces = [payload[x:y] for x, y in itertools.pairwise(points) if y > x]
            try:
                got: object = as_events(a.receive_data(sid, pieces, len(payload)), sid)
            except ProtocolError as e:
                got = (type(e), str(e), e.code)
            try:
                expected: object = b.receive(Data(sid, payload))
            except ProtocolError as e:
                expected = (type(e), str(e), e.code)
            assert got == expected
            if isinstance(got, tuple):
                return  # a connection error: the tunnel is gone
        elif sids:
            sid = sids[op[1] % len(sids)]
            for mux in (a, b):
                if kind == "ok" and sid in mux and sid not in accepted:
                    mux.receive(OpenOk(sid))
                elif kind == "peer_fin" and sid in accepted:
                    mux.receive(Fin(sid))
                elif kind == "peer_rst":
                    mux.receive(Rst(sid, ErrorCode.CANCEL))
                elif kind == "reset":
                    mux.reset(sid, ErrorCode.CANCEL)
                elif kind == "close":
                    mux.close_send(sid)
            if kind == "ok":
                accepted.add(sid)
            if kind == "take":
                # Everything, on both: one batch each, so the credit comes back alike.
                assert b"".join(a.take_upto(sid, 10**9)) == b"".join(b.take_upto(sid, 10**9))
        # The same state after every step.
        assert a.stream_ids == b.stream_ids
        for sid in sids:
            assert a.inbox_bytes(sid) == b.inbox_bytes(sid)
            assert a.receive_window(sid) == b.receive_window(sid)
        assert frames_of(a) == frames_of(b)


# record_chunks() -------------------------------------------------------------------


def base(buf: Buffer) -> object:
    return buf.obj if isinstance(buf, memoryview) else buf


@st.composite
def part_lists(draw: st.DrawFn) -> tuple[list[Buffer], int]:
    record = draw(st.sampled_from([1, 2, 7, 64, 1000, 16 * 1024]))
    sizes = st.one_of(
        st.integers(0, 2 * record + 3),
        st.integers(0, 2 * record + 3),
        st.sampled_from([HEADER_SIZE, record - 1, record, record + 1, 3 * record]).filter(lambda n: n >= 0),
        st.integers(0, 5 * record),
    )
    parts: list[Buffer] = []
    for i, n in enumerate(draw(st.lists(sizes, max_size=12))):
        blob = pattern(i, n)
        if draw(st.booleans()):
            # A view of a part of a larger string, as pull() leaves after a split.
            skip = draw(st.integers(0, 5))
            parts.append(memoryview(pattern(i, skip) + blob)[skip:])
        else:
            parts.append(blob)
    return parts, record


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=part_lists())
def test_record_chunks(case: tuple[list[Buffer], int]) -> None:
    parts, record = case
    chunks = record_chunks(parts, record)
    # The same bytes, in the same order.
    assert joined(chunks) == joined(parts)
    # Every chunk but the last fills whole records.
    for chunk in chunks[:-1]:
        assert len(chunk) % record == 0, [len(c) for c in chunks]
    # A large part goes out as views of itself in whole records: at most what
    # shares a record with its neighbours (less than a record each side) is copied.
    viewed: dict[int, int] = {}
    for chunk in chunks:
        if isinstance(chunk, memoryview) or any(chunk is p for p in parts):
            viewed[id(base(chunk))] = viewed.get(id(base(chunk)), 0) + len(chunk)
    owed: dict[int, int] = {}
    for part in parts:
        if len(part) >= record:
            owed[id(base(part))] = owed.get(id(base(part)), 0) + len(part) - 2 * (record - 1)
    for key, n in owed.items():
        assert viewed.get(key, 0) >= n
    for chunk in chunks:
        if isinstance(chunk, memoryview):
            assert any(chunk.obj is base(p) for p in parts), "a view of something that was not handed in"


def test_record_chunks_examples() -> None:
    record = 16
    header, payload = b"H" * 12, bytes(range(40))
    chunks = record_chunks([header, payload, b"h" * 12, b"tail"], record)
    assert [len(c) for c in chunks] == [16, 32, 20]
    assert joined(chunks) == header + payload + b"h" * 12 + b"tail"
    assert isinstance(chunks[1], memoryview) and chunks[1].obj is payload
    one = b"x" * 100
    assert record_chunks([one], record)[0] is one
    assert record_chunks([], record) == []
    small = [b"a", b"b", b"c"]
    assert record_chunks(small, record) == [b"abc"]


# write_tcp() and writev_tcp(), on a fake TCP connection ---------------------------


class FakeSocket:
    """Takes at most the next allowance's bytes per call; an exception allowance is raised."""

    def __init__(self, conn: FakeConnection, allowances: list[int | OSError]) -> None:
        self.conn = conn
        self.allowances = list(allowances)
        self.calls: list[str] = []
        self.most_buffers = 0

    def _take(self, data: bytes) -> int:
        # The kernel never takes bytes while Twisted still holds earlier ones.
        assert not self.conn.queued_bytes(), "sent directly past queued data"
        allowance = self.allowances.pop(0) if self.allowances else len(data)
        if isinstance(allowance, OSError):
            raise allowance
        n = min(allowance, len(data))
        self.conn.wire += data[:n]
        return n

    def send(self, data: Buffer) -> int:
        self.calls.append("send")
        return self._take(bytes(data))

    def sendmsg(self, buffers: list[Buffer]) -> int:
        self.calls.append("sendmsg")
        self.most_buffers = max(self.most_buffers, len(buffers))
        return self._take(b"".join(buffers))


class FakeConnection:
    """The attributes of a twisted.internet.tcp.Connection that the fast path reads."""

    def __init__(self, allowances: list[int | OSError] | None = None) -> None:
        self._tempDataBuffer: list[bytes] = []
        self.dataBuffer = b""
        self.connected = 1
        self.disconnecting = False
        self._writeDisconnecting = False
        self._writeDisconnected = False
        self.socket = FakeSocket(self, allowances or [])
        self.wire = bytearray()  # what the kernel took, in order
        self.writes: list[bytes] = []  # what went through write()

    def write(self, data: bytes) -> None:
        if not isinstance(data, bytes):  # as Twisted's FileDescriptor.write
            raise TypeError(f"Data must be bytes, not {type(data)}")
        self.writes.append(data)
        if data:
            self._tempDataBuffer.append(data)

    def queued_bytes(self) -> bytes:
        return self.dataBuffer + b"".join(self._tempDataBuffer)

    def reactor_flush(self) -> None:
        """The reactor finds the socket writable: Twisted sends its queue."""
        self.wire += self.queued_bytes()
        self.dataBuffer = b""
        self._tempDataBuffer = []

    def delivered(self) -> bytes:
        """Everything, in the order the peer will read it."""
        return bytes(self.wire) + self.queued_bytes()

    @property
    def tcp(self) -> tcp.Connection:
        return cast(tcp.Connection, self)


def test_write_tcp_sends_at_once_when_idle() -> None:
    conn = FakeConnection()
    write_tcp(conn.tcp, b"hello")
    assert conn.wire == b"hello" and conn.writes == []
    write_tcp(conn.tcp, memoryview(b"xxworld")[2:])
    assert conn.wire == b"helloworld" and conn.writes == []


@pytest.mark.parametrize("taken", [0, 1, 4])
@pytest.mark.parametrize("data", [b"hello", memoryview(b"__hello")[2:]], ids=["bytes", "view"])
def test_write_tcp_queues_what_the_kernel_did_not_take(taken: int, data: Buffer) -> None:
    conn = FakeConnection([taken])
    write_tcp(conn.tcp, data)
    assert conn.wire == b"hello"[:taken]
    assert conn.writes == [b"hello"[taken:]]
    assert type(conn.writes[0]) is bytes


@pytest.mark.parametrize("error", [BlockingIOError(11, "EAGAIN"), ConnectionResetError(104, "reset")])
def test_write_tcp_queues_everything_on_a_socket_error(error: OSError) -> None:
    conn = FakeConnection([error])
    write_tcp(conn.tcp, memoryview(b"payload"))
    assert conn.wire == b""
    assert conn.writes == [b"payload"]


@pytest.mark.parametrize(
    "busy",
    ["_tempDataBuffer", "dataBuffer", "not connected", "disconnecting", "_writeDisconnecting", "_writeDisconnected"],
)
@pytest.mark.parametrize("many", [False, True])
def test_nothing_is_sent_directly_unless_the_connection_is_idle(busy: str, many: bool) -> None:
    conn = FakeConnection()
    if busy == "_tempDataBuffer":
        conn._tempDataBuffer = [b"earlier"]
    elif busy == "dataBuffer":
        conn.dataBuffer = b"earlier"
    elif busy == "not connected":
        conn.connected = 0
    else:
        setattr(conn, busy, True)
    if many:
        writev_tcp(conn.tcp, [b"ab", memoryview(b"cd"), b"ef"])
    else:
        write_tcp(conn.tcp, b"abcdef")
    assert conn.socket.calls == []
    assert conn.writes == [b"abcdef"]


def test_writev_tcp_sends_everything_in_one_sendmsg() -> None:
    conn = FakeConnection()
    writev_tcp(conn.tcp, [b"head", memoryview(b"payload"), b"", b"tail"])
    assert conn.socket.calls == ["sendmsg"]
    assert conn.wire == b"headpayloadtail" and conn.writes == []


def test_writev_tcp_of_one_part_is_write_tcp() -> None:
    conn = FakeConnection([3])
    writev_tcp(conn.tcp, [memoryview(b"single")])
    assert conn.socket.calls == ["send"]
    assert conn.wire == b"sin" and conn.writes == [b"gle"]


def test_writev_tcp_partial_send_at_every_boundary() -> None:
    parts: list[Buffer] = [b"0123", memoryview(b"..4567")[2:], b"", b"89", b"abcdef"]
    whole = joined(parts)
    for taken in range(len(whole) + 1):
        conn = FakeConnection([taken])
        writev_tcp(conn.tcp, parts)
        assert conn.wire == whole[:taken]
        assert conn.writes == ([whole[taken:]] if taken < len(whole) else [])
        assert conn.delivered() == whole


@pytest.mark.parametrize("error", [BlockingIOError(11, "EAGAIN"), OSError(90, "EMSGSIZE")])
def test_writev_tcp_queues_everything_on_a_socket_error(error: OSError) -> None:
    conn = FakeConnection([error])
    writev_tcp(conn.tcp, [b"head", memoryview(b"payload")])
    assert conn.wire == b""
    assert conn.writes == [b"headpayload"]


def test_writev_tcp_never_passes_more_than_max_iov_buffers() -> None:
    limit = fastpath._MAX_IOV
    for n in (limit, limit + 1, 3 * limit):
        conn = FakeConnection()
        parts: list[Buffer] = [bytes([i % 256]) for i in range(n)]
        writev_tcp(conn.tcp, parts)
        assert conn.socket.most_buffers <= limit
        assert conn.delivered() == joined(parts)


write_calls = st.lists(
    st.tuples(
        st.sampled_from(["write", "writev", "flush"]),
        st.lists(st.tuples(st.integers(0, 40), st.booleans()), min_size=1, max_size=6),
    ),
    min_size=1,
    max_size=15,
)
allowances = st.lists(
    st.one_of(st.integers(0, 60), st.just(BlockingIOError(11, "EAGAIN")), st.just(BrokenPipeError(32, "EPIPE"))),
    max_size=20,
)


@settings(max_examples=200, deadline=None)
@given(calls=write_calls, allow=allowances)
def test_writes_arrive_in_order_exactly_once(
    calls: list[tuple[str, list[tuple[int, bool]]]], allow: list[int | OSError]
) -> None:
    conn = FakeConnection(allow)
    expected = b""
    tag = 0
    for kind, shape in calls:
        if kind == "flush":
            conn.reactor_flush()
            continue
        parts: list[Buffer] = []
        for n, as_view in shape:
            tag += 1
            blob = pattern(tag, n)
            parts.append(memoryview(b"##" + blob)[2:] if as_view else blob)
        expected += joined(parts)
        if kind == "write":
            write_tcp(conn.tcp, parts[0])
            expected = expected[: len(expected) - len(joined(parts))] + joined(parts[:1])
        else:
            writev_tcp(conn.tcp, parts)
        # Sent or queued, in order, once; the socket is never written past the queue
        # (FakeSocket asserts it); write() only ever gets bytes (FakeConnection checks).
        assert conn.delivered() == expected
    assert all(type(w) is bytes for w in conn.writes)


def test_write_tcp_sends_only_when_idle() -> None:
    conn = FakeConnection([3, BlockingIOError(11, "EAGAIN")])
    write_tcp(conn.tcp, b"abcdef")  # the kernel takes 3; the rest is queued
    write_tcp(conn.tcp, b"ghi")  # something is queued: no send
    conn.reactor_flush()
    write_tcp(conn.tcp, b"jkl")  # EAGAIN: queued
    write_tcp(conn.tcp, b"mno")
    assert conn.socket.calls == ["send", "send"]
    assert conn.wire == b"abcdefghi"
    assert conn.delivered() == b"abcdefghijklmno"
