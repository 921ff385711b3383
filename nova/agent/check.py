"""
C{twist novac --check}: dial every server in NOVAC_SERVER once, exactly as
the agent does, and say for each one how far it got.

For every server, in order, one line per step::

    resolve  the host name, and the addresses it has
    tcp      a TCP connection, and the address that answered
    tls      the TLS handshake: version, the server certificate's subject
             and SHA-256 fingerprint, and what verified it
    auth     a real registration (HELLO, AUTH, WELCOME) under NAME-check,
             followed at once by GOAWAY so that NOVAS routes no stream to it
    rtt      the round trip of one PING
    close    a clean close of the connection

Each step has NOVAC_CONNECT_TIMEOUT to finish.  A step that fails says why
and the steps after it are skipped.  Servers are checked at the same time;
their lines are printed in NOVAC_SERVER order.

Exit status (with several failing servers, the smallest of their codes):

    0  every server passed every step
    1  configuration error (one "novac: error: ..." line on stderr), or the
       check was interrupted
    2  a server's name did not resolve, or its port could not be reached
    3  TLS failed: the certificate was not verified, or no handshake
    4  the registration was refused (wrong token, bad name) or never finished
    5  registered, but the PING went unanswered or the close was not clean

The check registers as C{NAME-check} rather than NAME, so that it never
replaces a running agent of that name (NOVAS keeps one tunnel per name).
With a client certificate (NOVAC_TLS_CERT) the certificate binds the name:
the check uses C{NAME-check} if the certificate carries it, and NAME
otherwise (a running agent with that name is then replaced for a moment and
reconnects).

How it is built: L{Checker.steps} lists the six steps, each a small
coroutine that returns its line's detail or raises L{StepFailed};
L{Checker.server} runs them in order for one server over the agent's own
endpoint and tunnel context (L{nova.agent.wiring}); L{check} runs every
server and prints; L{run} is the command, which
L{nova.agent.tap.makeService} runs instead of the service.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TextIO, TypeVar

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import (
    IAddress,
    IHandshakeListener,
    IHostResolution,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import react
from twisted.python.failure import Failure
from zope.interface import implementer

from nova.errors import NovaError, StartupError, describe_dial_error
from nova.tls import TLSConfigError, certificate_fingerprint, client_creator, tls_version
from nova.wire.errors import ErrorCode, OpenFailReason
from nova.wire.frames import Frame, Welcome
from nova.wire.handshake import name_problem

from .events import AgentEvents
from .options import AgentConfig
from .tunnel import AgentContext, AgentTunnel, Rejected
from .wiring import agent_context, server_endpoint, server_label

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_UNREACHABLE = 2
EXIT_TLS = 3
EXIT_AUTH = 4
EXIT_PROTOCOL = 5

STEPS = ("resolve", "tcp", "tls", "auth", "rtt", "close")
STEP_EXIT = {
    "resolve": EXIT_UNREACHABLE,
    "tcp": EXIT_UNREACHABLE,
    "tls": EXIT_TLS,
    "auth": EXIT_AUTH,
    "rtt": EXIT_PROTOCOL,
    "close": EXIT_PROTOCOL,
}
EXIT_MEANING = {
    EXIT_OK: "every server passed",
    EXIT_CONFIG: "configuration error or interrupted",
    EXIT_UNREACHABLE: "a server did not resolve or could not be reached",
    EXIT_TLS: "TLS failed",
    EXIT_AUTH: "registration refused or unfinished",
    EXIT_PROTOCOL: "no PING answer or no clean close",
}

CHECK_SUFFIX = "-check"

T = TypeVar("T")


class StepFailed(NovaError):
    """A step did not pass; the message says why, in one line."""


@dataclass
class Step:
    name: str
    status: str  # "ok", "FAIL", "skip"
    detail: str


@dataclass
class ServerReport:
    label: str
    steps: list[Step] = field(default_factory=list)

    def add(self, name: str, status: str, detail: str) -> None:
        self.steps.append(Step(name, status, detail))

    def skip_rest(self, why: str) -> None:
        done = {s.name for s in self.steps}
        for name in STEPS:
            if name not in done:
                self.add(name, "skip", why)

    @property
    def code(self) -> int:
        for s in self.steps:
            if s.status == "FAIL":
                return STEP_EXIT[s.name]
        return EXIT_OK

    def lines(self, width: int = 0) -> list[str]:
        return [f"{self.label:<{width}}  {s.name:<7} {s.status:<4}  {s.detail}" for s in self.steps]


def check_names(config: AgentConfig) -> tuple[list[str], str | None]:
    """
    The name the check registers under at each server (NAME-check, or
    NAME-check-1, NAME-check-2 ... so that two entries reaching the same
    NOVAS do not replace each other), and a note to print when it has to be
    the agent's own name.
    """
    n = len(config.servers)
    suffixes = [CHECK_SUFFIX] if n == 1 else [f"{CHECK_SUFFIX}-{i}" for i in range(1, n + 1)]
    names = []
    for suffix in suffixes:
        candidate = config.name[: 63 - len(suffix)] + suffix
        names.append(config.name if name_problem(candidate) is not None else candidate)
    if config.client_cert is None:
        return names, None
    carried = _certificate_names(config.client_cert[0])
    if all(name in carried for name in names):
        return names, None
    return [config.name] * n, (
        f"the client certificate binds the name {config.name!r}: the check registers under it,"
        " so a running agent with that name is replaced for a moment and reconnects"
    )


def _certificate_names(path: Any) -> set[str]:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return set()
    names = {a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if isinstance(a.value, str)}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names |= set(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    return names


def _mirror(source: Deferred[T]) -> Deferred[T]:
    """A Deferred that follows C{source} and may be cancelled without touching it."""
    out: Deferred[T] = Deferred()

    def relay(result: T | Failure) -> None:
        if not out.called:
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)

    source.addBoth(relay)
    return out


async def _within(d: Deferred[T], seconds: float, clock: Any, what: str) -> T:
    """Wait for C{d}, at most C{seconds}; a timeout becomes L{StepFailed}."""
    try:
        return await d.addTimeout(seconds, clock)
    except (defer.TimeoutError, error.TimeoutError, error.ConnectingCancelledError, CancelledError):
        raise StepFailed(f"{what}: no answer within {seconds:g}s") from None


@implementer(IResolutionReceiver)
class _Addresses:
    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        host = getattr(address, "host", None)
        if isinstance(host, str) and host not in self.addresses:
            self.addresses.append(host)

    def resolutionComplete(self) -> None:
        if not self.done.called:
            self.done.callback(self.addresses)


@implementer(IHandshakeListener)
class CheckTunnel(AgentTunnel):
    """
    An agent tunnel that reports its progress and takes no streams: any
    OPEN is refused with DRAINING, so NOVAS would retry another agent.
    """

    def __init__(self, context: AgentContext, server: str) -> None:
        super().__init__(context, server)
        self.tls_done: Deferred[None] = Deferred()
        self.pong: Deferred[float] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.lost_reason: Failure | None = None
        self.server_id = ""

    def handshakeCompleted(self) -> None:
        # An identity check that fails during the handshake aborts the
        # connection before this is called: then the loss reports it.
        if self.transport is not None and not getattr(self.transport, "disconnecting", False):
            if not self.tls_done.called:
                self.tls_done.callback(None)

    def handshake_frame(self, frame: Frame) -> None:
        if isinstance(frame, Welcome):
            self.server_id = frame.server_id
        super().handshake_frame(frame)

    def stream_requested(self, stream_id: int, host: str, port: int) -> None:
        assert self.mux is not None
        self.mux.refuse(stream_id, OpenFailReason.DRAINING, "a connectivity check takes no streams")
        self.flush()

    def pong_received(self, opaque: bytes) -> None:
        super().pong_received(opaque)
        if self.rtt is not None and not self.pong.called:
            self.pong.callback(self.rtt)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        super().connectionLost(reason)
        for d in (self.tls_done, self.pong):
            if not d.called:
                d.errback(reason)
        self.lost_reason = reason
        if not self.lost.called:
            self.lost.callback(None)


class _CheckFactory(Factory):
    noisy = False

    def __init__(self, context: AgentContext, server: str) -> None:
        self.context = context
        self.server = server

    def buildProtocol(self, addr: object) -> CheckTunnel:
        return CheckTunnel(self.context, self.server)


def _refuse_targets(host: str, port: int, protocol: Any) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(ConnectionRefusedError("a connectivity check dials no target"))
    return d


def _tls_error(failure: Failure) -> str:
    """One line for why a TLS handshake failed."""
    value = failure.value
    if isinstance(value, SSL.Error):
        reasons = [r[2] for r in (value.args[0] if value.args and isinstance(value.args[0], list) else [])]
        reasons = [r for r in reasons if r]
        if reasons:
            return "; ".join(reasons)
    if type(value).__name__ == "VerificationError":
        return "the certificate does not carry the expected name"
    if failure.check(error.ConnectionDone, error.ConnectionLost):
        return (
            "the connection closed during the TLS handshake (not a NOVAS agent port, or NOVAS refused it: see its log)"
        )
    return failure.getErrorMessage() or type(value).__name__


def _peer_certificate(transport: Any) -> x509.Certificate | None:
    """The server's certificate, also after a failed verification (then only the chain has it)."""
    try:
        handle = transport.getHandle()
        if not isinstance(handle, SSL.Connection):
            return None
        cert = handle.get_peer_certificate(as_cryptography=True)
        if cert is None:
            chain = handle.get_peer_cert_chain(as_cryptography=True) or []
            cert = chain[0] if chain else None
    except Exception:
        return None
    return cert if isinstance(cert, x509.Certificate) else None


