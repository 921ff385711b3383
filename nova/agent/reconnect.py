"""
Reconnecting to one server: Twisted's L{ClientService} (itself an Automat
machine) with NOVA's backoff.

ClientService resets its attempt count when a connection is made; NOVA's
L{Backoff} keeps its own count, which only a successful registration resets,
so a server that accepts TCP but rejects or drops the handshake is still
backed off.  (ClientService's C{prepareConnection} is not used for this: a
connection lost while it is pending trips ClientService's state machine.)
"""

from __future__ import annotations

import random
from collections.abc import Callable

from twisted.application.internet import ClientService
from twisted.internet.interfaces import IProtocolFactory, IReactorTime, IStreamClientEndpoint

DEFAULT_INITIAL_DELAY = 1.0
DEFAULT_MAX_DELAY = 30.0


class Backoff:
    """
    Exponential backoff with full jitter: the wait before retry C{n} is
    uniform in [0, min(cap, initial * 2**(n-1))].  After the server rejected
    the registration, the wait is in [cap/2, cap]: retrying sooner cannot help
    and thousands of misconfigured agents must not hammer a server.
    """

    def __init__(
        self,
        initial: float = DEFAULT_INITIAL_DELAY,
        cap: float = DEFAULT_MAX_DELAY,
        random: Callable[[], float] = random.random,
    ) -> None:
        self.initial = initial
        self.cap = cap
        self._random = random
        self.rejected = False
        self.failures = 0

    def reset(self) -> None:
        """The agent registered: the next loss starts again from the bottom."""
        self.failures = 0
        self.rejected = False

    def __call__(self, attempt: int) -> float:
        """ClientService's retry policy (its own attempt number is ignored)."""
        self.failures += 1
        if self.rejected:
            return self.cap * (0.5 + 0.5 * self._random())
        ceiling = min(self.cap, self.initial * 2.0 ** min(self.failures - 1, 64))
        return ceiling * self._random()


def reconnecting(
    endpoint: IStreamClientEndpoint, factory: IProtocolFactory, backoff: Backoff, clock: IReactorTime
) -> ClientService:
    """
    A service that keeps one tunnel through C{endpoint}.  The endpoint is
    asked again (and so the host name resolved again) on every attempt.
    """
    return ClientService(endpoint, factory, retryPolicy=backoff, clock=clock)
