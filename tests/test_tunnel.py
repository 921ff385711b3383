"""
The tunnel end to end in memory: TLS with a throwaway CA, the registration
handshake, and streams to fake targets, all driven by iosim and a Clock.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from nova.agent.tunnel import AgentTunnel, AgentTunnelFactory, Rejected
from nova.rules.routes import Selector
from nova.server.tunnel import (
    LIVE_NAME_PROBE,
    OpenFailed,
    ServerContext,
    ServerTunnel,
    ServerTunnelFactory,
    TunnelGone,
)
from nova.tls import certificate_fingerprint, client_creator, parse_fingerprint, server_options
from nova.wire.codec import FrameDecoder
from nova.wire.errors import ErrorCode, OpenFailReason
from nova.wire.frames import MAX_VERSION, Data, GoAway, Hello, Open, OpenOk, Ping, Pong, Reject, Rst, Welcome, encode
from nova.wire.handshake import make_auth

from .contexts import agent_context, server_context
from .pki import CA

TOKEN = b"correct horse battery staple"


class TargetTransport(StringTransport):
    """A target connection that records half-closes and aborts."""

    def __init__(self) -> None:
        super().__init__()
        self.write_closed = False
        self.aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """A protocol on a stream that keeps what it saw."""

    def __init__(self) -> None:
        self.received = b""
        self.read_closed = False
        self.write_closed = False
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.read_closed = True

    def writeConnectionLost(self) -> None:
        self.write_closed = True

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


class Harness:
    """A NOVAS and a NOVAC tunnel joined by an in-memory TLS connection."""

    def __init__(
        self,
        agent_token: bytes = TOKEN,
        server_name: str = "novas.test",
        trust: str = "ca",
        window: int = 65536,
        max_version: int = MAX_VERSION,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.clock = Clock()
        self.ca = CA()
        cert, key = self.ca.issue("novas.test", "127.0.0.1").write(self.dir, "server")
        self.server_context = server_context(self.clock, token=TOKEN, tls=True, window=window)
        server_factory = TLSMemoryBIOFactory(
            server_options(cert, key), False, ServerTunnelFactory(self.server_context), self.clock
        )
        if trust == "ca":
            creator = client_creator(server_name, ca_path=self.ca.write(self.dir))
        elif trust == "other-ca":
            creator = client_creator(server_name, ca_path=CA("someone else").write(self.dir))
        else:  # a pinned fingerprint
            from cryptography import x509

            real = certificate_fingerprint(x509.load_pem_x509_certificate(cert.read_bytes()))
            pin = real if trust == "pin" else "sha256:" + "00" * 32
            creator = client_creator(server_name, fingerprint=parse_fingerprint(pin))
        self.targets: list[tuple[str, int, Protocol, TargetTransport]] = []
        self.refuse: dict[tuple[str, int], Exception] = {}
        self.agent_context = agent_context(
            self.clock,
            self._connect_target,
            name="db-agent",
            tags=(("env", "prod"), ("zone", "a")),
            token=agent_token,
            tls=True,
            window=window,
            max_version=max_version,
        )
        client_factory = TLSMemoryBIOFactory(
            creator, True, AgentTunnelFactory(self.agent_context, "novas.test:9022"), self.clock
        )
        address = iosim.FakeAddress()
        self.server_tls = server_factory.buildProtocol(address)
        self.client_tls = client_factory.buildProtocol(address)
        self.server: ServerTunnel = self.server_tls.wrappedProtocol  # type: ignore[assignment]
        self.agent: AgentTunnel = self.client_tls.wrappedProtocol  # type: ignore[assignment]
        self.pump = iosim.connect(
            self.server_tls,
            iosim.makeFakeServer(self.server_tls),
            self.client_tls,
            iosim.makeFakeClient(self.client_tls),
            greet=False,
        )
        self.flush()

    def flush(self) -> None:
        """Deliver everything in flight, including TLS's batched writes."""
        for _ in range(10_000):
            self.clock.advance(0)
            if not self.pump.pump():
                self.clock.advance(0)
                if not self.pump.pump():
                    return
        raise AssertionError("the connection never went quiet")

    def _connect_target(self, host: str, port: int, protocol: IProtocol) -> Deferred[IProtocol]:
        if (host, port) in self.refuse:
            return fail(self.refuse[(host, port)])
        transport = TargetTransport()
        protocol.makeConnection(transport)
        self.targets.append((host, port, protocol, transport))  # type: ignore[arg-type]
        return succeed(protocol)

    def open(self, host: str = "db.internal", port: int = 5432) -> tuple[Any, Recorder, TargetTransport, Protocol]:
        tunnel = self.server_context.registry.get("db-agent")
        assert isinstance(tunnel, ServerTunnel)
        results: list[Any] = []
        tunnel.open_stream(host, port).addBoth(results.append)
        self.flush()
        stream = results[0]
        if isinstance(stream, Failure):
            return stream, Recorder(), TargetTransport(), Protocol()
        recorder = Recorder()
        stream.makeConnection(recorder)
        _host, _port, target_protocol, target_transport = self.targets[-1]
        return stream, recorder, target_transport, target_protocol


class HandshakeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def log_text(self) -> str:
        return "\n".join(formatEvent(e) for e in self.logged)

    def test_registers_over_verified_tls(self) -> None:
        h = Harness()
        agent = h.server_context.registry.get("db-agent")
        self.assertIsInstance(agent, ServerTunnel)
        self.assertEqual(agent.tags, {"env": "prod", "zone": "a"})  # type: ignore[union-attr]
        self.assertEqual(self.successResultOf(h.agent.when_registered()), h.agent)
        self.assertIn("agent db-agent registered", self.log_text())

    def test_pinned_fingerprint_registers(self) -> None:
        h = Harness(trust="pin")
        self.assertIsNotNone(h.server_context.registry.get("db-agent"))

    def test_wrong_token_rejected_on_both_sides_without_leaking_it(self) -> None:
        h = Harness(agent_token=b"not the right token")
        self.assertIsNone(h.server_context.registry.get("db-agent"))
        failure = self.failureResultOf(h.agent.when_registered(), Rejected)
        self.assertEqual(failure.value.code, ErrorCode.AUTH_FAILED)
        text = self.log_text()
        self.assertIn("(claiming to be 'db-agent'): AUTH_FAILED", text)
        self.assertIn("rejected the registration of db-agent: AUTH_FAILED", text)
        self.assertNotIn("correct horse", text)
        self.assertNotIn("not the right token", text)

    def test_certificate_from_unknown_ca_refused(self) -> None:
        h = Harness(trust="other-ca")
        self.failureResultOf(h.agent.when_registered())
        self.assertIsNone(h.server_context.registry.get("db-agent"))
        self.assertIsNone(h.agent.mux)

    def test_wrong_server_name_refused(self) -> None:
        h = Harness(server_name="other.test")
        self.failureResultOf(h.agent.when_registered())
        self.assertIsNone(h.server_context.registry.get("db-agent"))

    def test_wrong_pin_refused(self) -> None:
        h = Harness(trust="wrong-pin")
        self.failureResultOf(h.agent.when_registered())
        self.assertIsNone(h.server_context.registry.get("db-agent"))


