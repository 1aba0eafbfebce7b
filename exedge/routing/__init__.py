"""
The routing room: accepted domains and the choice of send connector for
each recipient. Exchange's rules, written here because Twisted has no
notion of connectors or address-space cost.
"""

from .router import NextHop, Router, UNREACHABLE

__all__ = ["NextHop", "Router", "UNREACHABLE"]
