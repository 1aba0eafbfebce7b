"""The logs room: the protocol logs (twistd lines and files) and the message tracking log."""

from .csvlog import CsvLog
from .protocol import ProtocolLog

__all__ = ["CsvLog", "ProtocolLog"]