class ServerHandshakeUnitTests(SynchronousTestCase):
    """The server's half against a scripted agent on a plain transport."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.context = server_context(self.clock, token=TOKEN, tls=False)
        self.server = ServerTunnel(self.context)
        self.transport = StringTransport()
        self.server.makeConnection(self.transport)
        frames = FrameDecoder().feed(self.transport.value())
        self.transport.clear()
        assert isinstance(frames[0], Hello)
        self.nonce = frames[0].nonce

    def sent(self) -> list[Any]:
        return FrameDecoder().feed(self.transport.value())

    def test_accepts_a_fresh_proof(self) -> None:
        self.server.dataReceived(b"".join(encode(make_auth(TOKEN, self.nonce, b"", "a1", (), 65536))))
        self.assertIs(self.context.registry.get("a1"), self.server)

    def test_replayed_proof_for_another_nonce_rejected(self) -> None:
        old_nonce = bytes(32)
        self.server.dataReceived(b"".join(encode(make_auth(TOKEN, old_nonce, b"", "a1", (), 65536))))
        self.assertEqual(self.sent(), [Reject(ErrorCode.AUTH_FAILED, "the token proof did not verify")])
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.context.registry.get("a1"))

    def test_bad_name_rejected(self) -> None:
        self.server.dataReceived(b"".join(encode(make_auth(TOKEN, self.nonce, b"", "-bad name", (), 65536))))
        [reject] = self.sent()
        self.assertEqual(reject.code, ErrorCode.BAD_NAME)

    def test_garbage_rejected_with_protocol_error(self) -> None:
        self.server.dataReceived(b"\x01\x77" + bytes(10))
        [reject] = self.sent()
        self.assertEqual(reject.code, ErrorCode.PROTOCOL_ERROR)
        self.assertTrue(self.transport.disconnecting)

    def test_other_version_rejected(self) -> None:
        # Version 3: one this server does not speak (it offers 2, protocol.md §4.2).
        self.server.dataReceived(b"\x03\x02" + bytes(10))
        [reject] = self.sent()
        self.assertEqual(reject.code, ErrorCode.UNSUPPORTED_VERSION)

    def test_handshake_timeout(self) -> None:
        self.clock.advance(9.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertEqual(self.sent(), [Reject(ErrorCode.HANDSHAKE_TIMEOUT, "the handshake took too long")])
        self.assertTrue(self.transport.disconnecting)


class StreamTests(SynchronousTestCase):
    def test_bytes_both_ways_and_half_close(self) -> None:
        h = Harness()
        stream, user, target_transport, target = h.open()
        self.assertEqual(h.targets[-1][:2], ("db.internal", 5432))
        stream.write(b"SELECT 1;")
        h.flush()
        self.assertEqual(target_transport.value(), b"SELECT 1;")
        # The user half-closes; the target sees EOF on its write side...
        stream.loseWriteConnection()
        h.flush()
        self.assertTrue(target_transport.write_closed)
        self.assertTrue(user.write_closed)
        # ...and can still answer.
        target.dataReceived(b"1 row")
        h.flush()
        self.assertEqual(user.received, b"1 row")
        self.assertIsNone(user.lost)
        target.readConnectionLost()  # type: ignore[attr-defined]
        h.flush()
        self.assertTrue(user.read_closed)
        self.assertIsNotNone(user.lost)
        self.assertTrue(user.lost.check(error.ConnectionDone))  # type: ignore[union-attr]
        self.assertEqual(h.server.streams, {})
        self.assertEqual(h.agent.streams, {})

    def test_target_refused(self) -> None:
        h = Harness()
        h.refuse[("db.internal", 5432)] = error.ConnectionRefusedError()
        failure, *_ = h.open()
        self.assertIsInstance(failure, Failure)
        failure.trap(OpenFailed)
        self.assertEqual(failure.value.reason, OpenFailReason.REFUSED)

    def test_dns_failure(self) -> None:
        h = Harness()
        h.refuse[("nowhere.invalid", 1)] = error.DNSLookupError("nowhere.invalid")
        failure, *_ = h.open("nowhere.invalid", 1)
        self.assertEqual(failure.value.reason, OpenFailReason.DNS_FAILURE)

    def test_abort_resets_the_other_end(self) -> None:
        h = Harness()
        stream, user, target_transport, _ = h.open()
        stream.abortConnection()
        h.flush()
        self.assertTrue(target_transport.aborted)
        self.assertTrue(user.lost.check(error.ConnectionAborted))  # type: ignore[union-attr]

    def test_slow_reader_bounds_buffers_and_pauses_the_writer(self) -> None:
        window = 65536
        h = Harness(window=window)
        stream, _user, target_transport, _ = h.open()
        producer = Producer()
        stream.registerProducer(producer, True)
        agent_stream = h.agent.streams[stream.stream_id]
        agent_stream.pauseProducing()  # the target's socket is full
        payload = bytes(range(256)) * 4096  # 1 MiB
        for i in range(0, len(payload), 16384):
            stream.write(payload[i : i + 16384])
            h.flush()
        self.assertTrue(producer.paused)
        self.assertEqual(target_transport.value(), b"")
        assert h.agent.mux is not None and h.server.mux is not None
        self.assertLessEqual(h.agent.mux.inbox_bytes(stream.stream_id), window)
        self.assertEqual(h.server.mux.send_window(stream.stream_id), 0)
        # Other streams are not stalled by the slow one.
        other, _, other_target, _ = h.open("cache.internal", 6379)
        other.write(b"PING\r\n")
        h.flush()
        self.assertEqual(other_target.value(), b"PING\r\n")
        # The target drains: everything arrives, in order, and the writer resumes.
        agent_stream.resumeProducing()
        for _ in range(200):
            h.flush()
            if not producer.paused and h.server.mux.outbox_bytes(stream.stream_id) == 0:
                break
            agent_stream.resumeProducing()
        self.assertFalse(producer.paused)
        self.assertEqual(target_transport.value(), payload[: len(target_transport.value())])
        while len(target_transport.value()) < len(payload):
            before = len(target_transport.value())
            h.flush()
            if len(target_transport.value()) == before:
                break
        self.assertEqual(target_transport.value(), payload)

    def test_outbound_and_inbound_invariants_hold_through_transfers(self) -> None:
        h = Harness(window=65536)

        def check() -> None:
            for tunnel in (h.server, h.agent):
                tunnel.outbound._check_invariants()
                tunnel.inbound._check_invariants()

        bulk, _, bulk_target, _ = h.open()
        producer = Producer()
        bulk.registerProducer(producer, True)
        chat, chat_user, _, chat_target = h.open("cache.internal", 6379)
        agent_bulk = h.agent.streams[bulk.stream_id]
        agent_bulk.pauseProducing()
        for i in range(40):
            bulk.write(bytes([i]) * 16384)
            chat.write(b"PING\r\n")
            chat_target.dataReceived(b"+PONG\r\n")  # the target answers
            h.flush()
            check()
        self.assertTrue(producer.paused)
        self.assertIn(bulk.stream_id, h.server.outbound.blocked)
        for _ in range(200):
            agent_bulk.resumeProducing()
            h.flush()
            check()
            if not producer.paused and len(bulk_target.value()) == 40 * 16384:
                break
        self.assertEqual(len(bulk_target.value()), 40 * 16384)
        self.assertEqual(h.server.outbound.blocked, set())
        self.assertEqual(chat_user.received, b"+PONG\r\n" * 40)
        bulk.loseConnection()
        chat.loseConnection()
        h.flush()
        check()

    def test_tunnel_loss_closes_every_stream(self) -> None:
        h = Harness()
        _s1, user1, target1, _ = h.open()
        _s2, user2, target2, _ = h.open("cache.internal", 6379)
        h.server_tls.transport.loseConnection()  # type: ignore[union-attr]
        h.flush()
        self.assertIsNotNone(user1.lost)
        self.assertIsNotNone(user2.lost)
        self.assertTrue(target1.aborted and target2.aborted)
        self.assertIsNone(h.server_context.registry.get("db-agent"))


def _gauge(context: ServerContext) -> float | None:
    return context.audit.metrics.registry.get_sample_value("nova_tunnels_connected")


class LifeCycleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def _register(self, context: ServerContext, name: str) -> tuple[ServerTunnel, StringTransport]:
        tunnel = ServerTunnel(context)
        transport = StringTransport()
        tunnel.makeConnection(transport)
        [hello] = FrameDecoder().feed(transport.value())
        transport.clear()
        tunnel.dataReceived(b"".join(encode(make_auth(TOKEN, hello.nonce, b"", name, (), 65536))))  # type: ignore[union-attr]
        return tunnel, transport

    def _user_stream(self, tunnel: Any, transport: StringTransport) -> tuple[Any, int, Protocol]:
        """A stream the agent accepted on C{tunnel}, with a user's connection on it: (stream, its id, the user)."""
        d = tunnel.open_stream("db.internal", 5432)
        [open_] = [f for f in self._frames(transport) if isinstance(f, Open)]
        tunnel.dataReceived(b"".join(encode(OpenOk(open_.stream_id))))
        stream = self.successResultOf(d)
        user = Protocol()
        stream.makeConnection(user)
        return stream, open_.stream_id, user

    def _frames(self, transport: StringTransport) -> list[Any]:
        frames = FrameDecoder().feed(transport.value())
        transport.clear()
        return frames

    def test_a_live_agent_keeps_its_name(self) -> None:
        clock = Clock()
        context = server_context(clock, token=TOKEN, tls=False)
        old, old_transport = self._register(context, "db-agent")
        self._frames(old_transport)
        _new, new_transport = self._register(context, "db-agent")
        # The old tunnel is asked to prove it is alive, and answers.
        [ping] = self._frames(old_transport)
        self.assertIsInstance(ping, Ping)
        self.assertEqual(self._frames(new_transport), [])  # no answer to the newcomer yet
        clock.advance(LIVE_NAME_PROBE / 2)
        old.dataReceived(b"".join(encode(Pong(ping.opaque))))
        [reject] = self._frames(new_transport)
        self.assertIsInstance(reject, Reject)
        self.assertEqual(reject.code, ErrorCode.NAME_IN_USE)
        self.assertIn("in use by a live agent connected from", reject.message)
        self.assertTrue(new_transport.disconnecting)
        self.assertIs(context.registry.get("db-agent"), old)
        self.assertFalse(old_transport.disconnecting)
        self.assertEqual(self._frames(old_transport), [])  # nothing told to the live agent
        self.assertEqual(_gauge(context), 1)

    def test_a_silent_tunnel_is_replaced_after_the_probe(self) -> None:
        clock = Clock()
        context = server_context(clock, token=TOKEN, tls=False)
        old, _old_transport = self._register(context, "db-agent")
        new, new_transport = self._register(context, "db-agent")
        clock.advance(LIVE_NAME_PROBE - 0.01)
        self.assertIs(context.registry.get("db-agent"), old)
        clock.advance(0.01)
        self.assertIs(context.registry.get("db-agent"), new)
        self.assertIsInstance(self._frames(new_transport)[0], Welcome)
        self.assertTrue(old.closed)
        # The old tunnel's late disconnect does not unregister the new one,
        # and the replaced tunnel is counted out of the metrics (defect 7).
        old.connectionLost(Failure(error.ConnectionDone()))
        self.assertIs(context.registry.get("db-agent"), new)
        self.assertEqual(_gauge(context), 1)
        text = "\n".join(formatEvent(e) for e in self.logged)
        self.assertIn("it did not answer a ping when db-agent registered again", text)

    def test_a_silent_tunnel_with_open_streams_is_replaced_but_keeps_them(self) -> None:
        """
        A stalled link (docs/faults.md): the agent's fresh tunnel takes the
        name and every new stream, the old one's open streams run on (a
        user's connection that may only be slow to recover), and an open
        still waiting for the old agent is failed so it is retried.
        """
        clock = Clock()
        context = server_context(clock, token=TOKEN, tls=False)
        old, old_transport = self._register(context, "db-agent")
        stream, stream_id, user = self._user_stream(old, old_transport)
        waiting = old.open_stream("cache.internal", 6379)
        self._frames(old_transport)
        new, new_transport = self._register(context, "db-agent")
        clock.advance(LIVE_NAME_PROBE)
        self.assertIs(context.registry.get("db-agent"), new)
        self.assertIsInstance(self._frames(new_transport)[0], Welcome)
        self.failureResultOf(waiting, TunnelGone)
        self.assertFalse(old.closed)
        frames = self._frames(old_transport)
        self.assertIn(ErrorCode.REPLACED, [f.code for f in frames if isinstance(f, GoAway)])
        self.assertIn(ErrorCode.CANCEL, [f.code for f in frames if isinstance(f, Rst)])
        # The link comes back: the open stream still carries bytes both ways.
        received: list[bytes] = []
        user.dataReceived = received.append  # type: ignore[method-assign,assignment]
        old.dataReceived(b"".join(encode(Data(stream_id, b"late but whole"))))
        self.assertEqual(b"".join(received), b"late but whole")
        stream.write(b"answer")
        clock.advance(0)
        self.assertIn(b"answer", old_transport.value())
        # It ends when its last stream ends.
        stream.abortConnection()
        self.assertTrue(old.closed)

    def test_a_replaced_tunnel_that_stays_silent_is_dropped_at_the_dead_timeout(self) -> None:
        clock = Clock()
        context = server_context(clock, token=TOKEN, tls=False)
        old, old_transport = self._register(context, "db-agent")
        self._user_stream(old, old_transport)
        self._register(context, "db-agent")
        clock.advance(LIVE_NAME_PROBE)
        self.assertFalse(old_transport.disconnecting)
        for _ in range(50):
            clock.advance(1)
        self.assertTrue(old_transport.disconnecting)

    def test_a_replaced_tunnel_with_streams_gets_a_fresh_dead_timeout_and_a_longer_user_timeout(self) -> None:
        """
        A long outage (docs/faults.md): the agent's fresh tunnel arrives 40 s
        into it; the old tunnel's next retransmission may be due after its
        dead timeout, so it gets a dead timeout counted from the replacement,
        and the kernel's user timeout is doubled on its socket.
        """
        import nova.transport.tunnel as tunnel_module

        user_timeouts: list[float] = []

        def set_user_timeout(tcp: object, seconds: float) -> bool:
            user_timeouts.append(seconds)
            return True

        self.patch(tunnel_module, "set_user_timeout", set_user_timeout)
        clock = Clock()
        context = server_context(clock, token=TOKEN, tls=False)
        old, old_transport = self._register(context, "db-agent")
        dead = old.timing.dead_timeout
        self._user_stream(old, old_transport)
        clock.advance(dead - 5)  # silent from here on
        user_timeouts.clear()
        self._register(context, "db-agent")
        clock.advance(LIVE_NAME_PROBE)
        self.assertEqual(user_timeouts, [dead, 2 * dead])  # the fresh tunnel's own, then the old one's
        clock.advance(5)  # a dead timeout after it was last heard
        self.assertFalse(old_transport.disconnecting)
        clock.advance(dead - 5 - 0.5)  # just short of a dead timeout after the replacement
        self.assertFalse(old_transport.disconnecting)
        clock.advance(1)
        self.assertTrue(old_transport.disconnecting)

    def test_a_tunnel_that_closes_during_the_probe_is_replaced_at_once(self) -> None:
        clock = Clock()
        context = server_context(clock, token=TOKEN, tls=False)
        old, _ = self._register(context, "db-agent")
        new, new_transport = self._register(context, "db-agent")
        old.connectionLost(Failure(error.ConnectionDone()))
        self.assertIs(context.registry.get("db-agent"), new)
        self.assertIsInstance(self._frames(new_transport)[0], Welcome)

    def test_replacements_keep_the_tunnel_gauge_and_audit_exact(self) -> None:
        clock = Clock()
        context = server_context(clock, token=TOKEN, tls=False)
        tunnels = []
        for _ in range(5):
            tunnel, _ = self._register(context, "db-agent")
            clock.advance(LIVE_NAME_PROBE)  # the previous one never answers
            tunnels.append(tunnel)
        for tunnel in tunnels:
            tunnel.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(_gauge(context), 0)

    def test_round_trip_time_is_measured(self) -> None:
        h = Harness()
        self.assertIsNone(h.agent.rtt)
        h.clock.advance(15)  # both sides ping
        h.flush()
        self.assertIsNotNone(h.agent.rtt)
        self.assertIsNotNone(h.server.rtt)
        self.assertGreaterEqual(h.agent.rtt, 0)  # type: ignore[arg-type]

    def test_drain_refuses_new_streams_and_closes_after_the_last(self) -> None:
        h = Harness()
        stream, _user, target_transport, target = h.open()
        done = h.agent.drain(30)
        h.flush()
        self.assertTrue(h.server.draining)
        self.assertIsNone(h.server_context.registry.choose(Selector()))
        stream.write(b"still flowing")
        h.flush()
        self.assertEqual(target_transport.value(), b"still flowing")
        self.assertNoResult(done)
        stream.loseConnection()
        target.readConnectionLost()  # type: ignore[attr-defined]
        h.flush()
        self.successResultOf(done)
        self.assertIsNone(h.server_context.registry.get("db-agent"))

    def test_an_idle_tunnel_that_never_closes_is_dropped_after_the_grace(self) -> None:
        h = Harness()
        # NOVAS shuts down; the agent gets no turn to answer the TLS close.
        done = h.server.drain(30, ErrorCode.SHUTDOWN, "server shutting down", idle_grace=1.0)
        self.assertNoResult(done)
        h.clock.advance(0.9)
        self.assertNoResult(done)
        h.clock.advance(0.1)
        self.assertTrue(h.server_tls.transport.disconnecting)  # type: ignore[union-attr]
        h.flush()
        self.successResultOf(done)
        self.assertIsNone(h.server_context.registry.get("db-agent"))
        self.assertIn("without waiting for its TLS close", h.server.close_reason)

    def test_the_idle_grace_does_not_cut_a_tunnel_with_a_stream(self) -> None:
        h = Harness()
        stream, _user, target_transport, target = h.open()
        done = h.server.drain(30, ErrorCode.SHUTDOWN, "server shutting down", idle_grace=1.0)
        h.flush()
        h.clock.advance(5)
        h.flush()
        self.assertNoResult(done)
        stream.write(b"still flowing")
        h.flush()
        self.assertEqual(target_transport.value(), b"still flowing")
        stream.loseConnection()
        target.readConnectionLost()  # type: ignore[attr-defined]
        h.flush()
        self.successResultOf(done)
        self.assertEqual(h.server.close_reason, "")


