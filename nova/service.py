"""
Services shared by both commands.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure


class ListenerService(Service):
    """
    Listen on an endpoint while running.  A listen that fails at start-up
    (port in use, bad address) ends the program with one clear line.
    """

    def __init__(self, command: str, what: str, endpoint: IStreamServerEndpoint, factory: Factory) -> None:
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
            raise SystemExit(f"{self.command}: error: cannot listen for {self.what}: {failure[0].getErrorMessage()}")

    def _listening(self, port: IListeningPort) -> None:
        self.port = port

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()  # type: ignore[return-value]
        return None
