"""
The agent's destination policy (C{--allow} / C{NOVAC_ALLOW}): which targets
this agent may dial for NOVAS.  See docs/policy.md.

A policy is a list of rules, each C{TARGET[:PORTS]}:

    10.0.0.0/8:5432, 192.168.1.5, [fd00::/8]:443, fd00::/8,
    db.internal:5432, *.internal:8000-8080, *:443, *

Link-local and cloud metadata addresses (169.254.0.0/16, fe80::/10, and
the metadata addresses of L{METADATA}) are denied unless a CIDR rule that
lies inside those ranges allows them, even with no rules at all and even
with C{*}.  An IPv6 address that embeds an IPv4 one (IPv4-mapped, NAT64,
IPv4-compatible) is checked as that IPv4 address, so 64:ff9b::a9fe:a9fe is
169.254.169.254 to the policy.

Names are checked twice: L{Policy.check_name} before resolving (can any rule
allow this name and port?), then L{Policy.check_address} for every address
the name resolved to.  L{nova.agent.dialer.Dialer} resolves once, keeps only
the addresses the policy allows and connects to those very addresses, so a
DNS answer cannot change between the check and the connection (no DNS
rebinding).

This module is the rule language only (parse, match): pure, no Twisted, no
I/O.  The Twisted side, resolving and dialling, is L{nova.agent.dialer}.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from nova.errors import NovaError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LINK_LOCAL: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
)
# Cloud instance-metadata (and like) services: they hand out credentials to
# whoever asks from inside the instance.  Those inside 169.254.0.0/16 are
# denied as link-local anyway (AWS ECS 169.254.170.2, EKS Pod Identity
# 169.254.170.23, Scaleway 169.254.42.42, Tencent 169.254.0.23, ...); these
# are named for the record or because they lie outside it.  docs/policy.md
# lists them.
METADATA: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("169.254.169.254/32"),  # AWS, GCP, Azure, OCI, OpenStack, DigitalOcean, ...
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba Cloud
    ipaddress.ip_network("168.63.129.16/32"),  # Azure WireServer (VM agent, extensions)
    ipaddress.ip_network("192.0.0.192/32"),  # Oracle Cloud (Classic)
    ipaddress.ip_network("fd00:ec2::254/128"),  # AWS IMDS over IPv6
    ipaddress.ip_network("fd00:ec2::23/128"),  # AWS EKS Pod Identity Agent over IPv6
    ipaddress.ip_network("fd20:ce::254/128"),  # Google Cloud over IPv6
    ipaddress.ip_network("fd00:c1::a9fe:a9fe/128"),  # Oracle Cloud over IPv6
    ipaddress.ip_network("fd00:42::42/128"),  # Scaleway over IPv6
)
SENSITIVE: tuple[IPNetwork, ...] = LINK_LOCAL + METADATA
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
# IPv6 ranges whose addresses carry an IPv4 address (RFC 6052, RFC 8215,
# RFC 4291 2.5.5.1): a NAT64 gateway or a dual-stack kernel turns a
# connection to one of them into one to the IPv4 address inside.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NOT_COMPATIBLE = ipaddress.IPv6Network("::/127")  # :: and ::1 are not IPv4 addresses
# RFC 6052 puts the IPv4 address right after a NAT64 prefix of 48, 56 or 64
# bits, skipping bits 64-71, and in the last 32 bits after a /96.  A
# local-use prefix inside 64:ff9b:1::/48 may have any of these lengths and
# which one the network uses is not known here, so every reading is checked
# against the sensitive ranges (the /96 reading is the one rules match).
_RFC6052_PREFIXES = (48, 56, 64)

WHY_SENSITIVE = "link-local/metadata addresses need an explicit --allow rule"
WHY_NO_RULE = "no --allow rule matches"

ALL_PORTS = (0, 65535)


class PolicyError(NovaError, ValueError):
    """A rule that does not parse; the message names the rule, on one line."""


class PolicyDenied(NovaError):
    """The policy forbids this target; carried to NOVAS as OPEN_FAIL DENIED."""

    def __init__(self, host: str, port: int, why: str, addresses: Sequence[IPAddress] = ()) -> None:
        self.host = host
        self.port = port
        self.why = why
        self.addresses = tuple(addresses)
        super().__init__(self.message)

    @property
    def target(self) -> str:
        return join_host_port(self.host, self.port)

    @property
    def message(self) -> str:
        if self.addresses and (len(self.addresses) > 1 or str(self.addresses[0]) != self.host):
            shown = ", ".join(str(a) for a in self.addresses[:4]) + (", ..." if len(self.addresses) > 4 else "")
            return f"policy denies {self.target}: it resolves to {shown} ({self.why})"
        return f"policy denies {self.target} ({self.why})"

    def __str__(self) -> str:
        return self.message


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normalize(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is the IPv4 address it reaches."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _embeds_ipv4(network: ipaddress.IPv6Network | ipaddress.IPv6Address) -> bool:
    net = ipaddress.IPv6Network(network) if isinstance(network, ipaddress.IPv6Address) else network
    if net.subnet_of(_MAPPED) or net.subnet_of(_NAT64) or net.subnet_of(_NAT64_LOCAL):
        return True
    return net.subnet_of(_COMPATIBLE) and not net.subnet_of(_NOT_COMPATIBLE)


def unwrap(address: IPAddress) -> IPAddress:
    """
    The address the policy checks: an IPv6 address that embeds an IPv4 one
    (IPv4-mapped ::ffff:0:0/96, NAT64 64:ff9b::/96, local-use NAT64
    64:ff9b:1::/48, IPv4-compatible ::/96 but for :: and ::1) is that IPv4
    address, taken from its last 32 bits; any other is itself.
    """
    if isinstance(address, ipaddress.IPv6Address) and _embeds_ipv4(address):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def _embedded_readings(address: IPAddress) -> list[IPAddress]:
    """Every address C{address} may stand for: itself, unwrapped, and the RFC 6052 readings of 64:ff9b:1::/48."""
    readings = [address, unwrap(address)]
    if isinstance(address, ipaddress.IPv6Address) and address in _NAT64_LOCAL:
        value = int(address)
        for prefix in _RFC6052_PREFIXES:
            high_bits = 64 - prefix  # of the IPv4 address, before bits 64-71
            low_bits = 32 - high_bits  # after them, from bit 72 on
            high = (value >> (128 - prefix - high_bits)) & ((1 << high_bits) - 1)
            low = (value >> (128 - 72 - low_bits)) & ((1 << low_bits) - 1)
            readings.append(ipaddress.IPv4Address((high << low_bits) | low))
    return readings


@functools.lru_cache(maxsize=256)  # asked per stream, three times for a literal; addresses are immutable
def parse_ip(host: str) -> IPAddress | None:
    """C{host} as an IP address if it is a literal one (brackets allowed), else None."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return normalize(ipaddress.ip_address(text))
    except ValueError:
        return None


