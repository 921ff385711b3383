"""
The agent port's trust rules, deterministically: handshakes after TLS only,
stalled handshakes dropped, pending handshakes per source, guesses refused
unchecked once a source is blocked, a throttle delay that never eats the
handshake deadline, scoped tokens, refusals reported once per source, and
peer text escaped before it is logged (issue 14, defects 1, 3, 4, 5, 8, 14).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from nova.admin.audit import Audit
from nova.admin.store import Record
from nova.config import ConfigError
from nova.rules.admission import (
    AgentToken,
    Limits,
    ScopeError,
    TokenScope,
    TokenSet,
    parse_scope,
    parse_token_file,
    source_key,
)
from nova.server.options import load_tokens
from nova.server.refusals import OTHER_SOURCES, RefusalLog
from nova.server.tunnel import ServerContext, ServerTunnel, ServerTunnelFactory
from nova.tls import server_options
from nova.wire.codec import FrameDecoder
from nova.wire.errors import ErrorCode
from nova.wire.frames import Auth, Frame, GoAway, Hello, Reject, Welcome, encode
from nova.wire.handshake import make_auth

from .contexts import server_context
from .pki import CA

TOKEN = b"correct horse battery staple"


def _connect(context: ServerContext, host: str = "192.0.2.7") -> tuple[ServerTunnel, StringTransport]:
    tunnel = ServerTunnel(context)
    address = IPv6Address("TCP", host, 40000) if ":" in host else IPv4Address("TCP", host, 40000)
    transport = StringTransport(peerAddress=address)
    tunnel.makeConnection(transport)
    return tunnel, transport


def _frames(transport: StringTransport) -> list[Frame]:
    frames: list[Frame] = FrameDecoder().feed(transport.value())
    transport.clear()
    return frames


def _auth(tunnel: ServerTunnel, transport: StringTransport, token: bytes, name: str, tags: Any = ()) -> list[Frame]:
    [hello] = _frames(transport)
    assert isinstance(hello, Hello)
    tunnel.dataReceived(b"".join(encode(make_auth(token, hello.nonce, b"", name, tuple(tags), 65536))))
    return _frames(transport)


class CountingTokens(TokenSet):
    checked = 0

    def match(self, nonce: bytes, binding: bytes, auth: Auth) -> AgentToken | None:
        self.checked += 1
        return super().match(nonce, binding, auth)


class StalledTLSTests(SynchronousTestCase):
    """Defect 1: nothing is written before TLS is up, and a stalled handshake is dropped, not closed."""

    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp())
        self.clock = Clock()
        cert, key = CA().issue("novas.test").write(directory, "server")
        self.context = server_context(self.clock, token=TOKEN, tls=True)
        self.factory = TLSMemoryBIOFactory(server_options(cert, key), False, ServerTunnelFactory(self.context))

    def test_a_stalled_tls_handshake_is_aborted_at_the_deadline(self) -> None:
        address = IPv4Address("TCP", "192.0.2.9", 5000)
        tls = self.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        tls.makeConnection(transport)
        tunnel: ServerTunnel = tls.wrappedProtocol  # type: ignore[assignment]
        self.assertEqual(self.context.pending, 1)
        self.assertEqual(tunnel._nonce, b"")  # no HELLO queued behind an unfinished TLS handshake
        self.clock.advance(self.context.timing.handshake_timeout)
        self.assertTrue(transport.disconnected, "the stalled connection was only asked to close")
        tls.connectionLost(Failure(Exception("aborted")))
        self.assertEqual((self.context.pending, self.context.pending_by_source), (0, {}))


class PendingPerSourceTests(SynchronousTestCase):
    def test_one_source_cannot_take_every_pending_slot(self) -> None:
        limits = Limits(max_pending_per_source=2, max_pending_handshakes=3)
        context = server_context(Clock(), token=TOKEN, tls=False, limits=limits)
        held = [_connect(context, "192.0.2.7") for _ in range(2)]
        # Over its source's limit: it waits its turn, reading paused, no HELLO.
        _third, third_transport = _connect(context, "192.0.2.7")
        self.assertEqual((third_transport.value(), third_transport.producerState), (b"", "paused"))
        self.assertFalse(third_transport.disconnected)
        # Another source is not held up by it.
        _other, other_transport = _connect(context, "192.0.2.8")
        self.assertIsInstance(_frames(other_transport)[0], Hello)
        self.assertEqual(context.pending_by_source, {"192.0.2.7": 2, "192.0.2.8": 1})
        # One held handshake ends: the waiting one takes its slot and gets HELLO.
        held[0][0].connectionLost(Failure(Exception("gone")))
        self.assertEqual(third_transport.producerState, "producing")
        self.assertIsInstance(_frames(third_transport)[0], Hello)
        self.assertEqual(context.pending_by_source, {"192.0.2.7": 2, "192.0.2.8": 1})
        self.assertEqual(context.waiting_count, 0)

    def test_the_waiting_queue_is_bounded_and_waiting_has_a_deadline(self) -> None:
        clock = Clock()
        limits = Limits(max_pending_per_source=1, max_pending_handshakes=3)
        context = server_context(clock, token=TOKEN, tls=False, limits=limits)
        _connect(context)
        waiting = [_connect(context) for _ in range(3)]
        _, refused = _connect(context)
        self.assertTrue(refused.disconnected)
        self.assertTrue(all(not t.disconnected for _, t in waiting))
        clock.advance(context.timing.handshake_timeout)  # nobody finished: all dropped, nothing leaks
        self.assertTrue(all(t.disconnected for _, t in waiting))
        for tunnel, _ in waiting:
            tunnel.connectionLost(Failure(Exception("aborted")))
        self.assertEqual((context.waiting_count, context.waiting), (0, {}))


class ThrottleTests(SynchronousTestCase):
    def test_guesses_in_parallel_are_refused_unchecked_once_the_budget_is_spent(self) -> None:
        """Defect 3: 50 handshakes past HELLO at once, then 50 wrong AUTHs: only the budget is checked."""
        tokens = CountingTokens([TOKEN])
        limits = Limits(failures_before_block=5, failures_before_delay=100)
        context = server_context(Clock(), token=None, tokens=tokens, tls=False, limits=limits)
        guesses = [_connect(context) for _ in range(50)]
        answers = [_auth(t, tr, b"wrong token guess %d" % i, "guess") for i, (t, tr) in enumerate(guesses)]
        self.assertEqual(tokens.checked, 5)
        self.assertTrue(all(isinstance(a[0], Reject) and a[0].code == ErrorCode.AUTH_FAILED for a in answers))
        # Blocked: even the right token is refused (unchecked) for the block period ...
        _late, late_transport = _connect(context)
        self.assertTrue(late_transport.disconnected)
        # ... while another source is not affected.
        good, good_transport = _connect(context, "192.0.2.99")
        self.assertIsInstance(_auth(good, good_transport, TOKEN, "db-agent")[0], Welcome)

    def test_ipv6_sources_are_counted_by_their_64(self) -> None:
        self.assertEqual(source_key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64")
        self.assertEqual(source_key("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::/64")
        self.assertNotEqual(source_key("2001:db8:1:3::1"), source_key("2001:db8:1:2::1"))
        self.assertEqual(source_key("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(source_key("192.0.2.1"), "192.0.2.1")
        limits = Limits(failures_before_block=3, failures_before_delay=100)
        context = server_context(Clock(), token=TOKEN, tls=False, limits=limits)
        for i in range(3):
            t, tr = _connect(context, f"2001:db8:1:2::{i + 1}")
            _auth(t, tr, b"wrong token guess!", "guess")
        _, blocked = _connect(context, "2001:db8:1:2::ffff")
        self.assertTrue(blocked.disconnected)

    def test_the_delay_never_eats_the_handshake_deadline(self) -> None:
        """Defect 4: an agent sharing a failing address still registers after the delay."""
        clock = Clock()
        limits = Limits(failures_before_delay=2, failures_before_block=50)
        context = server_context(clock, token=TOKEN, tls=False, limits=limits)
        for _ in range(9):
            t, tr = _connect(context)
            clock.advance(limits.max_delay)  # the guesser waits out its delays too
            _auth(t, tr, b"wrong token guess!", "guess")
        agent, transport = _connect(context)
        self.assertEqual(_frames(transport), [])  # delayed
        clock.advance(limits.max_delay)
        self.assertEqual(len(transport.value()) > 0, True)  # HELLO went out after at most max_delay
        clock.advance(context.timing.handshake_timeout - 0.5)  # a slow agent, well past connect + timeout
        self.assertFalse(transport.disconnected)
        self.assertIsInstance(_auth(agent, transport, TOKEN, "db-agent")[0], Welcome)

    def test_the_delay_is_below_half_an_agents_handshake_timeout(self) -> None:
        self.assertLessEqual(Limits().max_delay, 10.0 / 2)


class ScopeTests(SynchronousTestCase):
    def _context(self, *tokens: AgentToken) -> ServerContext:
        return server_context(Clock(), token=None, tokens=TokenSet(tokens), tls=False)

    def test_scope_words(self) -> None:
        label, scope = parse_scope(["id=prod", "name=db-*", "tags=Env=Production;VPC=*"])
        self.assertEqual(label, "prod")
        self.assertIsNone(scope.problem("db-agent-0", [("Env", "Production"), ("VPC", "dev_infra")]))
        self.assertIn("may not register the name 'web-1'", scope.problem("web-1", []) or "")
        self.assertIn("may not claim Env=Dev", scope.problem("db-1", [("Env", "Dev")]) or "")
        self.assertIn("may not claim the tag 'Team'", scope.problem("db-1", [("Team", "x")]) or "")
        self.assertIsNone(TokenScope().problem("anything", [("Any", "thing")]))
        for bad in (["nonsense"], ["id=a", "id=b"], ["tags=Env"], ["owner=me"], ["id=bad label!"]):
            with self.assertRaises(ScopeError):
                parse_scope(bad)

    def test_token_file_errors_name_the_line_never_the_token(self) -> None:
        path = Path(tempfile.mkdtemp()) / "tokens"
        secret = "s3cret-token-value-0123456789"
        path.write_text(f"# comment\n\n{secret} id=ok\n{secret}-2 colour=blue\n")
        with self.assertRaises(ScopeError) as caught:
            parse_token_file(path.read_text())
        self.assertIn("line 4", str(caught.exception))
        self.assertNotIn(secret, str(caught.exception))
        path.write_text(f"{secret} id=a\n{secret}-2 id=a\n")
        self.assertIn("also used on line 1", str(self.assertRaises(ScopeError, parse_token_file, path.read_text())))

    def test_short_tokens_are_refused_naming_the_setting(self) -> None:
        e = self.assertRaises(ConfigError, load_tokens, (b"fifteen-chars!!",), None)
        self.assertIn("NOVAS_AGENT_TOKEN", str(e))
        self.assertIn("16", str(e))
        self.assertNotIn("fifteen-chars!!", str(e))
        path = Path(tempfile.mkdtemp()) / "tokens"
        path.write_text("short-token id=x\n")
        e = self.assertRaises(ConfigError, load_tokens, (), path)
        self.assertIn("NOVAS_AGENT_TOKEN_FILE", str(e))

    def test_an_out_of_scope_registration_is_refused_and_says_why(self) -> None:
        prod = AgentToken(b"prod-token-0123456789", "prod", parse_scope(["name=db-*", "tags=Env=Production"])[1])
        dev = AgentToken(b"dev-token-0123456789", "dev", parse_scope(["tags=Env=Dev"])[1])
        context = self._context(prod, dev)
        for token, name, tags, expected in (
            (prod.secret, "web-1", (("Env", "Production"),), "may not register the name 'web-1'"),
            (dev.secret, "db-9", (("Env", "Production"),), "may not claim Env=Production"),
        ):
            tunnel, transport = _connect(context)
            [answer] = _auth(tunnel, transport, token, name, tags)
            self.assertIsInstance(answer, Reject)
            assert isinstance(answer, Reject)
            self.assertEqual(answer.code, ErrorCode.FORBIDDEN)
            self.assertIn(expected, answer.message)
        tunnel, transport = _connect(context)
        [welcome] = _auth(tunnel, transport, prod.secret, "db-1", (("Env", "Production"), ("nova/version", "1")))
        self.assertIsInstance(welcome, Welcome)
        self.assertEqual(tunnel.describe()["token_id"], "prod")


class RefusalLogTests(SynchronousTestCase):
    def test_first_reported_rest_summarised(self) -> None:
        log = RefusalLog(interval=60)
        self.assertTrue(log.refused("192.0.2.1", "AUTH_FAILED", 0))
        for t in range(1, 1001):
            self.assertFalse(log.refused("192.0.2.1", "CLOSED_EARLY", t / 100))
        self.assertTrue(log.refused("192.0.2.2", "BLOCKED", 1))
        self.assertEqual(log.due(59), [])
        [summary] = log.due(60)
        self.assertEqual((summary.source, summary.total), ("192.0.2.1", 1000))
        self.assertEqual(summary.codes(), "CLOSED_EARLY x1000")

    def test_sources_beyond_the_bound_share_one_bucket(self) -> None:
        log = RefusalLog(interval=60, max_sources=10)
        for i in range(1000):
            log.refused(f"10.0.{i // 256}.{i % 256}", "CLOSED_EARLY", 1)
        self.assertLessEqual(len(log), 11)
        self.assertIn(OTHER_SOURCES, {s.source for s in log.due(120)})

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 20), st.floats(0, 30)), max_size=300))
    def test_every_refusal_is_reported_once_or_counted_once(self, events: list[tuple[int, float]]) -> None:
        log = RefusalLog(interval=10, max_sources=8)
        now = 0.0
        reported = 0
        summarised = 0
        for source, step in events:
            now += step
            reported += log.refused(f"s{source}", "X", now)
            self.assertLessEqual(len(log), 9)
            summarised += sum(s.total for s in log.due(now))
        summarised += sum(s.total for s in log.due(now + 11))
        self.assertEqual(reported + summarised, len(events))
        self.assertFalse(log.pending())


class FloodReportTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        self.records: list[Record] = []

        class Store:
            def record(store, record: Record) -> None:
                self.records.append(record)

        self.audit = Audit(Store(), server="novas-1")  # type: ignore[arg-type]

    def test_a_flood_of_refusals_leaves_a_bounded_log_and_audit(self) -> None:
        """Defect 8: 5,000 connect-and-close from one source: two log lines, two records."""
        clock = Clock()
        context = server_context(clock, token=TOKEN, tls=False, audit=self.audit)
        for _ in range(5000):
            tunnel, _ = _connect(context, "192.0.2.50")
            tunnel.connectionLost(Failure(Exception("gone")))
            clock.advance(0.001)
        clock.advance(context.refusals.interval * 2)
        lines = [formatEvent(e) for e in self.logged if "192.0.2.50" in formatEvent(e)]
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("refused 4999 more connection(s) from 192.0.2.50", lines[1])
        self.assertEqual([r.data.get("count") for r in self.records], [1, 4999])
        self.assertEqual(
            self.audit.metrics.registry.get_sample_value("nova_auth_failures_total", {"reason": "CLOSED_EARLY"}), 5000
        )

    def test_claimed_names_stay_out_of_the_agent_field(self) -> None:
        context = server_context(Clock(), token=TOKEN, tls=False, audit=self.audit)
        tunnel, transport = _connect(context)
        _auth(tunnel, transport, b"wrong token guess!", "db-agent-0")
        [record] = self.records
        self.assertEqual(record.agent, "")
        self.assertEqual(record.data["claimed_name"], "db-agent-0")

    def test_peer_text_is_escaped_in_logs_and_audit(self) -> None:
        """Defect 14: a GOAWAY message with a raw CR LF cannot forge a log line."""
        context = server_context(Clock(), token=TOKEN, tls=False, audit=self.audit)
        tunnel, transport = _connect(context)
        _auth(tunnel, transport, TOKEN, "db-agent")
        tunnel.dataReceived(b"".join(encode(GoAway(ErrorCode.NO_ERROR, "bye\r\nagent evil registered\u202e"))))
        text = "\n".join(formatEvent(e) for e in self.logged)
        self.assertIn("bye\\r\\nagent evil registered\\u202e", text)
        self.assertNotIn("\nagent evil registered", text)
        self.audit.open_failed("db-agent", "route 1", "127.0.0.1", "db:5432", "OTHER", "no\rway\x00")
        self.assertEqual(self.records[-1].data["message"], "no\\rway\\x00")
