"""
Which receive connector serves a connection, and whether it may.

As in Exchange, a connection is served by the enabled connector that has
its local binding (ip:port, or the wildcard address on that port) and
whose RemoteIPRanges contain the peer; when several do, the most specific
range wins (the one covering the fewest addresses), then the exact binding
over the wildcard one.

The table also counts the connector's limits: sessions open
(L{ConnectorTable.admit}, C{max_inbound_connection} and its per-source
twin) and sessions in DATA (L{ConnectorTable.admit_data},
C{max_inbound_data_sessions} and its per-source twin). The second bound is
the memory one: a session in DATA holds its message in memory up to the
spool's spill threshold (L{exedge.queue.incoming.SPILL_THRESHOLD}), so
without it a DATA slowloris (many sessions, each trickling a large
message) makes the server hold sessions x threshold. Exchange has no such
key; its names follow C{MaxInboundConnection}'s.

A bound alone hands the slots to whoever holds them longest: a DATA
slowloris from more addresses than the per-source limit divides into the
connector's keeps every slot. So when a DATA finds the connector's slots
full, the table evicts the session in DATA furthest below the connector's
C{min_inbound_data_rate} (L{exedge.receive.rate}: Postfix's
C{smtpd_min_data_rate} arithmetic), and the newcomer gets its slot, but
only a newcomer whose address holds no slot and has had no session
evicted since it last finished a message. Each part was needed in
bench/slowloris.py (2,000 sessions from 200 addresses): with any newcomer
allowed, the freed slot goes to the first DATA to arrive, which is the
attacker's (1,800 sessions waiting, each sending DATA again every few
seconds, against one normal client), and an attacking address renews its
own slow session's credit; with addresses that hold slots allowed to
evict from ones holding more, one free slot started a chain through all
200 addresses that gave every slot a fresh credit (206 evictions, 15
normal messages in 57); an evicted address holding nothing would evict
the next, and so on. So the marks (a bounded table, L{SLOW_SOURCES},
oldest forgotten first) are cleared by a final dot (a whole message sent:
not trickling); a marked address may still take a free slot.
The per-source limit is not evicted for: reaching it is a source's own
doing.
"""

from __future__ import annotations

import collections
import functools
import ipaddress

from zope.interface import Interface

from exedge.config import ReceiveConnector
from exedge.config.values import Binding


class IDataSession(Interface):
    """A session in DATA as the table sees it when it must choose one to evict."""

    def data_credit() -> float:
        """
        Its data-rate credit now, in seconds (L{exedge.receive.rate.DataRate}):
        <= 0 when it has been sending below C{min_inbound_data_rate};
        infinite when it may not be evicted (the server, not the client,
        stopped reading it).
        """

    def evict_slow() -> None:
        """Answer 421, drop the message and give the slot back (L{ConnectorTable.release_data}) before returning."""


SLOW_SOURCES = 4096     # addresses remembered as evicted for slowness, per table (about 0.5 MB at most)


