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

from twisted.logger import Logger

_log = Logger(namespace="exedge.protocol")


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
            self._emit("<", line[:512].decode("ascii", "backslashreplace"))

    def sent(self, data: bytes) -> None:
        if self.verbose:
            self._emit(">", data.decode("ascii", "replace").rstrip("\r\n"))
