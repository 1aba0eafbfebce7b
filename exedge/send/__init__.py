"""
The send room: delivery agents, one per send connector. A drop directory
(Exchange's Foreign connector), or SMTP relaying through smart hosts or to
each domain's MX hosts (RelayAgent on exedge's own ESMTP client).
"""

from .drop import DropDirectoryAgent
from .relay import RelayAgent

__all__ = ["DropDirectoryAgent", "RelayAgent"]
