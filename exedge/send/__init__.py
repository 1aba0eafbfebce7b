"""
The send room: delivery agents, one per send connector. This issue brings
the drop-directory agent (Exchange's Foreign connector); SMTP relaying to
smart hosts and MX hosts follows.
"""

from .drop import DropDirectoryAgent

__all__ = ["DropDirectoryAgent"]
