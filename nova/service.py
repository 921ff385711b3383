"""
Services shared by both commands.
"""

from __future__ import annotations

import json
import platform
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import FileLogObserver, Logger, formatEvent, textFileLogObserver
from twisted.python.failure import Failure

import nova
import twisted
from nova.errors import StartupError as StartupError  # re-exported for the taps and tests


def versions(command: str) -> str:
    """What runs, for the first log line: NOVA's version, then Twisted's and Python's."""
    return f"{command} (NOVA) {nova.__version__}, Twisted {twisted.__version__}, Python {platform.python_version()}"


# How NOVA logs under `twist` unless twist's own --log-format is given:
# NOVA_LOG_FORMAT=text (the default, whatever the output is) or json.
LOG_FORMAT_VARIABLE = "NOVA_LOG_FORMAT"


# Keys that events from twisted.python.log carry besides their fields.
_LEGACY = frozenset({"message", "format", "time", "isError", "why", "failure"})


def json_line(event: dict[str, Any]) -> str:
    """
    One log event as one JSON object on one line: the time, the level, the
    logger, the rendered message and the event's own fields (a failure as its
    message and traceback).  For log collectors that read a line at a time.
    """
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0.0), UTC).isoformat(timespec="milliseconds"),
        "level": getattr(event.get("log_level"), "name", "info"),
        "logger": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    fields = {k: v for k, v in event.items() if not k.startswith("log_") and k not in _LEGACY}
    if fields:
        plain = (str, int, float, bool, type(None))
        record["fields"] = {k: v if isinstance(v, plain) else repr(v) for k, v in fields.items()}
    return json.dumps(record, ensure_ascii=False, default=repr) + "\n"


def json_lines_observer(out: IO[Any]) -> FileLogObserver:
    return FileLogObserver(out, json_line)


def log_observer_factory(value: str | None) -> Callable[[IO[Any]], FileLogObserver]:
    """The observer for a NOVA_LOG_FORMAT value; text when unset."""
    choice = (value or "text").strip().lower()
    if choice == "text":
        return textFileLogObserver
    if choice == "json":
        return json_lines_observer
    raise ValueError(f"{LOG_FORMAT_VARIABLE} must be text or json, not {value!r}")


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
            return port.stopListening()
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