# SENSITIVE as (network address, mask) integers per IP version: every stream
# the agent opens checks its target against them (an IP literal three times:
# the name, the dialled address, the dialler's own check), and a mask and a
# compare per range cost a fraction of C{address in network}.
_SENSITIVE_MASKS: dict[int, tuple[tuple[int, int], ...]] = {
    version: tuple((int(n.network_address), int(n.netmask)) for n in SENSITIVE if n.version == version)
    for version in (4, 6)
}


def _in_sensitive_range(address: IPAddress) -> bool:
    value = int(address)
    for network, mask in _SENSITIVE_MASKS[address.version]:
        if value & mask == network:
            return True
    return False


def is_sensitive(address: IPAddress) -> bool:
    """Link-local or a cloud metadata address, itself or by the IPv4 address it embeds."""
    if address.version == 4:
        return _in_sensitive_range(address)  # an IPv4 address embeds no other
    return any(_in_sensitive_range(a) for a in _embedded_readings(address))


def _inside_sensitive(network: IPNetwork) -> bool:
    return any(network.version == s.version and network.subnet_of(s) for s in SENSITIVE)  # type: ignore[arg-type]


_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_NAME_CHARS = "[a-z0-9_-]+"


@dataclass(frozen=True)
class Rule:
    """One C{TARGET[:PORTS]} of the allow list."""

    text: str
    kind: Literal["any", "network", "name"]
    ports: tuple[int, int] = ALL_PORTS
    network: IPNetwork | None = None
    pattern: re.Pattern[str] | None = None

    def __str__(self) -> str:
        return self.text

    @property
    def explicit(self) -> bool:
        """Does this rule name link-local/metadata addresses on purpose (a CIDR inside those ranges)?"""
        return self.network is not None and _inside_sensitive(self.network)

    def covers_port(self, port: int) -> bool:
        return self.ports[0] <= port <= self.ports[1]

    def allows_address(self, address: IPAddress, port: int) -> bool:
        """C{address} as the peer gave it (an embedded IPv4 address is unwrapped here)."""
        if not self.covers_port(port):
            return False
        if self.kind == "any":
            return not is_sensitive(address)
        if self.kind == "network":
            assert self.network is not None
            checked = unwrap(address)
            if checked.version != self.network.version or checked not in self.network:
                return False
            return self.explicit or not is_sensitive(address)
        return False

    def matches_name(self, host: str, port: int) -> bool:
        if self.pattern is None or not self.covers_port(port):
            return False
        return self.pattern.fullmatch(host.lower().rstrip(".")) is not None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    why: str
    rule: Rule | None = None


