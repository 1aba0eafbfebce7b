"""
The protocol log, in Exchange's vocabulary: per session, "+" connect,
"-" disconnect, "<" received, ">" sent, "*" information.

Events go through C{twisted.logger} under the namespace
C{exedge.protocol}, so they land wherever twistd sends its log and carry
structured fields (connector, session, event, data) for observers.
Connect (carrying the rights the session got and why: they must be
visible), disconnect and "*" events are always logged. Command traffic is
logged when the connector's protocol_logging_level is Verbose.
"""

from __future__ import annotations

import re

from twisted.logger import Logger

_log = Logger(namespace="exedge.protocol")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def _escaped(line: bytes) -> str:
    """A client's line as the log may show it: control characters (an ESC for a terminal) as \\xNN."""
    if _CONTROL.search(line):
        line = _CONTROL.sub(lambda m: b"\\x%02x" % m.group()[0], line)
    return line.decode("ascii", "backslashreplace")


class ProtocolLog:
    def __init__(self, connector: str, session: str, verbose: bool, local: str, remote: str):
        self.connector = connector
        self.session = session
        self.verbose = verbose
        self.local = local
        self.remote = remote

    def _emit(self, event: str, data: str) -> None:
        # the line is formatted here, once: twisted.logger's formatter costs
        # a lookup per field, and this runs several times per message
        _log.info(
            "{line}", line=f"{self.connector},{self.session},{self.local},{self.remote},{event},{data}",
            connector=self.connector, session=self.session, local=self.local,
            remote=self.remote, event=event, data=data,
        )

    def connect(self, text: str = "") -> None:
        """The session starts; C{text} says what it may do (or why it is refused)."""
        self._emit("+", text)

    def disconnect(self) -> None:
        self._emit("-", "")

    def info(self, text: str) -> None:
        self._emit("*", text)

    def received(self, line: bytes) -> None:
        if self.verbose:
            self._emit("<", _escaped(line[:512]))

    def sent(self, data: bytes) -> None:
        if self.verbose:
            self._emit(">", data.decode("ascii", "replace").rstrip("\r\n"))
