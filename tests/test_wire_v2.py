"""
Protocol version 2 on the wire (docs/protocol.md §4.2, §6.1, §7): the
layouts it adds, the offer in HELLO's header, and a decoder that admits
version-2 headers only once the handshake has agreed on them.
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nova.wire.codec import FrameDecoder
from nova.wire.errors import ErrorCode, ProtocolError, UnsupportedVersion
from nova.wire.frames import (
    HEADER,
    MAC_SIZE,
    MAX_MEMBERS,
    MAX_VERSION,
    Auth,
    Data,
    Frame,
    FrameType,
    Hello,
    Members,
    Reject,
    Welcome,
    encode,
)
from nova.wire.handshake import make_auth, negotiated_version, verify_auth

TOKEN = b"correct horse battery staple"
NONCE = bytes(range(32))


def wire(frame: Frame) -> bytes:
    return b"".join(encode(frame))


def string(raw: bytes) -> bytes:
    return struct.pack(">H", len(raw)) + raw


member_ids = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)
member_lists = st.lists(member_ids, max_size=12).map(tuple)
v2_frames = st.one_of(
    st.builds(
        Auth,
        mac=st.binary(min_size=MAC_SIZE, max_size=MAC_SIZE),
        initial_window=st.integers(0, 2**32 - 1),
        name=st.text(max_size=20),
        tags=st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=3).map(tuple),
        version=st.just(2),
        features=st.integers(0, 2**32 - 1),
    ),
    st.builds(
        Welcome,
        initial_window=st.integers(0, 2**32 - 1),
        keepalive_ms=st.integers(0, 2**32 - 1),
        server_id=st.text(max_size=20),
        version=st.just(2),
        features=st.integers(0, 2**32 - 1),
        members=member_lists,
    ),
    st.builds(
        Reject,
        code=st.sampled_from(ErrorCode),
        message=st.text(max_size=40),
        version=st.just(2),
        server_id=st.text(max_size=20),
    ),
    st.builds(Members, members=member_lists),
    st.builds(Data, stream_id=st.integers(1, 9), data=st.binary(min_size=1, max_size=50)),
)


# Layouts (golden vectors from the spec's tables) ----------------------------


def test_hello_carries_the_offer_in_the_reserved_byte_only() -> None:
    v1 = wire(Hello(NONCE))
    v2 = wire(Hello(NONCE, offer=2))
    assert v1 == HEADER.pack(1, 0x01, 0, 0, 0, 32) + NONCE
    assert v2 == HEADER.pack(1, 0x01, 0, 2, 0, 32) + NONCE  # version byte 1: every agent reads HELLO
    assert FrameDecoder().feed(v2) == [Hello(NONCE, 2)]
    assert FrameDecoder().feed(v1) == [Hello(NONCE, 1)]


def test_welcome_v2_layout() -> None:
    frame = Welcome(65536, 15000, "novas-a", 2, 0, ("novas-a", "novas-b"))
    assert wire(frame) == (
        HEADER.pack(2, 0x03, 0, 0, 0, 4 + 4 + 9 + 4 + 2 + 9 + 9)
        + struct.pack(">II", 65536, 15000)
        + string(b"novas-a")
        + struct.pack(">I", 0)
        + struct.pack(">H", 2)
        + string(b"novas-a")
        + string(b"novas-b")
    )


def test_welcome_v1_is_unchanged() -> None:
    frame = Welcome(65536, 15000, "novas-a", members=("ignored",))
    assert wire(frame) == HEADER.pack(1, 0x03, 0, 0, 0, 17) + struct.pack(">II", 65536, 15000) + string(b"novas-a")


def test_auth_v2_appends_features_and_reject_v2_the_server_id() -> None:
    v1 = make_auth(TOKEN, NONCE, b"", "a1", (), 65536)
    v2 = make_auth(TOKEN, NONCE, b"", "a1", (), 65536, version=2, features=5)
    assert wire(v2)[0] == 2 and wire(v1)[0] == 1
    assert v2.body() == v1.body() + struct.pack(">I", 5)
    assert wire(Reject(ErrorCode.NAME_IN_USE, "m", 2, "s1")) == (
        HEADER.pack(2, 0x04, 0, 0, 0, 2 + 3 + 4) + struct.pack(">H", 16) + string(b"m") + string(b"s1")
    )


def test_members_layout() -> None:
    assert wire(Members(("a", "bc"))) == HEADER.pack(2, 0x33, 0, 0, 0, 2 + 3 + 4) + b"\x00\x02" + string(b"a") + string(
        b"bc"
    )


# Negotiation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offer", "speaks", "agreed"),
    [(0, 2, 1), (1, 2, 1), (2, 2, 2), (2, 1, 1), (9, 2, 2), (0, 1, 1)],
)
def test_negotiated_version(offer: int, speaks: int, agreed: int) -> None:
    assert negotiated_version(offer, speaks) == agreed


def test_this_side_speaks_two() -> None:
    assert MAX_VERSION == 2


def test_the_mac_covers_the_features() -> None:
    auth = make_auth(TOKEN, NONCE, b"", "a1", (), 65536, version=2, features=1)
    assert verify_auth(TOKEN, NONCE, b"", auth)
    tampered = Auth(auth.mac, auth.initial_window, auth.name, auth.tags, 2, 3)
    assert not verify_auth(TOKEN, NONCE, b"", tampered)
    # The same fields as version 1 do not verify either: the layouts differ.
    assert not verify_auth(TOKEN, NONCE, b"", Auth(auth.mac, auth.initial_window, auth.name, auth.tags))


# The decoder's version gate ------------------------------------------------------


@pytest.mark.parametrize("frame", [Members(("a",)), Welcome(1, 2, "s", 2), Reject(ErrorCode.AUTH_FAILED, "", 2, "s")])
def test_version_2_refused_until_agreed(frame: Frame) -> None:
    with pytest.raises(UnsupportedVersion) as e:
        FrameDecoder().feed(wire(frame))
    assert e.value.code is ErrorCode.UNSUPPORTED_VERSION
    assert FrameDecoder(max_version=2).feed(wire(frame)) == [frame]


def test_version_3_refused_by_a_version_2_decoder() -> None:
    with pytest.raises(UnsupportedVersion):
        FrameDecoder(max_version=2).feed(HEADER.pack(3, 0x30, 0, 0, 0, 8) + bytes(8))


@pytest.mark.parametrize("frame_type", [FrameType.DATA, FrameType.PING, FrameType.OPEN, FrameType.GOAWAY])
def test_frames_without_a_v2_layout_refused_with_version_2(frame_type: FrameType) -> None:
    sid = 1 if frame_type in (FrameType.DATA, FrameType.OPEN) else 0
    with pytest.raises(ProtocolError, match="no version-2 layout"):
        FrameDecoder(max_version=2).feed(HEADER.pack(2, frame_type, 0, 0, sid, 8) + bytes(8))


def test_members_with_version_1_refused() -> None:
    with pytest.raises(ProtocolError, match="version-2 frame"):
        FrameDecoder(max_version=2).feed(HEADER.pack(1, 0x33, 0, 0, 0, 2) + b"\x00\x00")


def test_too_many_or_empty_members_refused() -> None:
    many = struct.pack(">H", MAX_MEMBERS + 1) + string(b"x") * (MAX_MEMBERS + 1)
    with pytest.raises(ProtocolError, match="more than"):
        FrameDecoder(max_version=2).feed(HEADER.pack(2, 0x33, 0, 0, 0, len(many)) + many)
    empty = struct.pack(">H", 1) + string(b"")
    with pytest.raises(ProtocolError, match="empty"):
        FrameDecoder(max_version=2).feed(HEADER.pack(2, 0x33, 0, 0, 0, len(empty)) + empty)
    with pytest.raises(ValueError):
        encode(Members(("x",) * (MAX_MEMBERS + 1)))


def test_a_version_1_welcome_cannot_carry_extra_fields() -> None:
    # Why version 2 is never sent unasked: version 1 parses WELCOME exactly.
    v2_payload = b"".join(Welcome(1, 2, "s", 2, 0, ("s",)).payload())
    with pytest.raises(ProtocolError, match="left over"):
        Welcome.parse(0, v2_payload)


@settings(max_examples=150, deadline=None)
@given(frames=st.lists(v2_frames, max_size=8), cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_v2_round_trip_any_split(frames: list[Frame], cuts: list[int]) -> None:
    blob = b"".join(wire(f) for f in frames)
    points = [0, *sorted(c % (len(blob) + 1) for c in cuts), len(blob)]
    decoder = FrameDecoder(max_version=2)
    got: list[Frame] = []
    for a, b in itertools.pairwise(points):
        got += decoder.feed(blob[a:b])
    assert got == frames
