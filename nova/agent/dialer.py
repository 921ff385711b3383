"""
The agent's dialer: connects to a target the way the destination policy
(L{nova.rules.destinations}) allows.  The name is checked, resolved once, every
address checked, and only the allowed addresses are dialled, so a DNS
answer cannot change between the check and the connection (no DNS
rebinding).  This is the Twisted adapter over the pure rule language: it
resolves in the reactor's thread pool and connects with TCP endpoints.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from nova.rules.destinations import (
    WHY_NO_RULE,
    WHY_SENSITIVE,
    Decision,
    IPAddress,
    Policy,
    PolicyDenied,
    join_host_port,
    normalize,
    parse_ip,
)
from nova.wire.hostname import host_problem

# resolve(host) -> Deferred firing with the host's addresses (empty: no such name).
Resolver = Callable[[str], "Deferred[Sequence[IPAddress]]"]
# connect(address, port, protocol) -> Deferred firing with the protocol once connected.
AddressConnector = Callable[[IPAddress, int, IProtocol], "Deferred[IProtocol]"]

log = Logger()


class Dialer:
    """
    Connects to C{host:port} as the policy allows: the name is checked,
    resolved once, every address checked, and only the allowed addresses
    are dialled, in order, until one connects.  Fails with L{PolicyDenied},
    L{DNSLookupError}, or the last address's connection error.
    """

    def __init__(self, policy: Policy, resolve: Resolver, connect: AddressConnector) -> None:
        self.policy = policy
        self.resolve = resolve
        self.connect_address = connect

    def connect(self, host: str, port: int, protocol: IProtocol) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._dial(host, port, protocol))

    async def _dial(self, host: str, port: int, protocol: IProtocol) -> IProtocol:
        problem = host_problem(host)
        if problem is not None:
            raise DNSLookupError(f"invalid host name: {problem}")
        decision = self.policy.check_name(host, port)
        if not decision.allowed:
            raise PolicyDenied(host, port, decision.why)
        literal = parse_ip(host)
        if literal is not None:
            addresses: list[IPAddress] = [literal]
        else:
            addresses = _unique(normalize(a) for a in await self._resolve(host))
            if not addresses:
                raise DNSLookupError(host)
        allowed: list[IPAddress] = []
        denied: list[tuple[IPAddress, Decision]] = []
        for address in addresses:
            d = self.policy.check_address(address, port, None if literal is not None else host)
            if d.allowed:
                allowed.append(address)
            else:
                denied.append((address, d))
        if not allowed:
            reasons = {d.why for _, d in denied}
            why = WHY_SENSITIVE if WHY_SENSITIVE in reasons else WHY_NO_RULE
            raise PolicyDenied(host, port, why, addresses)
        if denied:
            log.warn(
                "policy skips {denied} of {target}: {why}; trying {allowed}",
                event="addresses_denied",
                target=join_host_port(host, port),
                denied=", ".join(str(a) for a, _ in denied),
                allowed=", ".join(str(a) for a in allowed),
                why="; ".join(sorted({d.why for _, d in denied})),
            )
        last: BaseException | None = None
        for address in allowed:
            try:
                return await self.connect_address(address, port, protocol)
            except CancelledError:
                raise  # the stream is no longer wanted: try nothing else
            except Exception as e:
                last = e
        assert last is not None
        raise last

    async def _resolve(self, host: str) -> Sequence[IPAddress]:
        """
        The resolver's answer; whatever else it raises (a UnicodeError from
        IDNA, a bug) becomes a L{DNSLookupError}, so the OPEN is answered.
        """
        try:
            return await self.resolve(host)
        except (CancelledError, DNSLookupError):
            raise
        except Exception as e:
            raise DNSLookupError(f"the resolver failed ({type(e).__name__})") from e


def _unique(addresses: Iterable[IPAddress]) -> list[IPAddress]:
    seen: set[IPAddress] = set()
    out: list[IPAddress] = []
    for a in addresses:
        if a not in seen:
            seen.add(a)
            out.append(a)
    return out


# getaddrinfo(host, port, family, type) -> [(family, type, proto, canonname, sockaddr)]
GetAddrInfo = Callable[..., list[tuple[Any, Any, Any, Any, Any]]]
# in_thread(f, *args) -> Deferred firing with f(*args) run off the reactor thread.
InThread = Callable[..., "Deferred[Any]"]


def _lookup(getaddrinfo: GetAddrInfo, host: str) -> list[IPAddress]:
    """The TCP addresses of C{host} (none if the name does not resolve); any other error propagates."""
    try:
        answers = getaddrinfo(host, 0, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in answers:
        try:
            addresses.append(ipaddress.ip_address(sockaddr[0]))
        except (ValueError, TypeError, IndexError):
            pass
    return addresses


def reactor_resolver(
    reactor: Any, getaddrinfo: GetAddrInfo = socket.getaddrinfo, in_thread: InThread | None = None
) -> Resolver:
    """
    Resolves with getaddrinfo in the reactor's thread pool, TCP addresses of
    both families.  Not through C{reactor.nameResolver}: Twisted's resolver
    drops any exception but C{gaierror} (the UnicodeError IDNA raises for a
    63+ octet label, say), its receiver never hears the end, and the OPEN
    waited for NOVAS's timeout.  Here every exception fails the Deferred.
    """
    if in_thread is None:

        def in_thread(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    run = in_thread

    def resolve(host: str) -> Deferred[Sequence[IPAddress]]:
        try:
            d: Deferred[Sequence[IPAddress]] = run(_lookup, getaddrinfo, host)
        except Exception:
            return fail()
        return d

    return resolve


class _OneShot(Factory):
    """Hands out one given protocol, quietly."""

    noisy = False

    def __init__(self, protocol: IProtocol) -> None:
        self.protocol_ = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self.protocol_


def tcp_connector(reactor: Any, timeout: float) -> AddressConnector:
    """Connects to one concrete address, with C{timeout} seconds for the attempt."""

    def connect(address: IPAddress, port: int, protocol: IProtocol) -> Deferred[IProtocol]:
        endpoint_type = TCP4ClientEndpoint if address.version == 4 else TCP6ClientEndpoint
        endpoint = endpoint_type(reactor, str(address), port, timeout=timeout)
        d: Deferred[IProtocol] = endpoint.connect(_OneShot(protocol))
        return d

    return connect