@functools.lru_cache(maxsize=4096)
def _address(host: str):
    """The address a host string names (cached: each session asks four times, and parsing costs more than the rest of a count)."""
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class ConnectorTable:
    def __init__(self, connectors):
        self.connectors: tuple[ReceiveConnector, ...] = tuple(c for c in connectors if c.enabled)
        self._open = collections.Counter()       # connector name -> sessions
        self._per_source = collections.Counter()  # (connector name, peer ip) -> sessions
        self._selected: dict = {}                  # (local host, port, peer) -> connector
        self._in_data = collections.Counter()          # connector name -> sessions in DATA
        self._in_data_per_source = collections.Counter()  # (connector name, peer ip) -> sessions in DATA
        self._data_sessions: dict = collections.defaultdict(dict)  # connector name -> {IDataSession: source}
        self._slow = collections.OrderedDict()   # (connector name, peer ip) evicted for slowness -> None, oldest first

    def listen_bindings(self) -> list[Binding]:
        """
        The sockets to open: one per distinct binding, except that a
        wildcard binding on a port covers the specific addresses on it.
        """
        bindings = {b for c in self.connectors for b in c.bindings}
        wild = {(b.version, b.port) for b in bindings if b.is_wildcard}
        return sorted(
            (b for b in bindings if b.is_wildcard or (b.version, b.port) not in wild),
            key=lambda b: (b.port, b.host),
        )

    def listen_backlog(self, binding: Binding) -> int:
        """
        The listen(2) backlog of the socket for C{binding} (one of
        L{listen_bindings}): the largest C{listen_backlog} of the connectors
        it serves, so that sharing a socket never shrinks a connector's queue.
        """
        return max(
            c.listen_backlog for c in self.connectors for b in c.bindings
            if b == binding or (binding.is_wildcard and (b.version, b.port) == (binding.version, binding.port))
        )

    def select(self, local_host: str, local_port: int, peer_host: str) -> ReceiveConnector | None:
        """The connector for this listener and peer: most specific remote range wins (cached: peers return)."""
        key = (local_host, local_port, peer_host)
        try:
            return self._selected[key]
        except KeyError:
            pass
        if len(self._selected) >= 4096:
            self._selected.clear()     # bounded: a scan from many addresses cannot grow it
        found = self._selected[key] = self._select(local_host, local_port, peer_host)
        return found

    def _select(self, local_host: str, local_port: int, peer_host: str) -> ReceiveConnector | None:
        local = _address(local_host)
        peer = _address(peer_host)
        best = None
        best_key = None
        for connector in self.connectors:
            exact = None
            for b in connector.bindings:
                if b.port != local_port:
                    continue
                if _address(b.host) == local:
                    exact = True
                elif b.is_wildcard and exact is None:
                    exact = False
            if exact is None:
                continue
            for rng in connector.remote_ip_ranges:
                if peer in rng:
                    key = (rng.size, not exact)
                    if best_key is None or key < best_key:
                        best, best_key = connector, key
        return best

    # -- connection limits -------------------------------------------------

    def admit(self, connector: ReceiveConnector, peer_host: str) -> bool:
        """Count a new session; False if a limit is reached (nothing counted)."""
        source = (connector.name, str(_address(peer_host)))
        if connector.max_inbound_connection is not None \
                and self._open[connector.name] >= connector.max_inbound_connection:
            return False
        if connector.max_inbound_connection_per_source is not None \
                and self._per_source[source] >= connector.max_inbound_connection_per_source:
            return False
        self._open[connector.name] += 1
        self._per_source[source] += 1
        return True

    def release(self, connector: ReceiveConnector, peer_host: str) -> None:
        source = (connector.name, str(_address(peer_host)))
        self._open[connector.name] -= 1
        self._per_source[source] -= 1
        if self._per_source[source] <= 0:
            del self._per_source[source]

    def admit_data(self, connector: ReceiveConnector, peer_host: str, session=None) -> str | None:
        """
        Count a session entering DATA (at its 354): None when counted, else
        the name of the limit reached (nothing counted). Every C{None} is
        matched by one L{release_data} when the data phase ends, however it
        ends (final dot, disconnect, timeout, eviction). C{session} (an
        L{IDataSession}) may be evicted later for a newcomer; a session
        given as None never is. When the connector is full, a slow
        session may be evicted for this one (see the module's docstring).
        """
        source = (connector.name, str(_address(peer_host)))
        if connector.max_inbound_data_sessions_per_source is not None \
                and self._in_data_per_source[source] >= connector.max_inbound_data_sessions_per_source:
            return "max_inbound_data_sessions_per_source"
        if connector.max_inbound_data_sessions is not None \
                and self._in_data[connector.name] >= connector.max_inbound_data_sessions:
            victim = self._slowest(connector, source)
            if victim is None:
                return "max_inbound_data_sessions"
            self._mark_slow(self._data_sessions[connector.name][victim])
            victim.evict_slow()
            if self._in_data[connector.name] >= connector.max_inbound_data_sessions:
                raise RuntimeError("an evicted session kept its DATA slot")
        self._in_data[connector.name] += 1
        self._in_data_per_source[source] += 1
        if session is not None:
            self._data_sessions[connector.name][session] = source
        return None

    def _slowest(self, connector: ReceiveConnector, newcomer: tuple):
        """
        The session to evict for a newcomer from C{newcomer}: below the
        connector's minimum data rate, the lowest credit first (a tie: the
        one in DATA longest); None if there is none, or if the newcomer's
        address holds a slot already or had a session evicted and has not
        finished a message since.
        """
        if not connector.min_inbound_data_rate or newcomer in self._slow or self._in_data_per_source[newcomer]:
            return None
        victim, lowest = None, 0.0
        for session in self._data_sessions[connector.name]:
            credit = session.data_credit()
            if credit <= 0 and (victim is None or credit < lowest):    # a tie: the one in DATA longest
                victim, lowest = session, credit
        return victim

    def _mark_slow(self, source: tuple) -> None:
        self._slow[source] = None
        self._slow.move_to_end(source)
        while len(self._slow) > SLOW_SOURCES:
            self._slow.popitem(last=False)

    def release_data(self, connector: ReceiveConnector, peer_host: str, session=None, finished: bool = False) -> None:
        """
        The data phase of a session counted by L{admit_data} has ended;
        C{finished}: at its final dot (its address may evict again).
        """
        source = (connector.name, str(_address(peer_host)))
        if finished:
            self._slow.pop(source, None)
        self._in_data[connector.name] -= 1
        self._in_data_per_source[source] -= 1
        if self._in_data_per_source[source] <= 0:
            del self._in_data_per_source[source]
        if session is not None:
            self._data_sessions[connector.name].pop(session, None)

    def in_data(self, connector: ReceiveConnector, peer_host: str | None = None) -> int:
        """Sessions in DATA now on C{connector} (from C{peer_host} only, if given): for tests and status."""
        if peer_host is None:
            return self._in_data[connector.name]
        return self._in_data_per_source[(connector.name, str(_address(peer_host)))]
