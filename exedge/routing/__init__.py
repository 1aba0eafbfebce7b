"""
The routing room: accepted domains and the choice of send connector for
each recipient. Exchange's rules, written here because Twisted has no
notion of connectors or address-space cost.
"""

from exedge.interfaces import NextHop, Route

from .router import ROUTE_DEFERRED, TOO_LARGE, UNREACHABLE, Router, reroute

__all__ = ["ROUTE_DEFERRED", "NextHop", "Route", "Router", "TOO_LARGE", "UNREACHABLE", "reroute"]
