"""
A Twisted client endpoint that connects through a tunnel.

    endpoint = TunnelEndpoint(registry, parse_selector("env=prod"), "db.internal", 5432, reactor)
    protocol = await endpoint.connect(factory)

Routes and the SOCKS5 entry are built on it, so every way into a tunnel
shares one code path: agent choice, failover and error reporting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from nova.errors import OpenError, Why, open_failure
from nova.rules.routes import Selector
from nova.transport.stream import StreamTransport
from nova.wire.hostname import InvalidHostName, host_problem
from nova.wire.text import untrusted

from .early import EarlyData
from .registry import Registered, Registry

DEFAULT_OPEN_TIMEOUT = 30.0
DEFAULT_ATTEMPTS = 3


class NoAgent(OpenError):
    """No registered agent matches the selector (or all that do are draining)."""

    why = Why.NO_AGENT

    def __init__(self, selector: Selector) -> None:
        super().__init__(f"no agent matches {selector}")
        self.selector = selector


class AgentTimeout(OpenError):
    """The agent did not answer the OPEN in time."""

    why = Why.AGENT_TIMEOUT


def retryable(failure: Failure) -> bool:
    """Did the stream fail because of the agent (so another may work)?  See L{nova.errors.OPEN_FAILURES}."""
    return open_failure(failure).retryable


@dataclass
class _Attempt:
    """One connect(): the agents tried so far and the open in progress."""

    deadline: float
    tried: list[Registered] = field(default_factory=list)
    current: Deferred[StreamTransport] | None = None
    waiting: Deferred[None] | None = None  # for a fresh tunnel (see TunnelEndpoint._wait_for_tunnel)
    cancelled: bool = False
    early: EarlyData | None = None


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """
    Connects to C{host:port} through an agent matching C{selector}: the one
    with the fewest active streams.  If that agent fails before the stream
    is established (it went away, is draining, or did not answer within
    C{open_timeout}), the next matching agent is tried, up to C{attempts} in
    all.  Failures about the target itself (refused, DNS, policy) are final.
    A host name no agent could resolve (see L{nova.wire.hostname}) raises
    L{InvalidHostName} at once.

    When no other agent is left after such a failure (the one agent's
    tunnel died or was replaced under the open), the open waits for the
    next registration (the agent's fresh tunnel) until C{open_timeout}
    from the start of C{connect} has passed, instead of failing the user's
    connection: a tunnel lost to a fault is usually back within seconds.
    """

    log = Logger()

    def __init__(
        self,
        registry: Registry,
        selector: Selector,
        host: str,
        port: int,
        clock: IReactorTime,
        open_timeout: float = DEFAULT_OPEN_TIMEOUT,
        attempts: int = DEFAULT_ATTEMPTS,
    ) -> None:
        problem = host_problem(host)
        if problem is not None:
            # Refused here, so no agent is asked to resolve it.
            raise InvalidHostName(f"TunnelEndpoint: cannot connect to {untrusted(host)!r}: {problem}")
        self.registry = registry
        self.selector = selector
        self.host = host
        self.port = port
        self.clock = clock
        self.open_timeout = open_timeout
        self.attempts = attempts

    def connect(self, protocolFactory: IProtocolFactory, early: EarlyData | None = None) -> Deferred[IProtocol]:
        """
        L{IStreamClientEndpoint.connect}; C{early} holds what the user's
        connection sends meanwhile (L{nova.server.early}): each attempt's
        tunnel may take it, a failed attempt gives it back for the next.
        """
        attempt = _Attempt(deadline=self.clock.seconds() + self.open_timeout, early=early)

        def cancel(_: Deferred[IProtocol]) -> None:
            attempt.cancelled = True
            if attempt.current is not None:
                attempt.current.cancel()
            if attempt.waiting is not None:
                attempt.waiting.cancel()

        result: Deferred[IProtocol] = Deferred(cancel)
        self._try(attempt, result, protocolFactory, None)
        return result

    def _try(
        self,
        attempt: _Attempt,
        result: Deferred[IProtocol],
        factory: IProtocolFactory,
        last: Failure | None,
    ) -> None:
        if attempt.cancelled:
            return
        tunnel = self.registry.choose(self.selector, attempt.tried)
        if tunnel is None and last is not None and len(attempt.tried) < self.attempts:
            self._wait_for_tunnel(attempt, result, factory, last)
            return
        if tunnel is None or len(attempt.tried) >= self.attempts:
            result.errback(last if last is not None else Failure(NoAgent(self.selector)))
            return
        attempt.tried.append(tunnel)
        try:
            d = tunnel.open_stream(self.host, self.port, attempt.early)
        except OpenError:  # TunnelGone, TunnelBusy: this agent cannot take it now
            self._try(attempt, result, factory, Failure())
            return
        attempt.current = d
        timer = self.clock.callLater(self.open_timeout, d.cancel)

        def opened(stream: StreamTransport) -> None:
            if timer.active():
                timer.cancel()
            attempt.current = None
            protocol = factory.buildProtocol(stream.getPeer())
            if protocol is None:
                stream.abortConnection()
                result.errback(ConnectionRefusedError("the protocol factory declined the connection"))
                return
            stream.makeConnection(protocol)
            result.callback(protocol)

        def failed(failure: Failure) -> None:
            timed_out = not timer.active()
            if not timed_out:
                timer.cancel()
            attempt.current = None
            if attempt.early is not None:
                attempt.early.detach()  # its bytes wait for the next agent
            if attempt.cancelled:
                return
            if failure.check(CancelledError) and timed_out:
                failure = Failure(AgentTimeout(f"agent {tunnel.name} did not answer within {self.open_timeout:g}s"))
            if retryable(failure) and len(attempt.tried) < self.attempts:
                self.log.info(
                    "stream to {target} through {agent} failed ({why}); trying another agent",
                    target=f"{self.host}:{self.port}",
                    agent=tunnel.name,
                    why=failure.getErrorMessage(),
                )
                self._try(attempt, result, factory, failure)
                return
            result.errback(failure)

        d.addCallbacks(opened, failed)

    def _wait_for_tunnel(
        self, attempt: _Attempt, result: Deferred[IProtocol], factory: IProtocolFactory, last: Failure
    ) -> None:
        """
        An open failed for a reason another tunnel may not have and none is
        registered now: wait for the next registration, within the open's
        deadline, then try again.
        """
        left = attempt.deadline - self.clock.seconds()
        if left <= 0:
            result.errback(last)
            return
        self.log.info(
            "stream to {target}: no other agent after {why}; waiting up to {left:.1f}s for a fresh tunnel",
            target=f"{self.host}:{self.port}",
            why=last.getErrorMessage(),
            left=left,
        )
        waiting = attempt.waiting = self.registry.next_registration()
        timer = self.clock.callLater(left, waiting.cancel)

        def registered(_: None) -> None:
            timer.cancel()
            attempt.waiting = None
            self._try(attempt, result, factory, last)

        def expired(failure: Failure) -> None:
            attempt.waiting = None
            if timer.active():
                timer.cancel()
            if not attempt.cancelled:
                result.errback(last)

        waiting.addCallbacks(registered, expired)


__all__ = ["AgentTimeout", "InvalidHostName", "NoAgent", "TimeoutError", "TunnelEndpoint", "retryable"]
