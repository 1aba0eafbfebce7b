"""
The routing room: accepted domains and the choice of send connector for
each recipient. Exchange's rules, written here because Twisted has no
notion of connectors or address-space cost.
"""

from .router import TOO_LARGE, UNREACHABLE, NextHop, Router

__all__ = ["NextHop", "Router", "TOO_LARGE", "UNREACHABLE"]
