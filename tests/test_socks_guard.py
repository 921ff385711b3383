"""
Issue 14, defects 6, 10 and 12 at the SOCKS5 entry, in memory (StringTransport,
Clock): names no agent could resolve or that hide a NUL/CR/bidi character
are refused with reply 4 before any OPEN; the SOCKS password is 16+
characters and wrong ones are throttled per source like the agent token.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from nova.config import ConfigError, resolve
from nova.rules.admission import Limits
from nova.server.options import SETTINGS, build_config
from nova.server.socks import Reply, SocksClient

from .contexts import socks_factory
from .test_destinations import BAD_NAMES
from .test_endpoint import FakeStream, FakeTunnel, registry

PASSWORD = b"right-password-0123"
LIMITS = Limits(failures_before_delay=5, failures_before_block=20, block_seconds=300, max_delay=30)


def request(host: bytes, port: int = 80) -> bytes:
    return b"\x05\x01\x00\x03" + bytes([len(host)]) + host + struct.pack(">H", port)


class Entry:
    """A SOCKS factory with a fake agent; connections from chosen source addresses."""

    def __init__(self, password: bytes | None = PASSWORD, limits: Limits = LIMITS) -> None:
        self.clock = Clock()
        self.tunnel = FakeTunnel("agent")
        self.factory = socks_factory(registry(self.tunnel), self.clock, password, limits=limits)

    def connect(self, source: str = "10.9.8.7") -> tuple[SocksClient, StringTransport]:
        transport = StringTransport(peerAddress=IPv4Address("TCP", source, 40000))
        client = self.factory.buildProtocol(None)
        client.makeConnection(transport)
        return client, transport

    def login(self, password: bytes, source: str = "10.9.8.7", user: bytes = b"") -> tuple[SocksClient, bytes]:
        client, transport = self.connect(source)
        client.dataReceived(b"\x05\x01\x02")
        assert transport.value() == b"\x05\x02"
        transport.clear()
        client.dataReceived(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
        return client, transport.value()


class DomainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def test_bad_domains_get_reply_4_and_no_open(self) -> None:
        entry = Entry(password=None)
        for case, name in BAD_NAMES.items():
            client, transport = entry.connect()
            client.dataReceived(b"\x05\x01\x00")
            transport.clear()
            client.dataReceived(request(name.encode("utf-8")))
            # A name that is not even IDNA text (non-ASCII bytes) is reply 1; any other, reply 4.
            self.assertIn(transport.value()[:2], (b"\x05\x04", b"\x05\x01"), case)
            if name.isascii():
                self.assertEqual(transport.value()[:2], bytes([5, Reply.HOST_UNREACHABLE]), case)
            self.assertTrue(transport.disconnecting, case)
        self.assertEqual(entry.tunnel.opens, [])
        text = "\n".join(formatEvent(e) for e in self.logged)
        self.assertIn("refusing 127.0.0.1\\x00.evil.example:80", text)
        self.assertIn("refusing db.internal\\r\\nFAKE: line:80", text)
        self.assertIn("db.\\u202elanretni", text)
        self.assertIn("d\\u200bb.internal", text)
        for raw in ("\x00", "\r", "\u202e", "\u200b"):
            self.assertNotIn(raw, text)

    def test_bytes_that_are_not_a_name_get_reply_1(self) -> None:
        entry = Entry(password=None)
        client, transport = entry.connect()
        client.dataReceived(b"\x05\x01\x00")
        transport.clear()
        client.dataReceived(request(b"db\xff.internal"))
        self.assertEqual(transport.value()[:2], bytes([5, Reply.GENERAL_FAILURE]))
        self.assertEqual(entry.tunnel.opens, [])

    def test_a_good_domain_still_opens(self) -> None:
        entry = Entry(password=None)
        client, transport = entry.connect()
        client.dataReceived(b"\x05\x01\x00" + request(b"db.internal", 5432))
        [(host, port, d)] = entry.tunnel.opens
        self.assertEqual((host, port), ("db.internal", 5432))
        d.callback(FakeStream("agent"))
        self.assertEqual(transport.value()[-10:-8], b"\x05\x00")


class PasswordThrottleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def lines(self, needle: str) -> list[str]:
        return [t for t in (formatEvent(e) for e in self.logged) if needle in t]

    def test_wrong_passwords_are_delayed_then_refused_unchecked(self) -> None:
        entry = Entry()
        # The first five are checked at once.
        for _ in range(5):
            client, answer = entry.login(b"guess-guess-guess")
            self.assertEqual(answer, b"\x01\x01")
        # The sixth waits 1 s before it is checked.
        client, transport = entry.connect()
        client.dataReceived(b"\x05\x01\x02")
        transport.clear()
        client.dataReceived(b"\x01\x00\x11guess-guess-guess")
        self.assertEqual(transport.value(), b"")
        entry.clock.advance(0.99)
        self.assertEqual(transport.value(), b"")
        entry.clock.advance(0.01)
        self.assertEqual(transport.value(), b"\x01\x01")
        # Many at once: they all wait, then the block stops them short of being checked.
        waiting = []
        for _ in range(100):
            client, transport = entry.connect()
            client.dataReceived(b"\x05\x01\x02\x01\x00\x11guess-guess-guess")
            waiting.append(transport)
        for _ in range(3):  # they wait 2 s (6 failures so far)
            entry.clock.advance(1)
        self.assertTrue(all(t.value().endswith(b"\x01\x01") and t.disconnecting for t in waiting))
        gate = entry.factory.gate
        assert gate is not None
        self.assertEqual(len(self.lines(": wrong SOCKS password")), 20)
        self.assertEqual(gate.refused_unchecked, 100 - 14)
        self.assertEqual(len(self.lines("20 failures: blocked for 300s")), 1)
        # Blocked: even the right password is refused without being checked.
        client, answer = entry.login(PASSWORD)
        self.assertEqual(answer, b"\x01\x01")
        self.assertTrue(client.transport.disconnecting)  # type: ignore[union-attr]
        self.assertEqual(len(self.lines("refused without checking")), 1)  # logged once per block, not per attempt
        # Another source is not affected.
        client, answer = entry.login(PASSWORD, source="10.9.8.8")
        self.assertEqual(answer, b"\x01\x00")
        # The block ends.
        entry.clock.advance(301)
        client, answer = entry.login(PASSWORD)
        self.assertEqual(answer, b"\x01\x00")

    def test_a_request_sent_with_a_delayed_password_is_served(self) -> None:
        entry = Entry()
        for _ in range(5):
            entry.login(b"guess-guess-guess")
        client, transport = entry.connect()
        user, password = b"", PASSWORD
        client.dataReceived(
            b"\x05\x01\x02\x01" + bytes([len(user)]) + bytes([len(password)]) + password + request(b"db.internal")
        )
        self.assertEqual(transport.value(), b"\x05\x02")  # the password waits
        entry.clock.advance(1)
        self.assertEqual(transport.value(), b"\x05\x02\x01\x00")
        self.assertEqual([o[:2] for o in entry.tunnel.opens], [("db.internal", 80)])

    def test_a_delay_beyond_the_negotiation_timeout_closes_unchecked(self) -> None:
        entry = Entry(limits=Limits(failures_before_delay=1, failures_before_block=50, max_delay=30))
        for _ in range(5):  # checked after 0, 1, 2, 4, 8 s; the next waits 16 s, more than the 10 s allowed
            client, transport = entry.connect()
            client.dataReceived(b"\x05\x01\x02\x01\x00\x11guess-guess-guess")
            entry.clock.advance(30)
        client, transport = entry.connect()
        client.dataReceived(b"\x05\x01\x02\x01\x00" + bytes([len(PASSWORD)]) + PASSWORD)
        entry.clock.advance(10)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"\x05\x02")
        self.assertEqual(len(self.lines("the password check waited past the negotiation timeout")), 1)
        self.assertEqual(entry.clock.getDelayedCalls(), [])

    def test_no_password_no_throttle(self) -> None:
        entry = Entry(password=None)
        self.assertIsNone(entry.factory.gate)
        for _ in range(50):
            _client, answer = entry.login(b"anything")
            self.assertEqual(answer, b"\x01\x00")

    def test_the_password_never_reaches_the_log(self) -> None:
        entry = Entry()
        for _ in range(25):
            entry.login(b"guess-guess-guess")
        entry.login(PASSWORD)
        text = "\n".join(formatEvent(e) for e in self.logged)
        self.assertNotIn("guess-guess-guess", text)
        self.assertNotIn(PASSWORD.decode(), text)


def _config(**env: str) -> Any:
    base = {"NOVAS_AGENT_TOKEN": "agent-token-1234", "NOVAS_SOCKS_PORT": "1080"}
    return build_config(resolve(SETTINGS, {}, base | env))


class PasswordLengthTests(SynchronousTestCase):
    def test_short_password_refused_naming_the_setting(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            _config(NOVAS_SOCKS_PASSWORD="x" * 15)
        message = str(raised.exception)
        self.assertIn("--socks-password / NOVAS_SOCKS_PASSWORD must be at least 16 characters", message)
        self.assertNotIn("x" * 15, message)
        self.assertEqual(len(message.splitlines()), 1)

    def test_sixteen_is_enough(self) -> None:
        self.assertEqual(_config(NOVAS_SOCKS_PASSWORD="y" * 16).socks_password, b"y" * 16)
        self.assertIsNone(_config().socks_password)
