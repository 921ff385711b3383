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
import resource
import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from nova.agent.options import AgentConfig, Options
from nova.agent.tap import NovacService
from nova.agent.wiring import server_endpoint


class SourcedNovac(NovacService):
    """NOVAC's own service, its tunnel connection made from a given source address."""

    def __init__(self, config: AgentConfig, reactor: Any, source: str | None) -> None:
        self.source = source
        super().__init__(config, reactor)

    def _endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        if self.source is None:
            return super()._endpoint(host, port)
        return server_endpoint(self.reactor, self.config, host, port, bind=(self.source, 0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="HOST:PORT of NOVAS")
    parser.add_argument("--fingerprint", required=True, help="sha256:... of NOVAS's certificate")
    parser.add_argument("--prefix", required=True, help="agent names are PREFIX0000, PREFIX0001, ...")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--sources", default="", help="comma-separated source addresses, used in turn")
    parser.add_argument("--verbose", action="store_true", help="log info events too (default: warnings and up)")
    args = parser.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.count * 2 + 256
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(wanted, soft), hard), hard))

    level = LogLevel.info if args.verbose else LogLevel.warn
    observer = FilteringLogObserver(textFileLogObserver(sys.stdout), [LogLevelFilterPredicate(defaultLogLevel=level)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

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
    reactor.addSystemEventTrigger("before", "shutdown", fleet.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
