"""
What NOVAS tells version-2 agents about its cluster (protocol.md §6.1): its
own id and the ids of the members, from an injected L{MembersProvider}.

The provider is a plain callable so that the cluster's membership view
(L{nova.cluster.membership.ClusterView}) plugs in with one line; the default
is this server alone, and a single server then behaves as before: its agents
hold one tunnel.  Whoever learns of a change calls L{announce_members}; each
version-2 tunnel is sent MEMBERS only when its list changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.application.internet import TimerService
from twisted.logger import Logger

from nova.wire.frames import MAX_CONTROL_PAYLOAD, MAX_MEMBER_ID, MAX_MEMBERS

log = Logger()

# () -> (this server's id, the ids of the cluster's members).
MembersProvider = Callable[[], tuple[str, Iterable[str]]]

# WELCOME's fields before the member list (window, keepalive, server id of up
# to MAX_MEMBER_ID bytes, features, count): what the list must leave room for.
_WELCOME_FIXED = 4 + 4 + 2 + MAX_MEMBER_ID + 4 + 2


def single_server(server_id: str) -> MembersProvider:
    """The provider of a server that is not part of a cluster."""
    return lambda: (server_id, (server_id,))


def current_members(provider: MembersProvider, fallback: str) -> tuple[str, tuple[str, ...]]:
    """
    This server's id and the member list as sent (L{wire_members}).  A
    provider that fails is logged and taken for this server alone: a
    registration never fails because the cluster view did.
    """
    try:
        own, members = provider()
    except Exception:
        log.failure("the cluster's member list could not be read; naming this server alone")
        return fallback, (fallback,)
    return own, wire_members(own, members)


def wire_members(own: str, members: Iterable[str]) -> tuple[str, ...]:
    """
    The list as sent: this server first (always, even if the view lacks it),
    then the others sorted, without duplicates or ids the wire cannot carry,
    trimmed to L{MAX_MEMBERS} and to what fits a WELCOME (an agent then dials
    fewer members than there are, never a malformed frame).
    """
    ids = [own]
    budget = MAX_CONTROL_PAYLOAD - _WELCOME_FIXED - 2 - len(own.encode("utf-8"))
    for member in sorted(set(members) - {own}):
        try:
            size = len(member.encode("utf-8"))
        except UnicodeEncodeError:
            continue
        if not 1 <= size <= MAX_MEMBER_ID or len(ids) >= MAX_MEMBERS or size + 2 > budget:
            continue
        budget -= size + 2
        ids.append(member)
    return tuple(ids)


def announce_members(tunnels: Iterable[object], provider: MembersProvider) -> int:
    """
    Tell every registered tunnel in C{tunnels} the current members (each
    sends MEMBERS only to a version-2 agent, and only if its list changed).
    Returns how many tunnels were asked.
    """
    own, ids = current_members(provider, "")
    if not own:
        return 0  # the provider failed (logged): keep what the agents were told
    n = 0
    for tunnel in tunnels:
        send = getattr(tunnel, "send_members", None)
        if send is not None:
            send(ids)
            n += 1
    return n


# How often the members are compared with what each version-2 agent was
# last told: a third of the default heartbeat interval's order, so a member
# that joins or expires reaches the agents within seconds of the view.
ANNOUNCE_INTERVAL = 2.0


def cluster_members(me: str, servers: Callable[[], Iterable[str]]) -> MembersProvider:
    """The provider over a cluster view: this server and the live members' ids (C{servers})."""
    return lambda: (me, tuple(servers()))


def announcer(
    tunnels: Iterable[object], provider: MembersProvider, interval: float = ANNOUNCE_INTERVAL
) -> TimerService:
    """A service that announces the members to C{tunnels} every C{interval} seconds (only changes are sent)."""
    return TimerService(interval, announce_members, tunnels, provider)
