"""
Accepted domains and send-connector choice.

For each recipient domain: the most specific address-space match wins
(C{contoso.com} over C{*.contoso.com} over C{*}), then the lowest cost;
disabled connectors and connectors whose size limit the message exceeds are
skipped. No candidate means the unreachable queue, as in Exchange.
"""

from __future__ import annotations

from typing import Iterable

import attrs

from exedge.config import AcceptedDomain, SendConnector
from exedge.interfaces import NextHop, Refusal, Route


UNREACHABLE = NextHop("Unreachable", "")
# connectors serve the domain, but none may carry a message this large
TOO_LARGE = NextHop("(message too large)", "")
# a routing stage said "not now": held until the retry interval has passed
ROUTE_DEFERRED = NextHop("Deferred by routing", "")


@attrs.frozen
class Router:
    accepted_domains: tuple[AcceptedDomain, ...]
    send_connectors: tuple[SendConnector, ...]

    def accepted_domain(self, domain: str) -> AcceptedDomain | None:
        """The accepted domain entry for C{domain}: exact beats wildcard, longer wildcard beats shorter."""
        domain = domain.lower()
        best = None
        best_len = -1
        for entry in self.accepted_domains:
            if entry.matches(domain):
                length = len(entry.domain_name) + (0 if entry.is_wildcard else 1000)
                if length > best_len:
                    best, best_len = entry, length
        return best

    def is_authoritative(self, domain: str) -> bool:
        entry = self.accepted_domain(domain)
        return entry is not None and entry.domain_type == "Authoritative"

    def candidates(self, domain: str, size: int = 0) -> list[SendConnector]:
        """Connectors that could carry mail for C{domain}, best first."""
        return [item[3] for item in self._ranked(domain, size)]

    def fallbacks(self, route: Route) -> list[SendConnector]:
        """
        The connectors that serve C{route}'s domain through an address space
        as specific as its connector's, at the same or a higher cost, best
        first: where its recipients may fail over to while that connector
        is down (Exchange: "the slower connection is used when the faster
        is down"). A less specific space (a "*" connector) is not the same
        address space, and is no fallback.
        """
        if route.connector is None:
            return []
        ranked = self._ranked(route.domain, route.size)
        mine = next((item for item in ranked if item[3] is route.connector), None)
        if mine is None:
            return []
        return [item[3] for item in ranked if item[3] is not route.connector and item[0] == mine[0]
                and item[1] >= mine[1]]

    def _ranked(self, domain: str, size: int) -> list[tuple]:
        """(-specificity, cost, order, connector) of every connector for C{domain}, best first."""
        domain = domain.lower()
        ranked = []
        for order, conn in enumerate(self.send_connectors):
            if not conn.enabled:
                continue
            if conn.max_message_size is not None and size > conn.max_message_size:
                continue
            best = None
            for space in conn.address_spaces:
                length = space.match_length(domain)
                if length is not None and (best is None or (length, -space.cost) > best):
                    best = (length, -space.cost)
            if best is not None:
                ranked.append((-best[0], -best[1], order, conn))
        ranked.sort(key=lambda item: item[:3])
        return ranked

    def route(self, domain: str, size: int = 0) -> Route:
        found = self.candidates(domain, size)
        if not found:
            return Route(TOO_LARGE if size and self.candidates(domain, 0) else UNREACHABLE, domain.lower())
        return Route(NextHop.of(found[0], domain, size), domain.lower(), found[0], tuple(found[1:]), size)

    def next_hop(self, domain: str, size: int = 0) -> NextHop:
        return self.route(domain, size).hop

    def group_by_hop(self, recipients: Iterable[tuple[int, str]], size: int) -> dict[NextHop, list[int]]:
        """Recipients (index, address) that share a next hop travel together."""
        hops: dict[NextHop, list[int]] = {}
        for index, address in recipients:
            domain = address.rpartition("@")[2]
            hops.setdefault(self.next_hop(domain, size), []).append(index)
        return hops


def reroute(route: Route, refuses):
    """
    C{route}, if C{refuses(connector)} has nothing against its connector;
    else the same recipient through the first of its alternatives (best
    first: most specific, then cheapest) that it lets carry the message;
    else a L{Refusal} (5.7.1, an NDR) saying why the chosen one may not.
    The routing-time check of content restrictions and of a send
    connector's delivery restrictions alike.
    """
    why = refuses(route.connector)
    if why is None:
        return route
    for other in route.alternatives:
        if refuses(other) is None:
            return route.via(other)
    return Refusal(f"No send connector may carry this message to {route.domain}: on {route.connector.name}, {why}",
                   "5.7.1")
