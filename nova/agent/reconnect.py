"""
Reconnecting to one server: Twisted's L{ClientService} (itself an Automat
machine) with NOVA's backoff.

NOVAC's agent pools (L{nova.agent.discovery}, one per configured address)
use L{Backoff} between their dials; a pool's own machine
(L{nova.agent.pool}) takes the place of L{reconnecting}, since a pool holds
a tunnel per cluster member rather than one connection.

ClientService resets its attempt count when a connection is made; NOVA's
L{Backoff} keeps its own count, which only a successful registration resets,
so a server that accepts TCP but rejects or drops the handshake is still
backed off.  (ClientService's C{prepareConnection} is not used for this: a
connection lost while it is pending trips ClientService's state machine.)

For the same reason the retry is logged here, not by ClientService (whose
line names an endpoint object and counts attempts since the last TCP
connection): one line with the server, why the last attempt failed, NOVA's
attempt count and the delay.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    Logger,
    PredicateResult,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

DEFAULT_INITIAL_DELAY = 1.0
DEFAULT_MAX_DELAY = 30.0

# After a server's GOAWAY SHUTDOWN (most likely a restart: a rolling deploy, a
# pod being replaced), this many retries wait at most the initial delay each,
# without growing, before the usual backoff starts from the bottom.  Growing
# at once would leave a thousand agents that met the closed port during a
# one-second restart waiting up to 8 s each.
RESTART_RETRIES = 10


class Backoff:
    """
    Exponential backoff with full jitter: the wait before retry C{n} is
    uniform in [0, min(cap, initial * 2**(n-1))].  After the server rejected
    the registration, the wait is in [cap/2, cap]: retrying sooner cannot help
    and thousands of misconfigured agents must not hammer a server.  After
    the server announced its shutdown (L{expect_restart}), the first
    L{RESTART_RETRIES} waits are in [0, initial].
    """

    def __init__(
        self,
        initial: float = DEFAULT_INITIAL_DELAY,
        cap: float = DEFAULT_MAX_DELAY,
        random: Callable[[], float] = random.random,
        server: str = "the server",
    ) -> None:
        self.initial = initial
        self.cap = cap
        self._random = random
        self.server = server
        self.rejected = False
        self.failures = 0
        self._quick = 0
        # Retries since the last registration, and why the last attempt failed (for the log).
        self.attempts = 0
        self.last_failure = "connection lost"

    def reset(self) -> None:
        """The agent registered: the next loss starts again from the bottom."""
        self.failures = 0
        self.rejected = False
        self._quick = 0
        self.attempts = 0

    def failed(self, reason: str) -> None:
        """Why the attempt that just ended failed, for the retry line."""
        self.last_failure = reason

    def jitter(self) -> float:
        """A random number in [0, 1): this policy's source of jitter (injected in tests)."""
        return self._random()

    def expect_restart(self) -> None:
        """The server said it is shutting down, or the tunnel stalled: it is probably back soon."""
        self._quick = RESTART_RETRIES

    def __call__(self, attempt: int) -> float:
        """ClientService's retry policy (its own attempt number is ignored)."""
        if self.rejected:
            self.failures += 1
            return self.cap * (0.5 + 0.5 * self._random())
        if self._quick > 0:
            self._quick -= 1
            return min(self.initial, self.cap) * self._random()
        self.failures += 1
        ceiling = min(self.cap, self.initial * 2.0 ** min(self.failures - 1, 64))
        return ceiling * self._random()


@implementer(ILogFilterPredicate)
class _NotTheRetryLine:
    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        retry_line = str(event.get("log_format", "")).startswith("Scheduling retry")
        result: PredicateResult = PredicateResult.no if retry_line else PredicateResult.maybe
        return result


class _ClientService(ClientService):
    """ClientService without its own retry line (L{reconnecting} logs a better one)."""

    _log = Logger(
        namespace="twisted.application.internet.ClientService",
        observer=FilteringLogObserver(globalLogPublisher, [_NotTheRetryLine()]),
    )


@implementer(IStreamClientEndpoint)
class NotingEndpoint:
    """An endpoint that tells the backoff why a connection attempt failed."""

    def __init__(self, endpoint: IStreamClientEndpoint, backoff: Backoff) -> None:
        self._endpoint = endpoint
        self._backoff = backoff

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def failed(failure: Failure) -> Failure:
            self._backoff.failed(failure.getErrorMessage())
            return failure

        d: Deferred[IProtocol] = self._endpoint.connect(protocolFactory)
        return d.addErrback(failed)

    def __repr__(self) -> str:
        return self._backoff.server


def reconnecting(
    endpoint: IStreamClientEndpoint, factory: IProtocolFactory, backoff: Backoff, clock: IReactorTime
) -> ClientService:
    """
    A service that keeps one tunnel through C{endpoint}.  The endpoint is
    asked again (and so the host name resolved again) on every attempt.
    """

    def retry(attempt: int) -> float:
        delay = backoff(attempt)
        backoff.attempts += 1
        log.info(
            "retrying {server} in {delay:.1f}s (retry {attempt}; last attempt: {reason})",
            server=backoff.server,
            reason=backoff.last_failure,
            attempt=backoff.attempts,
            delay=delay,
        )
        return delay

    return _ClientService(NotingEndpoint(endpoint, backoff), factory, retryPolicy=retry, clock=clock)
