"""
Many simulated agents in one process, each one NOVAC's own code: a
L{nova.agent.tap.NovacService} built from NOVAC's own options, i.e. a real
TLS connection (fingerprint pinned) with its own name, registering with the
HMAC handshake and reconnecting with NOVAC's own ClientService retry policy.

    NOVAC_TOKEN=... python bench/fleet.py --server 127.0.0.1:PORT \\
        --fingerprint sha256:... --prefix sim-0- --count 250 \\
        [--sources 127.0.1.1,127.0.1.2]

With C{--sources}, agent I connects from source address SOURCES[I % N], as
real agents come from many addresses: NOVAS limits unfinished handshakes per
source (C{NOVAS_MAX_PENDING_PER_SOURCE}), and one address has only so many
ephemeral ports towards one server port.

Logs as text to stdout (the suite sends it to a file).  Prints
"fleet: started N agents" once every service is started.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
from types import FrameType
from typing import Any, ClassVar

from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from nova.agent.options import AgentConfig, Options
from nova.agent.tap import NovacService
from nova.tls import client_creator


class SourcedNovac(NovacService):
    """
    NOVAC's own service, its tunnel connection made from a given source
    address, with the TLS client context shared by the whole fleet: a real
    NOVAC makes one, and ten thousand of them would cost the fleet seconds
    of CPU and megabytes that NOVAS's figures do not need.
    """

    creators: ClassVar[dict[tuple[str, int], IOpenSSLClientConnectionCreator]] = {}

    def __init__(self, config: AgentConfig, reactor: Any, source: str | None) -> None:
        self.source = source
        super().__init__(config, reactor)

    def _endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        c = self.config
        bind = (self.source, 0) if self.source is not None else None
        endpoint = HostnameEndpoint(self.reactor, host, port, timeout=c.connect_timeout, bindAddress=bind)
        if not c.tls:
            return endpoint
        creator = self.creators.get((host, port))
        if creator is None:
            creator = self.creators[host, port] = client_creator(c.server_name or host, c.ca, c.fingerprint)
        return _Gated(wrapClientTLS(creator, endpoint), self.gate)

    gate: DeferredSemaphore  # set by main()


@implementer(IStreamClientEndpoint)
class _Gated:
    """
    At most C{gate.limit} of the fleet's agents between "connecting" and
    "registered or failed" at once.  Ten thousand agents on ten thousand
    hosts each have a CPU of their own; here they share two cores with
    NOVAS, so without a gate every handshake in the fleet is in progress at
    once, each gets a sliver of the CPU, and all of them miss NOVAC's
    handshake timeout together.  The gate stands for the agents' own CPUs:
    an agent waiting at it has not dialled yet (its timeout is not running),
    and NOVAS sees a steady stream of handshakes that finish.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, gate: DeferredSemaphore) -> None:
        self.endpoint = endpoint
        self.gate = gate

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def attempt(_: object) -> Deferred[IProtocol]:
            d = self.endpoint.connect(protocolFactory)

            def connected(protocol: IProtocol) -> IProtocol:
                registered = getattr(protocol, "when_registered", None)
                if registered is None:
                    self.gate.release()
                else:
                    registered().addBoth(lambda _: self.gate.release())
                return protocol

            def failed(reason: Failure) -> Failure:
                self.gate.release()
                return reason

            return d.addCallbacks(connected, failed)

        return self.gate.acquire().addCallback(attempt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="HOST:PORT of NOVAS")
    parser.add_argument("--fingerprint", required=True, help="sha256:... of NOVAS's certificate")
    parser.add_argument("--prefix", required=True, help="agent names are PREFIX0000, PREFIX0001, ...")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--sources", default="", help="comma-separated source addresses, used in turn")
    parser.add_argument(
        "--concurrent",
        type=int,
        default=64,
        help="agents of this process handshaking at once (the others wait to dial; see _Gated)",
    )
    parser.add_argument("--verbose", action="store_true", help="log info events too (default: warnings and up)")
    args = parser.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.count * 2 + 256
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(wanted, soft), hard), hard))

    level = LogLevel.info if args.verbose else LogLevel.warn
    observer = FilteringLogObserver(textFileLogObserver(sys.stdout), [LogLevelFilterPredicate(defaultLogLevel=level)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    SourcedNovac.gate = DeferredSemaphore(max(1, args.concurrent))
    sources = [a.strip() for a in args.sources.split(",") if a.strip()]
    fleet = MultiService()
    for i in range(args.count):
        options = Options()  # the token comes from NOVAC_TOKEN, as for novac
        name = f"{args.prefix}{i:04d}"
        options.parseOptions(["--server", args.server, "--server-fingerprint", args.fingerprint, "--name", name])
        source = sources[i % len(sources)] if sources else None
        SourcedNovac(options.config, reactor, source).setServiceParent(fleet)  # type: ignore[no-untyped-call]

    def start() -> None:
        fleet.startService()
        print(f"fleet: started {args.count} agents", flush=True)

    reactor.callWhenRunning(start)

    # No graceful stop: closing 1,250 TLS connections one by one took longer
    # than the suite's 10 s between SIGTERM and SIGKILL, for each process in
    # turn.  Agents whose host dies just vanish too.
    def vanish(signum: int, frame: FrameType | None) -> None:
        sys.stdout.flush()
        os._exit(0)

    reactor.callWhenRunning(signal.signal, signal.SIGTERM, vanish)  # after the reactor's own handler
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
