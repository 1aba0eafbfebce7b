"""
The dequeue room: mail held for sites on intermittent links, released
when they ask for it (ETRN, RFC 1985; ATRN, RFC 2645; TURN), and the ETRN
client with which a site of ours asks its provider.
"""

from .door import Triggers

__all__ = ["Triggers"]
