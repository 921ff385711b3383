"""
Services shared by both commands.
"""

from __future__ import annotations

import platform
import signal
import threading
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

import nova
import twisted


class StartupError(SystemExit, Exception):
    """
    A service cannot start (port in use, audit database down): the message is
    the one line for the user.

    A L{SystemExit}, so that C{twist} prints the line and exits 1 without a
    traceback; an L{Exception} as well, because C{twistd}'s start-up catches
    only C{Exception} to remove its pid file and tell the parent process it
    detached from (which otherwise waits forever and leaves the pid file).
    """


def versions(command: str) -> str:
    """What runs, for the first log line: NOVA's version, then Twisted's and Python's."""
    return f"{command} (NOVA) {nova.__version__}, Twisted {twisted.__version__}, Python {platform.python_version()}"


class ListenerService(Service):
    """
    Listen on an endpoint while running.  A listen that fails at start-up
    (port in use, bad address) ends the program with one clear line.
    """

    def __init__(self, command: str, what: str, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        self.command = command
        self.what = what
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        failure: list[Failure] = []
        d = self.endpoint.listen(self.factory)
        d.addCallbacks(self._listening, failure.append)
        if failure:
            raise StartupError(f"{self.command}: error: cannot listen for {self.what}: {failure[0].getErrorMessage()}")

    def _listening(self, port: IListeningPort) -> None:
        self.port = port

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()  # type: ignore[return-value]
        return None


def exit_zero_on_sigterm(reactor: Any, log: Logger) -> None:
    """
    Make SIGTERM an orderly stop that exits 0 once the services have
    drained (Kubernetes and systemd send SIGTERM to ask for exactly that).
    Twisted's own handler would re-raise the signal after shutdown.
    """

    def install() -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_sigterm(signum: int, frame: object) -> None:
            log.info("SIGTERM received: draining, then exiting")
            reactor.callFromThread(stop_once, reactor)

        signal.signal(signal.SIGTERM, on_sigterm)

    reactor.callWhenRunning(install)


def stop_once(reactor: Any) -> None:
    """
    Stop the reactor unless it is already stopping: a second signal (Ctrl-C
    reaches every process of the terminal's group, then a supervisor's
    SIGTERM follows) must not end in a ReactorNotRunning traceback.
    """
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def on_signal(reactor: Any, signum: int, action: Callable[[], None]) -> None:
    """Run C{action} in the reactor thread whenever C{signum} arrives."""

    def install() -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signum, lambda s, f: reactor.callFromThread(action))

    reactor.callWhenRunning(install)
