"""
NOVA's errors: one base class, the start-up error, and one table of what a
failed stream open means.

Every exception NOVA raises on purpose is a L{NovaError}.  Where they are
raised (the classes stay beside the code that raises them):

    nova.config          ConfigError (defined here)   a setting cannot work
    nova.service         StartupError (defined here)  the program cannot start
    nova.tls             TLSConfigError               unusable certificate files
    nova.admin.store     AuditStoreError              the audit store is unreachable
    nova.rules.admission ScopeError                   a token file's scope words
    nova.wire.errors     ProtocolError (+4)           the peer broke the protocol
    nova.wire.hostname   InvalidHostName              a host no agent could resolve
    nova.agent.tunnel    Rejected                     the server refused registration
    OpenError (here) and its subclasses:              a stream could not be opened
        nova.server.endpoint  NoAgent, AgentTimeout
        nova.server.tunnel    OpenFailed, TunnelGone, TunnelBusy

    nova.rules.destinations    PolicyError, PolicyDenied    a rule that cannot parse; a destination the rules deny
    nova.agent.check     StepFailed, Skipped          a step of C{novac --check} that failed or was not run
    nova.wire.socks5   Malformed                    a SOCKS5 client that broke the protocol

An open failure carries its L{Why}; L{OPEN_FAILURES} says, once, what each
means everywhere it is reported: the metrics and audit label, whether
another agent may succeed, the SOCKS5 reply, the OPEN_FAIL reason an agent
sends and the hint C{novac --check} prints.  L{open_failure} reads a
server-side failure, L{dial_failure} an agent's failed connection to a
target; both answer with a row of that table.

Pure: no Twisted import (L{nova.wire} derives its errors from L{NovaError}).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class NovaError(Exception):
    """The base of every exception NOVA raises on purpose."""


class ConfigError(NovaError):
    """Configuration that cannot work; the message is one line for the user."""


class StartupError(SystemExit, NovaError):
    """
    The program cannot start (bad settings, port in use, audit database
    down), or ends before starting (C{--version}): C{code} is the one line
    for the user (exit status 1) or an exit status.

    The one exception type for start-up: the plugins' runners turn it into
    that line and that exit status.  A L{SystemExit}, so that C{twist} prints
    the line and exits without a traceback; an L{Exception} as well, because
    C{twistd}'s start-up catches only C{Exception} to remove its pid file and
    tell the parent process it detached from (which otherwise waits forever
    and leaves the pid file).
    """

    def __init__(self, code: str | int = 1) -> None:
        super().__init__(code)


class Why(Enum):
    """Why a stream could not be opened: a row of L{OPEN_FAILURES}."""

    # Reported by the agent (OPEN_FAIL reasons).
    REFUSED = "refused"
    DNS_FAILURE = "dns_failure"
    TIMEOUT = "timeout"
    DENIED = "denied"
    UNREACHABLE = "unreachable"
    OVERLOADED = "overloaded"
    OTHER = "other"
    DRAINING = "draining"
    # Found by the server.
    NO_AGENT = "no_agent"
    AGENT_TIMEOUT = "agent_timeout"
    TUNNEL_GONE = "tunnel_gone"
    TUNNEL_BUSY = "tunnel_busy"
    ERROR = "error"  # anything else


@dataclass(frozen=True)
class Category:
    label: str  # in metrics and the audit history
    retryable: bool  # says nothing about the target: another agent may well succeed
    socks_reply: int  # RFC 1928 REP (nova.server.socks.Reply)
    wire: int  # the OpenFailReason an agent sends in OPEN_FAIL (nova.wire.errors imports this module)
    hint: str = ""  # novac --check's explanation, where there is more to say than the error's text


# RFC 1928 replies.
_GENERAL, _NOT_ALLOWED, _NET_UNREACHABLE, _HOST_UNREACHABLE, _CONN_REFUSED, _TTL_EXPIRED = 1, 2, 3, 4, 5, 6
# OPEN_FAIL reasons (protocol.md section 3; nova.wire.errors.OpenFailReason).
REFUSED, DNS_FAILURE, TIMEOUT, DENIED, UNREACHABLE, OVERLOADED, OTHER, DRAINING = range(1, 9)

_C = Category
# fmt: off
OPEN_FAILURES: dict[Why, Category] = {
    #                      label            retryable socks              wire
    Why.REFUSED:       _C("refused",        False, _CONN_REFUSED,     REFUSED,
                          "connection refused (nothing listens on that port, or a firewall rejects it)"),
    Why.DNS_FAILURE:   _C("dns_failure",    False, _HOST_UNREACHABLE, DNS_FAILURE, "DNS lookup failed"),
    Why.TIMEOUT:       _C("timeout",        False, _TTL_EXPIRED,      TIMEOUT,
                          "no answer (timed out: a firewall or security group may drop the packets)"),
    Why.DENIED:        _C("denied",         False, _NOT_ALLOWED,      DENIED),
    Why.UNREACHABLE:   _C("unreachable",    False, _HOST_UNREACHABLE, UNREACHABLE, "no route to host"),
    Why.OVERLOADED:    _C("overloaded",     True,  _GENERAL,          OVERLOADED),
    Why.OTHER:         _C("other",          False, _GENERAL,          OTHER),
    Why.DRAINING:      _C("draining",       True,  _GENERAL,          DRAINING),
    Why.NO_AGENT:      _C("no_agent",       False, _NET_UNREACHABLE,  OTHER),
    Why.AGENT_TIMEOUT: _C("agent_timeout",  True,  _GENERAL,          OTHER),
    Why.TUNNEL_GONE:   _C("tunnel_gone",    True,  _GENERAL,          OTHER),
    # Counted as tunnel_gone, as when TunnelBusy was a TunnelGone.
    Why.TUNNEL_BUSY:   _C("tunnel_gone",    True,  _GENERAL,          OTHER),
    Why.ERROR:         _C("error",          False, _GENERAL,          OTHER),
}
# fmt: on

# The rows of the reasons an agent sends.
_BY_REASON = {c.wire: why for why, c in OPEN_FAILURES.items() if why.value == c.label and c.wire != OTHER}
_BY_REASON[OTHER] = Why.OTHER


def reason_why(reason: int) -> Why:
    """The row of an OPEN_FAIL reason received from an agent."""
    return _BY_REASON.get(int(reason), Why.OTHER)


class OpenError(NovaError):
    """
    A stream could not be opened.  C{why} is its row of L{OPEN_FAILURES}
    (a class's default, or the instance's own: L{OpenFailed} carries the
    agent's reason).
    """

    why: Why = Why.ERROR

    @property
    def category(self) -> Category:
        return OPEN_FAILURES[self.why]

    @property
    def retryable(self) -> bool:
        """Whether another agent may succeed: the failure says nothing about the target."""
        return self.category.retryable


def _error(failure: Any) -> BaseException:
    """The exception of a Twisted Failure, or the exception itself."""
    value = getattr(failure, "value", failure)
    assert isinstance(value, BaseException)
    return value


def open_failure(failure: Any) -> Category:
    """What a failed open (a Failure or an exception) means, on the server."""
    error = _error(failure)
    return error.category if isinstance(error, OpenError) else OPEN_FAILURES[Why.ERROR]


# An agent's failed connection to a target: the errors of the dial, by class
# name (this module imports no Twisted), first match wins.
DIAL_ERRORS: tuple[tuple[str, Why], ...] = (
    ("nova.rules.destinations.PolicyDenied", Why.DENIED),
    ("twisted.internet.error.DNSLookupError", Why.DNS_FAILURE),
    ("twisted.internet.error.ConnectionRefusedError", Why.REFUSED),
    ("twisted.internet.error.TimeoutError", Why.TIMEOUT),
    ("twisted.internet.error.TCPTimedOutError", Why.TIMEOUT),
    ("twisted.internet.defer.CancelledError", Why.TIMEOUT),
    ("twisted.internet.error.NoRouteError", Why.UNREACHABLE),
)


def _names(error: BaseException) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(error).__mro__}


def dial_failure(failure: Any) -> Category:
    """What an agent's failed connection to a target (a Failure or an exception) means."""
    names = _names(_error(failure))
    for name, why in DIAL_ERRORS:
        if name in names:
            return OPEN_FAILURES[why]
    return OPEN_FAILURES[Why.OTHER]


def describe_dial_error(error: BaseException) -> str:
    """
    One line for a failed connection, for people (C{novac --check}): the
    row's hint where it has one, else the error's own text.  A cancelled
    connection is the check's own deadline, which its step reports.
    """
    if "twisted.internet.defer.CancelledError" not in _names(error):
        category = dial_failure(error)
        if category.wire == DNS_FAILURE:
            return f"{category.hint}: {error}"
        if category.hint:
            return category.hint
    text = str(error).strip()
    return text or type(error).__name__
