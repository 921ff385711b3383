"""
Is a destination host name acceptable?  One pure check, used by NOVAS before
it opens a stream (a SOCKS domain, a route's host, a TunnelEndpoint's host)
and by NOVAC when an OPEN arrives, so that both sides refuse the same names.

A name that IDNA cannot encode (a label over 63 octets, an empty label) used
to raise inside the agent's resolver, where nothing answered the OPEN; a NUL
in a name cut it short in getaddrinfo, so the agent dialled one host while
the log and audit named another.  Both are refused here, before anything is
resolved or dialled.

The rules are the DNS's: after IDNA (the codec Python's socket module uses
for a host name) every label is 1 to 63 octets and the whole name at most
253; the only empty label allowed is the one after a trailing dot; and no
control, format, separator or whitespace character appears anywhere.  IP
literals (IPv4, IPv6, IPv6 in brackets) are fine.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata

from nova.errors import NovaError

MAX_NAME = 253  # octets of a name in its ASCII form, without the trailing dot (RFC 1035 2.3.4 less the root)
MAX_LABEL = 63  # octets of one label in its ASCII form (RFC 1035 2.3.4)
MAX_INPUT = 1024  # characters looked at in all: anything longer is refused before any work

# Controls (C0, DEL, C1), format characters (bidi overrides, zero-width
# joiners, soft hyphens: IDNA would silently drop some of them), surrogates,
# private use, unassigned, and every kind of separator or space.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})
# The label separators of the IDNA codec (RFC 3490 3.1).
_DOTS = re.compile("[.\u3002\uff0e\uff61]")


class InvalidHostName(NovaError, ValueError):
    """A destination host name that is refused; C{why} says which rule it breaks (no peer text in it)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def _is_ip_literal(host: str) -> bool:
    bracketed = host.startswith("[") and host.endswith("]")
    text = host[1:-1] if bracketed else host
    if bracketed and ":" not in text:
        return False  # brackets are for IPv6 only
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# Every stream asks this of its host on both sides, and a deployment names
# few hosts: the answers are kept (a bounded cache, as peers choose names).
@functools.lru_cache(maxsize=256)
def host_problem(host: str) -> str | None:
    """None if C{host} is an acceptable destination, else the rule it breaks."""
    if not host:
        return "the host name is empty"
    if len(host) > MAX_INPUT:
        return f"the host name is longer than {MAX_INPUT} characters"
    for ch in host:
        if ch.isspace() or unicodedata.category(ch) in _REFUSED_CATEGORIES:
            return "the host name holds a control, format or whitespace character"
    if _is_ip_literal(host):
        return None
    name = host[:-1] if _DOTS.fullmatch(host[-1]) else host
    if not name:
        return "the host name has no label"
    total = 0
    labels = _DOTS.split(name)
    for index, label in enumerate(labels, 1):
        if not label:
            return f"label {index} of the host name is empty"
        try:
            encoded = label.encode("idna")
        except UnicodeError:
            return f"label {index} of the host name is not valid IDNA (or longer than {MAX_LABEL} octets)"
        if not 1 <= len(encoded) <= MAX_LABEL:
            return f"label {index} of the host name is not 1 to {MAX_LABEL} octets long after IDNA"
        if b"." in encoded:  # U+2024 ONE DOT LEADER and the like: nameprep maps them to a dot
            return f"label {index} of the host name holds a character that IDNA turns into a dot"
        total += len(encoded)
    total += len(labels) - 1
    if total > MAX_NAME:
        return f"the host name is {total} octets long after IDNA, more than {MAX_NAME}"
    return None


def check_host(host: str) -> None:
    """Raise L{InvalidHostName} unless C{host} is an acceptable destination."""
    problem = host_problem(host)
    if problem is not None:
        raise InvalidHostName(problem)
