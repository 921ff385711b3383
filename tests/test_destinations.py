"""
Issue 14, defects 6, 11 and 12: which destinations NOVAS may ask for and
NOVAC may dial.

- 6: a host name IDNA rejects is refused on both sides, and whatever the
  agent's resolver raises, the OPEN is answered (OPEN_FAIL DNS_FAILURE).
- 11: NAT64 / IPv4-compatible forms of metadata addresses are checked as the
  IPv4 address they carry; other clouds' metadata addresses are denied.
- 12: a NUL, CR or bidi character in a name is refused before any OPEN.

Pure decisions and in-memory tunnels only: nothing here sends a packet.
"""

from __future__ import annotations

import ipaddress
import unicodedata
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IProtocol
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from nova.agent.dialer import Dialer
from nova.config import ConfigError
from nova.rules.destinations import (
    METADATA,
    SENSITIVE,
    WHY_SENSITIVE,
    IPAddress,
    PolicyDenied,
    PolicyError,
    _embedded_readings,
    is_sensitive,
    parse_policy,
    parse_rule,
    unwrap,
)
from nova.rules.routes import Selector, parse_route
from nova.server.endpoint import InvalidHostName, TunnelEndpoint
from nova.server.tunnel import OpenFailed
from nova.wire.errors import OpenFailReason
from nova.wire.hostname import MAX_LABEL, MAX_NAME, check_host, host_problem

from .test_endpoint import FakeTunnel, registry
from .test_tunnel import Harness

LONG_LABEL = "a" * 64 + ".example"
BAD_NAMES = {
    "long-label": LONG_LABEL,
    "empty-label": "db..internal",
    "leading-dot": ".internal",
    "only-dots": "..",
    "too-long": ".".join(["a" * 63] * 4),  # 255 octets
    "nul": "127.0.0.1\x00.evil.example",
    "cr-lf": "db.internal\r\nFAKE: line",
    "tab": "db\t.internal",
    "space": "db internal",
    "bidi": "db.\u202elanretni",
    "zero-width": "d\u200bb.internal",
    "soft-hyphen": "d\u00adb.internal",
    "del": "db\x7f.internal",
    "bad-punycode": "xn--\u00e9.example",
}
GOOD_NAMES = [
    "db.internal",
    "db.internal.",
    "localhost",
    "a" * 63 + ".example",
    ".".join(["a" * 63] * 3 + ["a" * 61]),  # 253 octets
    "bücher.example",
    "_srv.db-1.internal",
    "127.0.0.1",
    "::1",
    "[fd00::1]",
    "fe80::1%eth0",
]


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def _idna_ok(name: str) -> bool:
    try:
        name.encode("idna")
    except UnicodeError:
        return False
    return True


