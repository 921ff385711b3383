"""
The agent's destination policy (--allow / NOVAC_ALLOW): parsing, decisions,
resolve-once dialling (no DNS rebinding), and OPEN_FAIL DENIED through a
tunnel.

Nothing here sends a packet to a denied address: decisions are pure,
resolvers and connectors are fakes (or a MemoryReactor), and the one
real-process test uses loopback only.

The tests that start processes or open real sockets are in
tests/test_policy_integration.py.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Any

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from nova.agent.dialer import Dialer, reactor_resolver, tcp_connector
from nova.agent.options import Options, build_config
from nova.agent.tap import NovacService
from nova.agent.tunnel import classify
from nova.config import ConfigError, resolve
from nova.rules.destinations import (
    WHY_NO_RULE,
    WHY_SENSITIVE,
    IPAddress,
    Policy,
    PolicyDenied,
    PolicyError,
    is_sensitive,
    parse_policy,
    parse_rule,
)
from nova.server.tunnel import OpenFailed
from nova.wire.errors import OpenFailReason

from .test_tunnel import Harness

METADATA = "169.254.169.254"


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def config_values(**extra: Any) -> dict[str, Any]:
    """The merged settings of a minimal agent, with C{extra} on top."""
    env = {"NOVAC_SERVER": "novas.test:9022", "NOVAC_TOKEN": "a-long-enough-token", "NOVAC_TLS": "off"}
    return resolve(Options.settings, {}, env) | extra


class ParseTests(SynchronousTestCase):
    def test_good_rules(self) -> None:
        cases: list[tuple[str, str, tuple[int, int], str | None]] = [
            ("10.0.0.0/8", "network", (0, 65535), "10.0.0.0/8"),
            ("10.0.0.0/8:5432", "network", (5432, 5432), "10.0.0.0/8"),
            ("192.168.1.5", "network", (0, 65535), "192.168.1.5/32"),
            ("192.168.1.5:8000-8080", "network", (8000, 8080), "192.168.1.5/32"),
            ("192.168.1.5:*", "network", (0, 65535), "192.168.1.5/32"),
            ("[fd00::/8]:443", "network", (443, 443), "fd00::/8"),
            ("[::1]", "network", (0, 65535), "::1/128"),
            ("fd00::/8", "network", (0, 65535), "fd00::/8"),
            ("fd00:ec2::254", "network", (0, 65535), "fd00:ec2::254/128"),
            ("169.254.169.254/32:80", "network", (80, 80), "169.254.169.254/32"),
            ("db.internal", "name", (0, 65535), None),
            ("db.internal:5432", "name", (5432, 5432), None),
            ("*.internal:8000-8080", "name", (8000, 8080), None),
            ("DB.Internal.", "name", (0, 65535), None),
            ("*", "any", (0, 65535), None),
            ("*:443", "any", (443, 443), None),
            ("  *:1-65535 ", "any", (1, 65535), None),
        ]
        for text, kind, ports, network in cases:
            rule = parse_rule(text)
            self.assertEqual((rule.kind, rule.ports), (kind, ports), text)
            self.assertEqual(str(rule.network) if rule.network else None, network, text)

    def test_bad_rules_name_the_rule(self) -> None:
        cases = {
            "10.0.0.1/8": "host bits set",
            "10.0.0.0/33": "10.0.0.0/33",
            "300.1.1.1": "not a valid IP address",
            "10.0.0": "not a valid IP address",
            "fd00::/8:443": "IPv6 with ports goes in brackets",
            "[fd00::/8": "missing ]",
            "[fd00::/8]443": "expected :PORTS",
            "[10.0.0.0/8]:22": "brackets are for IPv6",
            "db.internal:": "not a port",
            "db.internal:ssh": "not a port",
            "db.internal:0": "between 1 and 65535",
            "db.internal:70000": "between 1 and 65535",
            "db.internal:9000-8000": "backwards",
            "db..internal": "not an IP address, a CIDR, a host name pattern",
            "db*.internal": "not an IP address, a CIDR, a host name pattern",
            "bad name": "not an IP address, a CIDR, a host name pattern",
            "internal.*": "must be followed by a domain",
            ":5432": "no target",
            "[::ffff:169.254.169.254]": "IPv4 form",
        }
        for text, problem in cases.items():
            with self.assertRaises(PolicyError, msg=text) as caught:
                parse_rule(text)
            message = str(caught.exception)
            self.assertIn(repr(text.strip()), message)
            self.assertIn(problem, message)
            self.assertNotIn("\n", message)

    def test_list(self) -> None:
        policy = parse_policy(" 10.0.0.0/8:5432, *.internal ,,fd00::/8 ")
        self.assertEqual([r.text for r in policy.rules], ["10.0.0.0/8:5432", "*.internal", "fd00::/8"])
        self.assertEqual(parse_policy(["10.0.0.0/8", "a.internal,b.internal"]).rules[2].text, "b.internal")
        self.assertEqual(parse_policy("").rules, ())
        self.assertEqual(parse_policy([]).rules, ())
        self.assertIn("except link-local/metadata", str(Policy()))

    def test_config_default_is_the_default_policy(self) -> None:
        self.assertEqual(build_config(config_values()).policy, Policy())

    def test_config_parses_the_rules(self) -> None:
        config = build_config(config_values(allow=["127.0.0.1/32:5432,*.internal"]))
        self.assertEqual([r.text for r in config.policy.rules], ["127.0.0.1/32:5432", "*.internal"])

    def test_config_error_is_one_line_naming_the_setting_and_rule(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            build_config(config_values(allow=["10.0.0.0/8,db.internal:99999"]))
        message = str(caught.exception)
        self.assertTrue(message.startswith("--allow / NOVAC_ALLOW: rule 'db.internal:99999'"), message)
        self.assertNotIn("\n", message)

    def test_environment_and_repeated_option(self) -> None:
        env = {"NOVAC_SERVER": "a:1", "NOVAC_TOKEN": "a-long-enough-token", "NOVAC_TLS": "off"}
        options = Options(env=env | {"NOVAC_ALLOW": "10.0.0.0/8:5432,*.internal"})
        options.parseOptions([])
        self.assertEqual(len(options.config.policy.rules), 2)
        options = Options(env=env | {"NOVAC_ALLOW": "ignored.internal"})
        options.parseOptions(["--allow", "10.0.0.0/8", "--allow", "[fd00::/8]:443"])
        self.assertEqual([r.text for r in options.config.policy.rules], ["10.0.0.0/8", "[fd00::/8]:443"])
        with self.assertRaises(SystemExit) as caught:
            Options(env=env | {"NOVAC_ALLOW": "10.0.0.1/8"}).parseOptions([])
        self.assertIn("novac: error: --allow / NOVAC_ALLOW: rule '10.0.0.1/8'", str(caught.exception))


class DecisionTests(SynchronousTestCase):
    """Pure decisions: nothing is resolved or dialled."""

    def check(self, rules: str, cases: Sequence[tuple[str, int, bool]]) -> None:
        policy = parse_policy(rules)
        for host, port, allowed in cases:
            decision = policy.check_name(host, port)
            self.assertEqual(decision.allowed, allowed, f"{rules!r}: {host}:{port} ({decision.why})")

    def test_cidr_and_ports(self) -> None:
        self.check(
            "10.0.0.0/8:5432, 192.168.1.5:8000-8080, 172.16.0.0/12",
            [
                ("10.1.2.3", 5432, True),
                ("10.1.2.3", 5433, False),
                ("11.0.0.1", 5432, False),
                ("192.168.1.5", 8000, True),
                ("192.168.1.5", 8080, True),
                ("192.168.1.5", 7999, False),
                ("192.168.1.5", 8081, False),
                ("192.168.1.6", 8000, False),
                ("172.31.255.255", 1, True),
                ("172.32.0.0", 1, False),
            ],
        )

    def test_host_patterns(self) -> None:
        self.check(
            "*.internal:5432, db.example.com",
            [
                ("db.internal", 5432, True),
                ("a.b.internal", 5432, True),
                ("DB.Internal.", 5432, True),
                ("db.internal", 5433, False),
                ("internal", 5432, False),
                ("dbinternal", 5432, False),
                ("db.internal.evil.com", 5432, False),
                ("db.example.com", 22, True),
                ("x.db.example.com", 22, False),
            ],
        )

    def test_wildcard_and_ports(self) -> None:
        self.check("*:443", [("10.0.0.1", 443, True), ("anything.example", 443, True), ("10.0.0.1", 80, False)])
        self.check("*", [("10.0.0.1", 1, True), ("::1", 22, True), ("web.example", 80, True)])

    def test_ipv6(self) -> None:
        self.check(
            "[fd00::/8]:443, 2001:db8::/32",
            [
                ("fd12::1", 443, True),
                ("fd12::1", 80, False),
                ("2001:db8::5", 22, True),
                ("2001:db9::5", 22, False),
                ("10.0.0.1", 443, False),
            ],
        )

    def test_metadata_and_link_local_denied_by_default(self) -> None:
        for rules in ("", "*", "*:80", "0.0.0.0/0", "::/0", "169.0.0.0/8", "[fd00::/8]", "*.internal"):
            for host in (METADATA, "169.254.1.1", "fe80::1", "fe80::1%eth0", "fd00:ec2::254", "::ffff:169.254.169.254"):
                decision = parse_policy(rules).check_name(host, 80)
                self.assertFalse(decision.allowed, f"{rules!r} allowed {host}")
                self.assertEqual(decision.why, WHY_SENSITIVE)
        self.check("", [("10.0.0.1", 80, True), ("db.internal", 5432, True), ("127.0.0.1", 6379, True)])

    def test_metadata_allowed_by_an_explicit_rule(self) -> None:
        self.check(
            "169.254.169.254/32:80",
            [(METADATA, 80, True), (METADATA, 22, False), ("169.254.169.253", 80, False), ("fd00:ec2::254", 80, False)],
        )
        self.check("169.254.0.0/16", [(METADATA, 80, True), ("169.254.1.1", 22, True), ("fe80::1", 22, False)])
        self.check("[fd00:ec2::254]:80", [("fd00:ec2::254", 80, True), (METADATA, 80, False)])
        self.check("fe80::/10", [("fe80::1", 22, True)])

    def test_names_before_resolving(self) -> None:
        # A name passes the first check when a name rule matches it, or when an
        # address rule covers the port (then its addresses decide).
        self.check("10.0.0.0/8:5432", [("db.corp", 5432, True), ("db.corp", 22, False)])
        policy = parse_policy("*.internal:5432")
        self.assertEqual(policy.check_name("web.example", 443).why, WHY_NO_RULE)

    def test_resolved_addresses(self) -> None:
        policy = parse_policy("*.internal, 10.0.0.0/8:5432")
        cases = [
            ("db.internal", "127.0.0.1", 22, True),  # the name rule
            ("db.internal", METADATA, 80, False),  # a name rule never opens metadata
            ("db.internal", "fe80::1", 80, False),
            ("db.corp", "10.1.1.1", 5432, True),  # the address rule
            ("db.corp", "10.1.1.1", 22, False),
            ("db.corp", "127.0.0.1", 5432, False),
        ]
        for host, address, port, allowed in cases:
            decision = policy.check_address(ip(address), port, host)
            self.assertEqual(decision.allowed, allowed, f"{host} -> {address}:{port}")
        self.assertTrue(is_sensitive(ip("::ffff:169.254.169.254")))
        self.assertFalse(is_sensitive(ip("fd00:ec2::253")))


class FakeResolver:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []
        self.pending: Deferred[Sequence[IPAddress]] | None = None

    def __call__(self, host: str) -> Deferred[Sequence[IPAddress]]:
        self.asked.append(host)
        if host == "slow.internal":
            self.pending = Deferred()
            return self.pending
        return succeed([ip(a) for a in self.answers.get(host, [])])


class FakeConnector:
    """Records the addresses it is asked to dial; dials nothing."""

    def __init__(self, outcomes: dict[str, Exception | None] | None = None) -> None:
        self.outcomes = outcomes or {}
        self.dialled: list[tuple[str, int]] = []
        self.cancelled: list[tuple[str, int]] = []

    def __call__(self, address: IPAddress, port: int, protocol: IProtocol) -> Deferred[IProtocol]:
        self.dialled.append((str(address), port))
        outcome = self.outcomes.get(str(address))
        if outcome == "hang":  # type: ignore[comparison-overlap]
            return Deferred(lambda _: self.cancelled.append((str(address), port)))
        if outcome is not None:
            return fail(outcome)
        return succeed(protocol)


ANSWERS = {
    "db.internal": ["127.0.0.1"],
    "evil.example": [METADATA],
    "evil.internal": [METADATA],
    "mapped.internal": ["::ffff:169.254.169.254"],
    "2852039166": [METADATA],  # what getaddrinfo makes of this IPv4 in decimal
    "multi.internal": [METADATA, "fe80::1", "10.0.0.5", "10.0.0.6", "10.0.0.5"],
    "many.corp": [METADATA, "192.168.0.1", "10.0.0.5", "10.0.0.6"],
    "nowhere.invalid": [],
}


class DialerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        self.resolver = FakeResolver(ANSWERS)
        self.connector = FakeConnector()

    def dial(self, rules: str, host: str, port: int) -> Deferred[IProtocol]:
        dialer = Dialer(parse_policy(rules), self.resolver, self.connector)
        return dialer.connect(host, port, Protocol())

    def denied(self, rules: str, host: str, port: int) -> PolicyDenied:
        failure = self.failureResultOf(self.dial(rules, host, port), PolicyDenied)
        self.assertEqual(classify(failure), OpenFailReason.DENIED)
        assert isinstance(failure.value, PolicyDenied)
        return failure.value

    def test_rebinding_a_name_allowed_by_pattern_to_metadata_is_denied(self) -> None:
        denial = self.denied("*.internal", "evil.internal", 80)
        self.assertEqual(self.connector.dialled, [])
        self.assertEqual(
            str(denial),
            "policy denies evil.internal:80: it resolves to 169.254.169.254"
            " (link-local/metadata addresses need an explicit --allow rule)",
        )
        self.denied("*.internal", "mapped.internal", 80)
        self.denied("", "evil.example", 80)
        self.denied("*", "evil.example", 80)
        self.denied("", "2852039166", 80)
        self.assertEqual(self.connector.dialled, [])

    def test_explicit_rule_lets_a_name_reach_metadata(self) -> None:
        self.successResultOf(self.dial("169.254.169.254/32:80", "evil.example", 80))
        self.assertEqual(self.connector.dialled, [(METADATA, 80)])

    def test_connects_only_to_the_allowed_addresses(self) -> None:
        self.successResultOf(self.dial("*.internal", "multi.internal", 443))
        self.assertEqual(self.connector.dialled, [("10.0.0.5", 443)])
        skipped = [e for e in self.logged if e.get("event") == "addresses_denied"]
        self.assertEqual(len(skipped), 1)
        self.assertEqual(skipped[0]["log_level"], LogLevel.warn)
        self.assertIn("169.254.169.254", skipped[0]["denied"])

    def test_address_rules_filter_what_a_name_resolves_to(self) -> None:
        self.connector.outcomes["10.0.0.5"] = error.ConnectionRefusedError()
        self.successResultOf(self.dial("10.0.0.0/8:5432", "many.corp", 5432))
        self.assertEqual(self.connector.dialled, [("10.0.0.5", 5432), ("10.0.0.6", 5432)])

    def test_all_allowed_addresses_failing_reports_the_last_error(self) -> None:
        self.connector.outcomes["10.0.0.5"] = error.TimeoutError()
        self.connector.outcomes["10.0.0.6"] = error.ConnectionRefusedError()
        failure = self.failureResultOf(self.dial("10.0.0.0/8", "many.corp", 5432))
        self.assertEqual(classify(failure), OpenFailReason.REFUSED)

    def test_name_denied_before_resolving(self) -> None:
        denial = self.denied("*.internal:5432", "web.example", 443)
        self.assertEqual(str(denial), "policy denies web.example:443 (no --allow rule matches)")
        self.assertEqual(self.resolver.asked, [])
        self.assertEqual(self.connector.dialled, [])

    def test_name_resolving_outside_the_address_rules_is_denied(self) -> None:
        denial = self.denied("10.0.0.0/8", "db.internal", 5432)
        self.assertEqual(denial.why, WHY_NO_RULE)
        self.assertEqual(self.resolver.asked, ["db.internal"])
        self.assertEqual(self.connector.dialled, [])

    def test_ip_literals_skip_dns(self) -> None:
        self.successResultOf(self.dial("127.0.0.0/8", "127.0.0.1", 22))
        self.assertEqual(str(self.denied("", METADATA, 80)), f"policy denies {METADATA}:80 ({WHY_SENSITIVE})")
        self.denied("", "::ffff:169.254.169.254", 80)
        self.assertEqual(str(self.denied("*", "fe80::1", 22)), f"policy denies [fe80::1]:22 ({WHY_SENSITIVE})")
        self.assertEqual(self.resolver.asked, [])
        self.assertEqual(self.connector.dialled, [("127.0.0.1", 22)])

    def test_allowed_name(self) -> None:
        self.successResultOf(self.dial("db.internal:5432", "db.internal", 5432))
        self.assertEqual(self.connector.dialled, [("127.0.0.1", 5432)])

    def test_dns_failure(self) -> None:
        failure = self.failureResultOf(self.dial("", "nowhere.invalid", 80), error.DNSLookupError)
        self.assertEqual(classify(failure), OpenFailReason.DNS_FAILURE)

    def test_cancel_while_resolving(self) -> None:
        d = self.dial("*.internal", "slow.internal", 80)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.connector.dialled, [])

    def test_cancel_while_connecting_tries_nothing_else(self) -> None:
        self.connector.outcomes["10.0.0.5"] = "hang"  # type: ignore[assignment]
        d = self.dial("10.0.0.0/8", "many.corp", 80)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.connector.cancelled, [("10.0.0.5", 80)])
        self.assertEqual(self.connector.dialled, [("10.0.0.5", 80)])


class ReactorPlumbingTests(SynchronousTestCase):
    """The default resolver and connector, against fakes: no packets."""

    def test_reactor_resolver_collects_addresses(self) -> None:
        def getaddrinfo(host: str, port: int, family: int, kind: int) -> list[tuple[Any, Any, Any, Any, Any]]:
            assert (host, kind) == ("localhost", socket.SOCK_STREAM)
            return [
                (socket.AF_INET, kind, 6, "", ("127.0.0.1", 0)),
                (socket.AF_INET6, kind, 6, "", ("::1", 0, 0, 0)),
            ]

        resolve = reactor_resolver(None, getaddrinfo, maybeDeferred)
        result = self.successResultOf(resolve("localhost"))
        self.assertEqual(list(result), [ip("127.0.0.1"), ip("::1")])

    def test_reactor_resolver_no_such_name_is_no_address(self) -> None:
        def getaddrinfo(*args: Any) -> list[tuple[Any, Any, Any, Any, Any]]:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

        resolve = reactor_resolver(None, getaddrinfo, maybeDeferred)
        self.assertEqual(list(self.successResultOf(resolve("x.invalid"))), [])  # type: ignore[arg-type]

    def test_reactor_resolver_fails_on_any_other_error(self) -> None:
        """
        Issue 14 defect 6: Twisted's resolver dropped the UnicodeError IDNA
        raises and never finished; here the Deferred fails, so the OPEN is answered.
        """
        resolve = reactor_resolver(None, socket.getaddrinfo, maybeDeferred)
        failure = self.failureResultOf(resolve("a" * 64 + ".example"))
        self.assertIsInstance(failure.value, UnicodeError)

        def broken(*args: Any) -> list[tuple[Any, Any, Any, Any, Any]]:
            raise RuntimeError("resolver bug")

        self.failureResultOf(reactor_resolver(None, broken, maybeDeferred)("db.internal"), RuntimeError)

    def test_tcp_connector_dials_the_concrete_address_with_the_timeout(self) -> None:
        reactor = MemoryReactorClock()
        connect = tcp_connector(reactor, 7.5)
        connect(ip("127.0.0.1"), 5432, Protocol())
        connect(ip("::1"), 22, Protocol())
        self.assertEqual([(c[0], c[1], c[3]) for c in reactor.tcpClients], [("127.0.0.1", 5432, 7.5), ("::1", 22, 7.5)])

    def test_novac_service_wires_the_policy(self) -> None:
        reactor = MemoryReactorClock()
        config = build_config(
            {
                **config_values(allow=["127.0.0.1/32:5432"]),
                "connect-timeout": "3",
            }
        )
        service = NovacService(config, reactor)
        self.assertIs(service.context.policy, config.policy)
        self.failureResultOf(service.context.connect_target(METADATA, 80, Protocol()), PolicyDenied)
        self.failureResultOf(service.context.connect_target("127.0.0.1", 6379, Protocol()), PolicyDenied)
        self.assertEqual(reactor.tcpClients, [])
        service.context.connect_target("127.0.0.1", 5432, Protocol())
        self.assertEqual([(c[0], c[1], c[3]) for c in reactor.tcpClients], [("127.0.0.1", 5432, 3.0)])


class TunnelPolicyTests(SynchronousTestCase):
    """OPEN_FAIL DENIED end to end over the in-memory TLS tunnel."""

    def setUp(self) -> None:
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def open_denied(self, h: Harness, host: str, port: int) -> OpenFailed:
        failure, *_ = h.open(host, port)
        self.assertIsInstance(failure, Failure)
        failure.trap(OpenFailed)
        self.assertEqual(failure.value.reason, OpenFailReason.DENIED)
        return failure.value  # type: ignore[no-any-return]

    def denials(self) -> list[Any]:
        return [e for e in self.logged if e.get("event") == "stream_denied"]

    def test_denied_target_never_reaches_connect_target(self) -> None:
        h = Harness()
        audited: list[tuple[str, PolicyDenied]] = []
        h.agent_context.policy = parse_policy("127.0.0.1/32:5432")
        h.agent_context.on_denied = lambda server, denial: audited.append((server, denial))
        refused = self.open_denied(h, METADATA, 80)
        self.assertIn(f"policy denies {METADATA}:80 ({WHY_SENSITIVE})", str(refused))
        refused = self.open_denied(h, "127.0.0.1", 6379)
        self.assertIn("no --allow rule matches", str(refused))
        self.assertEqual(h.targets, [])
        [first, second] = self.denials()
        self.assertEqual(first["log_level"], LogLevel.warn)
        self.assertEqual(
            (first["target"], first["server"], first["reason"]), (f"{METADATA}:80", "novas.test:9022", WHY_SENSITIVE)
        )
        self.assertEqual(second["target"], "127.0.0.1:6379")
        self.assertEqual(
            [(s, d.target) for s, d in audited],
            [("novas.test:9022", f"{METADATA}:80"), ("novas.test:9022", "127.0.0.1:6379")],
        )
        # The allowed target still works on the same tunnel.
        stream, *_ = h.open("127.0.0.1", 5432)
        self.assertNotIsInstance(stream, Failure)
        self.assertEqual(h.targets[-1][:2], ("127.0.0.1", 5432))

    def test_default_policy_denies_metadata_and_link_local(self) -> None:
        h = Harness()
        self.open_denied(h, METADATA, 80)
        self.open_denied(h, "fe80::1", 22)
        self.open_denied(h, "fd00:ec2::254", 80)
        self.assertEqual(h.targets, [])
        stream, *_ = h.open("db.internal", 5432)
        self.assertNotIsInstance(stream, Failure)

    def test_names_resolving_to_denied_addresses_through_the_dialer(self) -> None:
        h = Harness()
        resolver = FakeResolver(ANSWERS)

        def connect(address: IPAddress, port: int, protocol: IProtocol) -> Deferred[IProtocol]:
            return h._connect_target(str(address), port, protocol)

        policy = parse_policy("*.internal")
        h.agent_context.policy = policy
        h.agent_context.connect_target = Dialer(policy, resolver, connect).connect
        refused = self.open_denied(h, "evil.internal", 80)
        self.assertIn("resolves to 169.254.169.254", str(refused))
        self.assertEqual(h.targets, [])
        self.assertEqual(self.denials()[0]["addresses"], [METADATA])
        stream, *_ = h.open("db.internal", 5432)
        self.assertNotIsInstance(stream, Failure)
        self.assertEqual([t[:2] for t in h.targets], [("127.0.0.1", 5432)])

    def test_a_failing_audit_hook_does_not_break_the_refusal(self) -> None:
        h = Harness()

        def broken(server: str, denial: PolicyDenied) -> None:
            raise RuntimeError("audit store down")

        h.agent_context.on_denied = broken
        self.open_denied(h, METADATA, 80)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