@dataclass(frozen=True)
class Policy:
    """
    The allow list.  With no rules, everything is allowed except link-local
    and metadata addresses.
    """

    rules: tuple[Rule, ...] = ()

    def __str__(self) -> str:
        if not self.rules:
            return "any target except link-local/metadata addresses"
        return ", ".join(str(r) for r in self.rules)

    def check_name(self, host: str, port: int) -> Decision:
        """
        Before resolving: may C{host:port} be dialled at all?  An IP literal
        is decided here and now; a name passes when a name rule matches it or
        an address rule covers the port (its addresses are checked later, by
        L{check_address}).
        """
        literal = parse_ip(host)
        if literal is not None:
            return self.check_address(literal, port)
        if not self.rules:
            return Decision(True, "no allow list")
        for rule in self.rules:
            if rule.matches_name(host, port):
                return Decision(True, f"allowed by {rule}", rule)
        for rule in self.rules:
            if rule.kind != "name" and rule.covers_port(port):
                return Decision(True, f"addresses to be checked against {rule}", rule)
        return Decision(False, WHY_NO_RULE)

    def check_address(self, address: IPAddress, port: int, host: str | None = None) -> Decision:
        """
        May C{address:port} be dialled, C{host} being the name NOVAS asked
        for (None for an IP literal)?
        """
        sensitive = is_sensitive(address)
        if not self.rules:
            return Decision(False, WHY_SENSITIVE) if sensitive else Decision(True, "no allow list")
        for rule in self.rules:
            if rule.allows_address(address, port):
                return Decision(True, f"allowed by {rule}", rule)
        if host is not None and not sensitive:
            for rule in self.rules:
                if rule.matches_name(host, port):
                    return Decision(True, f"allowed by {rule}", rule)
        return Decision(False, WHY_SENSITIVE if sensitive else WHY_NO_RULE)


def parse_ports(text: str) -> tuple[int, int]:
    """C{5432}, C{8000-8080} or C{*}."""
    text = text.strip()
    if text == "*":
        return ALL_PORTS
    low_text, dash, high_text = text.partition("-")
    try:
        low = int(low_text)
        high = int(high_text) if dash else low
    except ValueError:
        raise PolicyError(f"{text!r} is not a port, a port range LOW-HIGH or *") from None
    if not (1 <= low <= 65535 and 1 <= high <= 65535):
        raise PolicyError(f"ports must be between 1 and 65535, not {text!r}")
    if low > high:
        raise PolicyError(f"port range {text!r} is backwards")
    return low, high


def _name_pattern(target: str) -> re.Pattern[str]:
    name = target.lower().rstrip(".")
    labels = name.split(".")
    if len(name) > 253 or not all(label == "*" or _LABEL.fullmatch(label) for label in labels):
        raise PolicyError(f"{target!r} is not an IP address, a CIDR, a host name pattern or *")
    if labels[-1].isdigit():
        raise PolicyError(f"{target!r} is not a valid IP address or CIDR")
    if labels[-1] == "*":
        raise PolicyError(f"{target!r}: a * must be followed by a domain (like *.internal); use * alone for any")
    # A * label stands for one or more labels.
    parts = [f"{_NAME_CHARS}(?:\\.{_NAME_CHARS})*" if label == "*" else re.escape(label) for label in labels]
    return re.compile("\\.".join(parts))


def parse_rule(text: str) -> Rule:
    """One C{TARGET[:PORTS]}; raises L{PolicyError}."""
    t = text.strip()
    try:
        if t.startswith("["):
            target, sep, rest = t[1:].partition("]")
            if not sep:
                raise PolicyError("missing ]")
            if rest and not rest.startswith(":"):
                raise PolicyError("expected :PORTS after ]")
            ports_text = rest[1:] if rest else "*"
            if ":" not in target:
                raise PolicyError("brackets are for IPv6 addresses only")
        elif t.count(":") >= 2:
            target, ports_text = t, "*"  # a bare IPv6 address or CIDR: no ports
        else:
            target, sep, ports_text = t.partition(":")
            if not sep:
                ports_text = "*"
        target = target.strip()
        if not target:
            raise PolicyError("no target")
        ports = parse_ports(ports_text)
        if target == "*":
            return Rule(t, "any", ports)
        if "/" in target or ":" in target or parse_ip(target) is not None:
            try:
                network = ipaddress.ip_network(target, strict=True)
            except ValueError as e:
                hint = "; IPv6 with ports goes in brackets, like [fd00::/8]:443" if t.count(":") >= 2 else ""
                raise PolicyError(f"{e}{hint}") from None
            if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
                raise PolicyError("write IPv4-mapped addresses in their IPv4 form")
            if isinstance(network, ipaddress.IPv6Network) and _embeds_ipv4(network):
                raise PolicyError(
                    "NAT64 (64:ff9b::/96, 64:ff9b:1::/48) and IPv4-compatible (::/96) addresses"
                    " are checked as the IPv4 address they carry: write the IPv4 form"
                )
            return Rule(t, "network", ports, network=network)
        return Rule(t, "name", ports, pattern=_name_pattern(target))
    except PolicyError as e:
        raise PolicyError(f"rule {t!r}: {e}") from None


def parse_policy(rules: str | Iterable[str]) -> Policy:
    """
    Comma-separated rules (or several such strings, one per C{--allow});
    empty means the default policy.
    """
    texts = [rules] if isinstance(rules, str) else list(rules)
    parsed = [parse_rule(part) for text in texts for part in text.split(",") if part.strip()]
    return Policy(tuple(parsed))
