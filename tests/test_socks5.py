"""
The SOCKS5 negotiation parser (L{nova.wire.socks5}) on its own: bytes in
any split give the same events; valid negotiations round-trip; nothing
beyond L{MAX_BUFFER} is kept; garbage is refused, never raised.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nova.wire.socks5 import (
    AUTH_FAILED,
    AUTH_OK,
    MAX_BUFFER,
    Connect,
    Credentials,
    Event,
    Negotiation,
    Refuse,
    Reply,
    Send,
    State,
    reply,
)


def drive(negotiation: Negotiation, chunks: list[bytes], accept: bool = True) -> list[Event]:
    """Feed C{chunks}, answering credentials at once (accepting them unless told otherwise)."""
    events: list[Event] = []

    def take(new: list[Event]) -> None:
        for event in new:
            events.append(event)
            assert negotiation.buffered <= MAX_BUFFER
            if isinstance(event, Credentials):
                if accept:
                    events.append(Send(negotiation.accept()))
                    take(negotiation.receive(b""))
                else:
                    events.append(Send(negotiation.reject()))

    for chunk in chunks:
        take(negotiation.receive(chunk))
        assert negotiation.buffered <= MAX_BUFFER
    return events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def greeting(*methods: int) -> bytes:
    return bytes([5, len(methods), *methods])


def credentials(user: bytes, password: bytes) -> bytes:
    return b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password


def connect(host: str, port: int) -> bytes:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        encoded = host.encode("ascii")
        return b"\x05\x01\x00\x03" + bytes([len(encoded)]) + encoded + struct.pack(">H", port)
    atyp = b"\x01" if address.version == 4 else b"\x04"
    return b"\x05\x01\x00" + atyp + address.packed + struct.pack(">H", port)


hosts = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}", fullmatch=True).filter(
        lambda h: not h.endswith("-") and "-." not in h
    ),
)
ports = st.integers(1, 65535)
names = st.binary(max_size=255)
cuts = st.lists(st.integers(0, 2000), max_size=8)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=1500), cuts, st.booleans())
    def test_any_split_gives_the_same_events(self, data: bytes, where: list[int], password: bool) -> None:
        whole = drive(Negotiation(password), [data])
        self.assertEqual(drive(Negotiation(password), split(data, where)), whole)
        # A refusal is the last event; after a CONNECT only a refusal may come (early bytes past the bound).
        for i, event in enumerate(whole):
            if isinstance(event, Refuse):
                self.assertEqual(i, len(whole) - 1)
            if isinstance(event, Connect):
                self.assertTrue(all(isinstance(e, Refuse) for e in whole[i + 1 :]))

    @settings(max_examples=300, deadline=None)
    @given(names, names, hosts, ports, st.binary(max_size=200), cuts)
    def test_a_valid_negotiation_round_trips(
        self, user: bytes, password: bytes, host: str, port: int, early: bytes, where: list[int]
    ) -> None:
        data = greeting(0, 2) + credentials(user, password) + connect(host, port) + early
        negotiation = Negotiation(password_required=True)
        events = drive(negotiation, split(data, where))
        self.assertEqual(
            events,
            [Send(b"\x05\x02"), Credentials(user, password), Send(AUTH_OK), Connect(host, port)],
        )
        self.assertIs(negotiation.state, State.CONNECTING)
        self.assertEqual(negotiation.finish(), early)
        self.assertIs(negotiation.state, State.DONE)
        self.assertEqual(negotiation.receive(b"relayed, not parsed"), [])

    @settings(max_examples=100, deadline=None)
    @given(hosts, ports)
    def test_no_password_no_credentials(self, host: str, port: int) -> None:
        events = drive(Negotiation(False), [greeting(0) + connect(host, port)])
        self.assertEqual(events, [Send(b"\x05\x00"), Connect(host, port)])

    @settings(max_examples=100, deadline=None)
    @given(st.integers(1, 64), st.binary(min_size=1, max_size=64))
    def test_bytes_past_the_bound_are_refused_before_they_are_kept(self, size: int, extra: bytes) -> None:
        negotiation = Negotiation(False)
        drive(negotiation, [greeting(0) + connect("db.internal", 5432)])
        self.assertEqual(negotiation.receive(bytes(MAX_BUFFER)), [])
        [refusal] = negotiation.receive(extra)
        self.assertEqual(refusal, Refuse("malformed SOCKS5: request too long"))
        self.assertIs(negotiation.state, State.CLOSED)
        self.assertEqual(negotiation.buffered, 0)


class MessageTests(SynchronousTestCase):
    def test_not_socks5(self) -> None:
        [refusal] = Negotiation(False).receive(b"\x04\x01\x00\x50")
        self.assertEqual(refusal, Refuse("malformed SOCKS5: not SOCKS5 (version byte 4)"))

    def test_a_password_is_required(self) -> None:
        [refusal] = Negotiation(True).receive(greeting(0))
        self.assertEqual(refusal, Refuse("no acceptable authentication method (a password is required)", b"\x05\xff"))

    def test_rejected_credentials_end_the_negotiation(self) -> None:
        negotiation = Negotiation(True)
        events = drive(negotiation, [greeting(2) + credentials(b"u", b"p") + connect("db", 1)], accept=False)
        self.assertEqual(events, [Send(b"\x05\x02"), Credentials(b"u", b"p"), Send(AUTH_FAILED)])
        self.assertIs(negotiation.state, State.CLOSED)

    def test_credentials_wait_for_an_answer(self) -> None:
        negotiation = Negotiation(True)
        events = negotiation.receive(greeting(2) + credentials(b"u", b"p") + connect("db", 1))
        self.assertEqual(events, [Send(b"\x05\x02"), Credentials(b"u", b"p")])
        self.assertEqual(negotiation.receive(b""), [])
        self.assertEqual(negotiation.accept(), AUTH_OK)
        self.assertEqual(negotiation.receive(b""), [Connect("db", 1)])

    def test_replies_for_refused_requests(self) -> None:
        cases = [
            (b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50", Reply.COMMAND_NOT_SUPPORTED, "command 2 not supported"),
            (b"\x05\x01\x00\x09\x00\x00", Reply.ADDRESS_TYPE_NOT_SUPPORTED, "address type 9 not supported"),
            (b"\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50", Reply.GENERAL_FAILURE, "malformed request header"),
            (connect("db.internal", 0), Reply.GENERAL_FAILURE, "port 0"),
            (b"\x05\x01\x00\x03\x00\x00\x50", Reply.GENERAL_FAILURE, "empty domain name"),
            (connect("db..internal", 80), Reply.HOST_UNREACHABLE, "refusing db..internal:80"),
        ]
        for request, code, why in cases:
            negotiation = Negotiation(False)
            *_, refusal = negotiation.receive(greeting(0) + request)
            assert isinstance(refusal, Refuse)
            self.assertEqual(refusal.data, reply(code), why)
            self.assertIn(why, refusal.why)
            self.assertIs(negotiation.state, State.CLOSED)

    def test_a_timeout_refusal_replies_only_when_a_reply_is_due(self) -> None:
        negotiation = Negotiation(False)
        self.assertEqual(negotiation.refuse("slow").data, b"")
        negotiation = Negotiation(False)
        negotiation.receive(greeting(0))
        self.assertEqual(negotiation.refuse("slow"), Refuse("malformed SOCKS5: slow", reply(Reply.GENERAL_FAILURE)))
