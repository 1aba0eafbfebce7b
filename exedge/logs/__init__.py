"""The logs room: the protocol log (and, later, message tracking)."""

from .protocol import ProtocolLog

__all__ = ["ProtocolLog"]