class OpenRateTests(SynchronousTestCase):
    def test_a_server_opening_too_fast_is_refused_then_allowed_again(self) -> None:
        h = Harness()
        h.agent_context.max_open_rate = 5
        h.agent._open_tokens = 5
        results = [h.open(f"t{i}.internal", 80)[0] for i in range(8)]
        refused = [r for r in results if isinstance(r, Failure)]
        self.assertEqual(len(refused), 3)
        for failure in refused:
            self.assertEqual(failure.value.reason, OpenFailReason.OVERLOADED)  # type: ignore[union-attr]
        self.assertEqual(h.agent.refused_for_rate, 3)
        h.clock.advance(1)
        self.assertNotIsInstance(h.open("later.internal", 80)[0], Failure)


class TunnelLossTests(SynchronousTestCase):
    def test_finished_stream_still_delivers_to_a_slow_reader_after_the_tunnel_closes(self) -> None:
        h = Harness()
        stream, user, _target_transport, target = h.open()
        stream.pauseProducing()  # the user's socket is full
        stream.loseWriteConnection()
        target.dataReceived(b"the last rows")
        target.readConnectionLost()  # type: ignore[attr-defined]
        h.flush()
        self.assertEqual(user.received, b"")
        # The agent's side is done with every stream, so it closes the tunnel.
        h.client_tls.transport.loseConnection()  # type: ignore[union-attr]
        h.flush()
        self.assertIsNone(user.lost)
        stream.resumeProducing()
        self.assertEqual(user.received, b"the last rows")
        self.assertTrue(user.lost.check(error.ConnectionDone))  # type: ignore[union-attr]

    def test_unfinished_stream_is_cut_when_the_tunnel_goes(self) -> None:
        h = Harness()
        _stream, user, _target_transport, _ = h.open()
        h.client_tls.transport.loseConnection()  # type: ignore[union-attr]
        h.flush()
        self.assertTrue(user.lost.check(error.ConnectionLost))  # type: ignore[union-attr]


class FrameWriterPathTests(SynchronousTestCase):
    def test_tunnels_over_twisted_tls_take_the_raw_tls_path(self) -> None:
        # If a Twisted or pyOpenSSL release renames what the raw path relies
        # on, the writer falls back to Twisted's path: correct but slower.
        # This test is how that fallback gets noticed.
        h = Harness()
        for tunnel in (h.server, h.agent):
            writer = tunnel._writer
            assert writer is not None
            self.assertTrue(writer.raw_tls, f"{tunnel!r} fell back to Twisted's TLS path")
        stream, _recorder, target_transport, _target = h.open()
        payload = os.urandom(300_000)
        stream.write(payload)
        h.flush()
        self.assertEqual(target_transport.value(), payload)

    def test_a_transport_without_the_private_names_gets_write_sequence(self) -> None:
        from nova.transport.fastpath import FrameWriter, raw_tls_supported

        transport = StringTransport()
        self.assertFalse(raw_tls_supported(transport))
        writer = FrameWriter(transport)
        self.assertFalse(writer.raw_tls)
        writer.write([b"head", memoryview(b"payload"), b"tail"])
        self.assertEqual(transport.value(), b"headpayloadtail")
