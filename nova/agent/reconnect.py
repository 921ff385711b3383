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
    ) -> None:
        self.initial = initial
        self.cap = cap
        self._random = random
        self.rejected = False
        self.failures = 0
        self._quick = 0

    def reset(self) -> None:
        """The agent registered: the next loss starts again from the bottom."""
        self.failures = 0
        self.rejected = False
        self._quick = 0

    def expect_restart(self) -> None:
        """The server said it is shutting down: it is probably coming back soon."""
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


def reconnecting(
    endpoint: IStreamClientEndpoint, factory: IProtocolFactory, backoff: Backoff, clock: IReactorTime
) -> ClientService:
    """
    A service that keeps one tunnel through C{endpoint}.  The endpoint is
    asked again (and so the host name resolved again) on every attempt.
    """
    return ClientService(endpoint, factory, retryPolicy=backoff, clock=clock)