class HostNameTests(SynchronousTestCase):
    def test_bad_names_are_refused_with_the_rule_they_break(self) -> None:
        for case, name in BAD_NAMES.items():
            problem = host_problem(name)
            self.assertIsNotNone(problem, case)
            assert problem is not None
            self.assertNotIn(name, problem, "the reason never repeats the peer's text")
            with self.assertRaises(InvalidHostName):
                check_host(name)

    def test_good_names_and_literals_pass(self) -> None:
        for name in GOOD_NAMES:
            self.assertIsNone(host_problem(name), name)

    def test_reasons(self) -> None:
        self.assertIn("label 1", host_problem(LONG_LABEL) or "")
        self.assertIn("label 2 of the host name is empty", host_problem("db..internal") or "")
        self.assertIn("control", host_problem(BAD_NAMES["nul"]) or "")
        self.assertIn("more than 253", host_problem(BAD_NAMES["too-long"]) or "")
        self.assertEqual(host_problem(""), "the host name is empty")
        self.assertIn("longer than 1024", host_problem("a" * 5000) or "")

    @given(st.text(max_size=300))
    @example("a\u3002" * 2)
    @example("[1.2.3.4]")
    @example("\u2024")  # ONE DOT LEADER: IDNA makes it "." (an empty name), found by this property
    @example("db\u2024internal")
    def test_accepted_text_is_a_name_a_resolver_takes(self, text: str) -> None:
        """Whatever the text, the check answers; what it accepts, IDNA encodes within the DNS's limits."""
        if host_problem(text) is not None:
            return
        self.assertFalse(any(ch.isspace() or unicodedata.category(ch).startswith(("C", "Z")) for ch in text))
        bare = text[1:-1] if text.startswith("[") else text
        try:
            ipaddress.ip_address(bare)
            return
        except ValueError:
            pass
        encoded = text.encode("idna")  # does not raise
        labels = encoded.rstrip(b".").split(b".")
        self.assertTrue(all(1 <= len(label) <= MAX_LABEL for label in labels))
        self.assertLessEqual(len(encoded.rstrip(b".")), MAX_NAME)

    @given(st.text(max_size=300))
    def test_names_idna_rejects_are_refused(self, text: str) -> None:
        if not _idna_ok(text):
            self.assertIsNotNone(host_problem(text))

    @given(
        st.lists(st.from_regex(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?", fullmatch=True), min_size=1, max_size=4),
        st.booleans(),
    )
    def test_ordinary_dns_names_pass(self, labels: list[str], trailing_dot: bool) -> None:
        name = ".".join(labels) + ("." if trailing_dot else "")
        if len(name.rstrip(".")) <= MAX_NAME:
            self.assertIsNone(host_problem(name))

    @given(st.text(max_size=40), st.sampled_from(["\x00", "\r", "\n", "\x1b", "\u202e", "\u2066", "\u200d", "\x85"]))
    def test_any_control_or_bidi_character_is_refused(self, text: str, bad: str) -> None:
        self.assertIsNotNone(host_problem(text + bad + "x.example"))


class EmbeddedIPv4Tests(SynchronousTestCase):
    """Defect 11: IPv6 forms of a metadata address are that address to the policy."""

    FORMS = [
        "64:ff9b::a9fe:a9fe",
        "64:ff9b::169.254.169.254",
        "64:ff9b:1::a9fe:a9fe",
        "64:ff9b:1:a9fe:a9:fe00::",  # RFC 6052 with a /48 local-use prefix
        "64:ff9b:1:a9:fe:a9fe::",  # ... a /56
        "64:ff9b:1:0:a9:fea9:fe00:0",  # ... a /64
        "::a9fe:a9fe",
        "::169.254.169.254",
        "::ffff:169.254.169.254",
        "64:ff9b::6464:64c8",  # 100.100.100.200
        "::ffff:100.100.100.200",
        "64:ff9b::a9fe:1",  # link-local 169.254.0.1
    ]

    def test_unwrap(self) -> None:
        self.assertEqual(unwrap(ip("64:ff9b::a9fe:a9fe")), ip("169.254.169.254"))
        self.assertEqual(unwrap(ip("64:ff9b:1::a00:5")), ip("10.0.0.5"))
        self.assertEqual(unwrap(ip("::a9fe:a9fe")), ip("169.254.169.254"))
        self.assertEqual(unwrap(ip("::ffff:10.0.0.5")), ip("10.0.0.5"))
        for same in ("::", "::1", "2001:db8::a9fe:a9fe", "64:ff9c::a9fe:a9fe", "10.0.0.5"):
            self.assertEqual(unwrap(ip(same)), ip(same))

    def test_forms_are_sensitive(self) -> None:
        for form in self.FORMS:
            self.assertTrue(is_sensitive(ip(form)), form)
        for fine in ("64:ff9b::808:808", "::1", "::", "2001:db8::1", "10.0.0.5"):
            self.assertFalse(is_sensitive(ip(fine)), fine)

    def test_default_policy_and_star_deny_every_form(self) -> None:
        for rules in ("", "*", "*:80", "0.0.0.0/0", "[::/0]:80"):
            policy = parse_policy(rules)
            for form in self.FORMS:
                self.assertFalse(policy.check_name(form, 80).allowed, (rules, form))
                self.assertFalse(policy.check_name(f"[{form}]", 80).allowed, (rules, form))
                self.assertFalse(policy.check_address(ip(form), 80, "x.example").allowed, (rules, form))
                self.assertEqual(policy.check_address(ip(form), 80).why, WHY_SENSITIVE)

    def test_allow_rules_match_the_embedded_address(self) -> None:
        policy = parse_policy("10.0.0.0/8:5432")
        self.assertTrue(policy.check_address(ip("64:ff9b::a00:5"), 5432).allowed)
        self.assertTrue(policy.check_address(ip("::a00:5"), 5432).allowed)
        self.assertFalse(policy.check_address(ip("64:ff9b::c0a8:1"), 5432).allowed)  # 192.168.0.1
        # NAT64 of a public address is allowed by default, as the address itself is.
        self.assertTrue(parse_policy("").check_address(ip("64:ff9b::808:808"), 443).allowed)

    def test_an_explicit_rule_still_reaches_metadata_in_any_form(self) -> None:
        policy = parse_policy("169.254.169.254/32:80")
        self.assertTrue(policy.check_address(ip("64:ff9b::a9fe:a9fe"), 80).allowed)
        self.assertFalse(policy.check_address(ip("64:ff9b::6464:64c8"), 80).allowed)

    def test_rules_written_in_an_embedding_form_are_refused(self) -> None:
        for rule in ("64:ff9b::/96", "[64:ff9b::a00:0/104]:80", "64:ff9b:1::/48", "::/96", "::a00:5"):
            with self.assertRaises(PolicyError) as raised:
                parse_rule(rule)
            self.assertIn("write the IPv4 form", str(raised.exception))
        for rule in ("::1", "::/127", "::/0", "64:ff9b::/32", "fd00::/8"):
            parse_rule(rule)

    def test_default_deny_set(self) -> None:
        expected = {
            "169.254.169.254",
            "100.100.100.200",
            "168.63.129.16",
            "192.0.0.192",
            "fd00:ec2::254",
            "fd00:ec2::23",
            "fd20:ce::254",
            "fd00:c1::a9fe:a9fe",
            "fd00:42::42",
        }
        self.assertEqual({str(n.network_address) for n in METADATA}, expected)
        policy = parse_policy("*")
        for address in expected | {"169.254.170.2", "169.254.170.23", "169.254.42.42", "fe80::1"}:
            self.assertFalse(policy.check_address(ip(address), 80).allowed, address)
            self.assertFalse(parse_policy("").check_name(address, 80).allowed, address)
        self.assertTrue(parse_policy("100.100.100.200/32").check_address(ip("100.100.100.200"), 80).allowed)
        self.assertFalse(parse_policy("100.64.0.0/10").check_address(ip("100.100.100.200"), 80).allowed)

    @given(
        st.one_of(
            st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
            st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
            # Inside a sensitive range or just past its end.
            st.sampled_from(SENSITIVE).flatmap(
                lambda n: st.integers(0, n.num_addresses).map(
                    lambda offset: ipaddress.ip_address(
                        (int(n.network_address) + offset) % (2**32 if n.version == 4 else 2**128)
                    )
                )
            ),
            # Embedding forms of addresses near the metadata ones.
            st.integers(0xA9FE0000, 0xA9FFFFFF).map(lambda v: ipaddress.IPv6Address((0x0064FF9B0001 << 80) | v)),
        )
    )
    @example(ipaddress.IPv4Address("169.255.0.0"))
    @example(ipaddress.IPv6Address("fec0::"))
    def test_sensitive_is_membership_of_a_range(self, address: IPAddress) -> None:
        """The precomputed masks decide as C{address in network} over every reading of the address."""
        expected = any(a in n for a in _embedded_readings(address) for n in SENSITIVE)
        self.assertEqual(is_sensitive(address), expected, str(address))

    @given(st.integers(0, 2**32 - 1))
    def test_every_embedding_is_as_sensitive_as_its_ipv4_address(self, value: int) -> None:
        v4 = ipaddress.IPv4Address(value)
        for prefix in (0x0064FF9B << 96, (0x0064FF9B0001 << 80), 0xFFFF << 32):
            form = ipaddress.IPv6Address(prefix | value)
            self.assertEqual(unwrap(form), v4)
            if is_sensitive(v4):
                self.assertTrue(is_sensitive(form), str(form))
        if value > 1:
            self.assertEqual(unwrap(ipaddress.IPv6Address(value)), v4)


class _Resolver:
    def __init__(self, answers: dict[str, list[str]], error: Exception | None = None) -> None:
        self.answers = answers
        self.error = error
        self.asked: list[str] = []

    def __call__(self, host: str) -> Deferred[Any]:
        self.asked.append(host)
        if self.error is not None:
            return fail(self.error)
        return succeed([ip(a) for a in self.answers.get(host, [])])


class DialerTests(SynchronousTestCase):
    def dial(self, host: str, resolver: _Resolver, rules: str = "") -> tuple[Failure | None, list[str]]:
        dialled: list[str] = []

        def connect(address: IPAddress, port: int, protocol: IProtocol) -> Deferred[IProtocol]:
            dialled.append(str(address))
            return succeed(protocol)

        d = Dialer(parse_policy(rules), resolver, connect).connect(host, 80, IProtocol)  # type: ignore[arg-type]
        failures: list[Failure] = []
        d.addErrback(failures.append)
        return (failures[0] if failures else None), dialled

    def test_names_resolving_to_nat64_metadata_are_denied(self) -> None:
        resolver = _Resolver(
            {
                "nat64.example": ["64:ff9b::a9fe:a9fe"],
                "compat.example": ["::a9fe:a9fe"],
                "alibaba.example": ["64:ff9b::6464:64c8"],
            }
        )
        for name in ("nat64.example", "compat.example", "alibaba.example"):
            for rules in ("", "*", "*.example"):
                failure, dialled = self.dial(name, resolver, rules)
                assert failure is not None
                failure.trap(PolicyDenied)
                self.assertEqual(dialled, [])

    def test_a_nat64_address_is_dialled_as_is(self) -> None:
        failure, dialled = self.dial("public.example", _Resolver({"public.example": ["64:ff9b::808:808"]}))
        self.assertIsNone(failure)
        self.assertEqual(dialled, ["64:ff9b::808:808"])

    def test_bad_names_never_reach_the_resolver(self) -> None:
        resolver = _Resolver({})
        for name in BAD_NAMES.values():
            failure, dialled = self.dial(name, resolver)
            assert failure is not None
            failure.trap(DNSLookupError)
            self.assertEqual(dialled, [])
            self.assertIn("invalid host name", failure.getErrorMessage())
        self.assertEqual(resolver.asked, [])

    def test_any_resolver_error_is_a_dns_failure(self) -> None:
        for error in (UnicodeError("label empty or too long"), RuntimeError("bug"), ValueError("x")):
            failure, dialled = self.dial("db.internal", _Resolver({}, error))
            assert failure is not None
            failure.trap(DNSLookupError)
            self.assertIn(type(error).__name__, failure.getErrorMessage())
            self.assertEqual(dialled, [])

        def raises_at_once(host: str) -> Deferred[Any]:
            raise UnicodeError("label empty or too long")

        failure, _ = self.dial("db.internal", raises_at_once)  # type: ignore[arg-type]
        assert failure is not None
        failure.trap(DNSLookupError)


class AgentOpenTests(SynchronousTestCase):
    """NOVAC answers every OPEN: a bad name or a failing resolver is OPEN_FAIL DNS_FAILURE, never silence."""

    def setUp(self) -> None:
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def refused(self, h: Harness, host: str) -> OpenFailed:
        result, *_ = h.open(host, 80)
        self.assertIsInstance(result, Failure, host)
        result.trap(OpenFailed)
        return result.value  # type: ignore[no-any-return]

    def test_bad_names_get_open_fail(self) -> None:
        h = Harness()
        for case, name in BAD_NAMES.items():
            refusal = self.refused(h, name)
            self.assertEqual(refusal.reason, OpenFailReason.DNS_FAILURE, case)
        self.assertEqual(h.targets, [])
        lines = [formatEvent(e) for e in self.logged if e.get("event") == "bad_host_name"]
        self.assertEqual(len(lines), len(BAD_NAMES))
        text = "\n".join(lines)
        self.assertIn("127.0.0.1\\x00.evil.example:80", text)
        self.assertIn("db.internal\\r\\nFAKE: line:80", text)
        self.assertNotIn("\x00", text)
        self.assertNotIn("\r", text)
        self.assertNotIn("\u202e", text)
        # The tunnel still carries good streams, and holds none of the refused ones.
        stream, *_ = h.open("db.internal", 5432)
        self.assertNotIsInstance(stream, Failure)
        self.assertEqual(h.agent.pending_streams(), 0)

    def test_a_resolver_that_raises_gets_open_fail(self) -> None:
        h = Harness()

        def connect(address: IPAddress, port: int, protocol: IProtocol) -> Deferred[IProtocol]:
            return h._connect_target(str(address), port, protocol)

        h.agent_context.connect_target = Dialer(
            parse_policy(""), _Resolver({}, UnicodeError("label empty or too long")), connect
        ).connect
        refusal = self.refused(h, "db.internal")
        self.assertEqual(refusal.reason, OpenFailReason.DNS_FAILURE)
        lines = [formatEvent(e) for e in self.logged if "cannot connect to" in formatEvent(e)]
        self.assertEqual(len(lines), 1)
        self.assertIn("DNS_FAILURE", lines[0])
        self.assertEqual(h.agent.pending_streams(), 0)

    def test_a_connector_that_raises_gets_open_fail(self) -> None:
        h = Harness()

        def broken(host: str, port: int, protocol: IProtocol) -> Deferred[IProtocol]:
            raise RuntimeError("connector bug")

        h.agent_context.connect_target = broken
        self.assertEqual(self.refused(h, "db.internal").reason, OpenFailReason.OTHER)
        self.assertEqual(h.agent.pending_streams(), 0)


class ServerSideTests(SynchronousTestCase):
    """NOVAS refuses bad names before any OPEN: routes at start, TunnelEndpoint at once."""

    def test_a_route_to_a_bad_host_is_a_config_error(self) -> None:
        for name in (LONG_LABEL, "db..internal", "db\x00.internal", "db\u202e.internal"):
            with self.assertRaises(ConfigError) as raised:
                parse_route(f"8080:{name}:80")
            message = str(raised.exception)
            self.assertIn("cannot be a destination", message)
            self.assertNotIn("\x00", message)
            self.assertNotIn("\u202e", message)
            self.assertEqual(len(message.splitlines()), 1)
        self.assertEqual(parse_route("8080:db.internal:80").host, "db.internal")

    def test_tunnel_endpoint_refuses_a_bad_host(self) -> None:
        tunnel = FakeTunnel("agent")
        from twisted.internet.task import Clock

        for name in BAD_NAMES.values():
            with self.assertRaises(InvalidHostName) as raised:
                TunnelEndpoint(registry(tunnel), Selector(), name, 80, Clock())
            self.assertIn("TunnelEndpoint: cannot connect to", str(raised.exception))
            self.assertNotIn("\x00", str(raised.exception))
        self.assertEqual(tunnel.opens, [])
        TunnelEndpoint(registry(tunnel), Selector(), "db.internal", 80, Clock())
