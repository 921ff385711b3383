"""
The error taxonomy (nova.errors): one base class, one table of open failures.
"""

from __future__ import annotations

import importlib

from twisted.internet import error
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from nova.admin.store import AuditStoreError
from nova.agent.tunnel import Rejected, classify
from nova.config import ConfigError
from nova.errors import (
    DIAL_ERRORS,
    OPEN_FAILURES,
    NovaError,
    OpenError,
    StartupError,
    Why,
    describe_dial_error,
    open_failure,
)
from nova.rules.admission import ScopeError
from nova.rules.destinations import PolicyDenied
from nova.server.endpoint import AgentTimeout, NoAgent, retryable
from nova.server.listener import failure_reason
from nova.server.socks import Reply, reply_for
from nova.server.tunnel import OpenFailed, TunnelBusy, TunnelGone
from nova.tls import TLSConfigError
from nova.wire.errors import ControlFlood, ErrorCode, OpenFailReason, ProtocolError
from nova.wire.hostname import InvalidHostName


class TaxonomyTests(SynchronousTestCase):
    def test_nova_errors_share_one_base(self) -> None:
        for cls in (
            ConfigError,
            StartupError,
            TLSConfigError,
            AuditStoreError,
            ScopeError,
            ProtocolError,
            ControlFlood,
            InvalidHostName,
            Rejected,
            OpenFailed,
            TunnelGone,
            TunnelBusy,
            NoAgent,
            AgentTimeout,
        ):
            self.assertTrue(issubclass(cls, NovaError), cls)

    def test_busy_is_no_longer_a_gone_tunnel_but_still_retryable(self) -> None:
        self.assertFalse(issubclass(TunnelBusy, TunnelGone))
        busy = TunnelBusy("agent a has 4096 streams, the most allowed")
        self.assertTrue(busy.retryable)
        self.assertEqual(failure_reason(Failure(busy)), "tunnel_gone")

    def test_startup_error_is_a_line_or_an_exit_status(self) -> None:
        self.assertEqual(StartupError("novas: error: x").code, "novas: error: x")
        self.assertEqual(StartupError(0).code, 0)


# What the five mappers answered before they became one table.
_BEFORE: list[tuple[OpenError | Exception, str, Reply, bool]] = [
    (NoAgent.__new__(NoAgent), "no_agent", Reply.NETWORK_UNREACHABLE, False),
    (AgentTimeout("late"), "agent_timeout", Reply.GENERAL_FAILURE, True),
    (TunnelGone("gone"), "tunnel_gone", Reply.GENERAL_FAILURE, True),
    (TunnelBusy("busy"), "tunnel_gone", Reply.GENERAL_FAILURE, True),
    (OpenFailed(OpenFailReason.REFUSED, "x"), "refused", Reply.CONNECTION_REFUSED, False),
    (OpenFailed(OpenFailReason.DNS_FAILURE, "x"), "dns_failure", Reply.HOST_UNREACHABLE, False),
    (OpenFailed(OpenFailReason.UNREACHABLE, "x"), "unreachable", Reply.HOST_UNREACHABLE, False),
    (OpenFailed(OpenFailReason.TIMEOUT, "x"), "timeout", Reply.TTL_EXPIRED, False),
    (OpenFailed(OpenFailReason.DENIED, "x"), "denied", Reply.NOT_ALLOWED, False),
    (OpenFailed(OpenFailReason.OVERLOADED, "x"), "overloaded", Reply.GENERAL_FAILURE, True),
    (OpenFailed(OpenFailReason.DRAINING, "x"), "draining", Reply.GENERAL_FAILURE, True),
    (OpenFailed(OpenFailReason.OTHER, "x"), "other", Reply.GENERAL_FAILURE, False),
    (error.ConnectionRefusedError("declined"), "error", Reply.GENERAL_FAILURE, False),
    (CancelledError(), "error", Reply.GENERAL_FAILURE, False),
    (ValueError("x"), "error", Reply.GENERAL_FAILURE, False),
]


class OpenFailureTableTests(SynchronousTestCase):
    def test_server_side_answers_are_unchanged(self) -> None:
        for exc, label, reply, again in _BEFORE:
            failure = Failure(exc)
            self.assertEqual(
                (failure_reason(failure), reply_for(failure), retryable(failure)), (label, reply, again), repr(exc)
            )

    def test_every_reason_has_its_row(self) -> None:
        for reason in OpenFailReason:
            category = open_failure(OpenFailed(reason, "x"))
            self.assertEqual((category.label, category.wire), (reason.name.lower(), reason))
        self.assertEqual(set(OPEN_FAILURES), set(Why))

    def test_agent_side_classification_is_unchanged(self) -> None:
        cases = [
            (PolicyDenied.__new__(PolicyDenied), OpenFailReason.DENIED),
            (error.DNSLookupError("x"), OpenFailReason.DNS_FAILURE),
            (error.ConnectionRefusedError(), OpenFailReason.REFUSED),
            (error.TimeoutError(), OpenFailReason.TIMEOUT),
            (error.TCPTimedOutError(), OpenFailReason.TIMEOUT),
            (CancelledError(), OpenFailReason.TIMEOUT),
            (error.NoRouteError(), OpenFailReason.UNREACHABLE),
            (error.ConnectError("x"), OpenFailReason.OTHER),
            (ValueError("x"), OpenFailReason.OTHER),
        ]
        for exc, reason in cases:
            self.assertEqual(classify(Failure(exc)), reason, repr(exc))

    def test_dial_errors_name_real_classes(self) -> None:
        # The table names classes (nova.errors imports no Twisted): a class
        # that moved would silently stop matching.
        for name, _why in DIAL_ERRORS:
            module, _, cls = name.rpartition(".")
            self.assertTrue(issubclass(getattr(importlib.import_module(module), cls), BaseException), name)

    def test_check_descriptions(self) -> None:
        self.assertEqual(
            describe_dial_error(error.ConnectionRefusedError()),
            "connection refused (nothing listens on that port, or a firewall rejects it)",
        )
        self.assertEqual(
            describe_dial_error(error.TimeoutError()),
            "no answer (timed out: a firewall or security group may drop the packets)",
        )
        dns = error.DNSLookupError("novas.invalid")
        self.assertEqual(describe_dial_error(dns), f"DNS lookup failed: {dns}")
        self.assertEqual(describe_dial_error(error.NoRouteError()), "no route to host")
        self.assertEqual(describe_dial_error(ValueError("odd")), "odd")
        self.assertEqual(describe_dial_error(ValueError()), "ValueError")

    def test_protocol_errors_keep_their_codes(self) -> None:
        self.assertEqual(ControlFlood("x").code, ErrorCode.CONTROL_FLOOD)