def _describe_certificate(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [*san.get_values_for_type(x509.DNSName), *(str(a) for a in san.get_values_for_type(x509.IPAddress))]
    except x509.ExtensionNotFound:
        names = []
    subject = cert.subject.rfc4514_string() or "(empty subject)"
    shown = f" (names: {', '.join(names)})" if names else ""
    return f"certificate {subject}{shown}, {certificate_fingerprint(cert)}"


@dataclass
class Attempt:
    """What one server's steps hand on to each other."""

    host: str
    port: int
    name: str
    label: str
    tunnel: CheckTunnel | None = None

    def connected(self) -> CheckTunnel:
        assert self.tunnel is not None and self.tunnel.transport is not None
        return self.tunnel


class Skipped(NovaError):
    """A step that does not apply (TLS is off); the message says why, and the steps after it still run."""


# A step: the detail of its "ok" line, or StepFailed (or Skipped).
StepFunction = Callable[[Attempt], Awaitable[str]]


class Checker:
    """
    Runs the steps for every server of one configuration: L{server} goes
    through L{steps} in order, one line each, and stops at the first that
    fails.  The tunnel's context and the endpoint are the agent's own
    (L{nova.agent.wiring}), with a name of the check's and no streams.
    """

    def __init__(self, reactor: Any, config: AgentConfig) -> None:
        self.reactor = reactor
        self.config = config

    def context(self, name: str) -> AgentContext:
        return agent_context(
            self.config,
            self.reactor,
            _refuse_targets,
            AgentEvents(),
            name=name,
            tags=(),  # no tags: no selector with tags can match the check
            max_streams=1,
        )

    def endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        """The same endpoint the agent dials."""
        return server_endpoint(self.reactor, self.config, host, port)

    def steps(self) -> list[tuple[str, StepFunction]]:
        return [
            ("resolve", self.resolve),
            ("tcp", self.tcp),
            ("tls", self.tls),
            ("auth", self.auth),
            ("rtt", self.rtt),
            ("close", self.close),
        ]

    async def server(self, host: str, port: int, name: str) -> ServerReport:
        attempt = Attempt(host, port, name, server_label(host, port))
        report = ServerReport(attempt.label)
        try:
            for step, run in self.steps():
                try:
                    report.add(step, "ok", await run(attempt))
                except Skipped as e:
                    report.add(step, "skip", str(e))
                except StepFailed as e:
                    report.add(step, "FAIL", str(e))
                    report.skip_rest(f"{step} failed")
                    break
                except Exception as e:  # never a traceback: whatever it is, one line
                    report.add(step, "FAIL", f"unexpected error: {type(e).__name__}: {e}")
                    report.skip_rest(f"{step} failed")
                    break
        finally:
            tunnel = attempt.tunnel
            if tunnel is not None and not tunnel.closed:
                tunnel.abort("the check is over", quiet=True)
        return report

    # The steps, in order.

    async def resolve(self, attempt: Attempt) -> str:
        started = self.reactor.seconds()
        receiver = _Addresses()
        self.reactor.nameResolver.resolveHostName(receiver, attempt.host, attempt.port)
        addresses = await self._within(_mirror(receiver.done), "DNS")
        if not addresses:
            raise StepFailed(f"{attempt.host} has no address (DNS lookup failed)")
        return f"{', '.join(addresses)} ({self._took(started)})"

    async def tcp(self, attempt: Attempt) -> str:
        started = self.reactor.seconds()
        try:
            endpoint = self.endpoint(attempt.host, attempt.port)
        except TLSConfigError as e:
            raise StepFailed(f"cannot set up TLS: {e}") from None
        factory = _CheckFactory(self.context(attempt.name), attempt.label)
        try:
            protocol = await self._within(endpoint.connect(factory), "TCP connect")
        except StepFailed:
            raise
        except Exception as e:
            raise StepFailed(describe_dial_error(e)) from None
        assert isinstance(protocol, CheckTunnel) and protocol.transport is not None
        attempt.tunnel = protocol
        peer = protocol.transport.getPeer()
        where = server_label(getattr(peer, "host", "?"), getattr(peer, "port", attempt.port))
        return f"connected to {where} ({self._took(started)})"

    async def tls(self, attempt: Attempt) -> str:
        if not self.config.tls:
            raise Skipped("TLS is off (NOVAC_TLS=off): the tunnel is plaintext")
        tunnel = attempt.connected()
        started = self.reactor.seconds()
        try:
            await self._within(_mirror(tunnel.tls_done), "TLS handshake")
        except StepFailed:
            raise
        except Exception:
            failure = Failure()
            cert = _peer_certificate(tunnel.transport)
            presented = f"; the server presented {_describe_certificate(cert)}" if cert is not None else ""
            raise StepFailed(f"{_tls_error(failure)}{presented}; {self._expected(attempt.host)}") from None
        cert = _peer_certificate(tunnel.transport)
        shown = _describe_certificate(cert) if cert is not None else "no certificate"
        version = tls_version(tunnel.transport) or "TLS"
        return f"{version}, {shown}; {self._verified_by(attempt.host)} ({self._took(started)})"

    async def auth(self, attempt: Attempt) -> str:
        tunnel = attempt.connected()
        started = self.reactor.seconds()
        try:
            await self._within(_mirror(tunnel.when_registered()), "registration")
        except Rejected as e:
            raise StepFailed(f"the server refused the registration: {e}") from None
        except StepFailed:
            raise
        except Exception as e:
            raise StepFailed(f"the connection closed before the registration finished: {e}") from None
        # At once: NOVAS must not choose this tunnel for a stream.
        tunnel.send_goaway(ErrorCode.NO_ERROR, "connectivity check (twist novac --check): takes no streams")
        return (
            f"registered as {attempt.name} with server {tunnel.server_id or '?'}; GOAWAY sent ({self._took(started)})"
        )

    async def rtt(self, attempt: Attempt) -> str:
        tunnel = attempt.connected()
        tunnel.send_ping()
        try:
            rtt = await self._within(_mirror(tunnel.pong), "PING")
        except StepFailed:
            raise
        except Exception as e:
            raise StepFailed(f"the connection closed before the PING was answered: {e}") from None
        return _ms(rtt)

    async def close(self, attempt: Attempt) -> str:
        tunnel = attempt.connected()
        tunnel.close()
        await self._within(_mirror(tunnel.lost), "close")
        reason = tunnel.lost_reason
        if reason is not None and reason.check(error.ConnectionDone):
            return "connection closed cleanly"
        why = reason.getErrorMessage() if reason is not None else "unknown"
        raise StepFailed(f"the connection did not close cleanly: {why}")

    # Helpers of the steps.

    async def _within(self, d: Deferred[T], what: str) -> T:
        return await _within(d, self.config.connect_timeout, self.reactor, what)

    def _took(self, started: float) -> str:
        return _ms(self.reactor.seconds() - started)

    def _verified_by(self, host: str) -> str:
        c = self.config
        if c.fingerprint is not None:
            return "matches the pinned NOVAC_TLS_FINGERPRINT"
        return f"issued by a CA in NOVAC_TLS_CA, name {c.server_name or host!r} verified"

    def _expected(self, host: str) -> str:
        c = self.config
        if c.fingerprint is not None:
            return f"pinned NOVAC_TLS_FINGERPRINT is sha256:{c.fingerprint.hex()}"
        return f"expected a certificate from NOVAC_TLS_CA {c.ca} naming {c.server_name or host!r}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


async def check(reactor: Any, config: AgentConfig, out: TextIO) -> int:
    """Check every server; print the reports; return the exit status."""
    names, note = check_names(config)
    print(
        f"checking {len(config.servers)} server(s) as agent {', '.join(dict.fromkeys(names))}"
        f" ({config.connect_timeout:g}s per step)",
        file=out,
        flush=True,
    )
    if note:
        print(f"note: {note}", file=out, flush=True)
    checker = Checker(reactor, config)
    pending = [
        ensureDeferred(checker.server(host, port, name))
        for (host, port), name in zip(config.servers, names, strict=True)
    ]
    width = max(len(server_label(host, port)) for host, port in config.servers)
    reports: list[ServerReport] = []
    for d in pending:
        report = await d
        reports.append(report)
        for line in report.lines(width):
            print(line, file=out, flush=True)
    codes = [r.code for r in reports if r.code != EXIT_OK]
    code = min(codes) if codes else EXIT_OK
    passed = len(reports) - len(codes)
    print(
        f"summary: {passed} of {len(reports)} server(s) passed; exit {code} ({EXIT_MEANING[code]})",
        file=out,
        flush=True,
    )
    return code


class _Gate:
    """Passes writes through until it is shut (after an interruption, nothing more is printed)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.shut = False

    def write(self, text: str) -> int:
        return 0 if self.shut else self.out.write(text)

    def flush(self) -> None:
        if not self.shut:
            self.out.flush()


def _main(reactor: Any, config: AgentConfig, stream: TextIO) -> Deferred[None]:
    # The exit status reaches react() as a plain SystemExit: its Failure.check
    # recognises only that class (not a subclass such as StartupError).
    done: Deferred[None] = Deferred()
    out = _Gate(stream)

    def finished(code: int | Failure) -> None:
        if done.called:
            return
        if isinstance(code, Failure):
            print(f"check failed: {code.getErrorMessage()}", file=out, flush=True)
            done.errback(SystemExit(EXIT_CONFIG))
        else:
            done.errback(SystemExit(code))

    def interrupted() -> None:
        if not done.called:
            print("check interrupted", file=out, flush=True)
            out.shut = True
            done.errback(SystemExit(EXIT_CONFIG))

    reactor.addSystemEventTrigger("before", "shutdown", interrupted)
    ensureDeferred(check(reactor, config, out)).addBoth(finished)  # type: ignore[arg-type]
    return done


def run(config: AgentConfig, out: TextIO | None = None, runner: Callable[..., NoReturn] = react) -> NoReturn:
    """Run the check with the reactor and exit with its status."""
    stream = sys.stdout if out is None else out
    if config.tls:
        # Unusable certificate files are a configuration error, as at start.
        try:
            client_creator(config.server_name or "localhost", config.ca, config.fingerprint, config.client_cert)
        except TLSConfigError as e:
            raise StartupError(f"novac: error: {e}") from None
    runner(_main, (config, stream))
