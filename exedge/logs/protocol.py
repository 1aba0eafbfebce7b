"""
The protocol log, in Exchange's vocabulary: per session, "+" connect,
"-" disconnect, "<" received, ">" sent, "*" information.

Events go through C{twisted.logger} under the namespace
C{exedge.protocol}, so they land wherever twistd sends its log and carry
structured fields (connector, session, event, data) for observers.
Connect (carrying the rights the session got and why: they must be
visible), disconnect and "*" events are always logged. Command traffic is
logged when the connector's protocol_logging_level is Verbose.

A Verbose connector's sessions are also written to Exchange's protocol
log files: C{file}, a L{exedge.logs.csvlog.CsvLog} with L{FIELDS}, is
given to the session's log by whoever builds it (the receive session
from its server context, the relay agent for its client sessions). A sink
passed in, rather than an observer of the twistd log, because the files
are a product people parse: each row needs the session's own sequence
number and endpoints, and must not depend on what else observes twistd's
log or on its log level.
"""

from __future__ import annotations

import itertools
import re
import time

from twisted.logger import Logger

from .literal import literal

_log = Logger(namespace="exedge.protocol")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")

# Exchange's protocol log fields (date-time is stamped by the file)
FIELDS = ("date-time", "connector-id", "session-id", "sequence-number", "local-endpoint",
          "remote-endpoint", "event", "data", "context")

_session_counter = itertools.count()
_SESSION_EPOCH = int(time.time()) & 0xFFFFFFFF


def new_session_id() -> str:
    """
    16 hex digits, as Exchange's protocol log shows them (both directions): this process's
    start second and a counter, unique across restarts and sessions without
    a random draw (a system call) per connection.
    """
    return f"{_SESSION_EPOCH:08X}{next(_session_counter) & 0xFFFFFFFF:08X}"


def reserve_session_ids(part: int) -> None:
    """
    Receive workers (exedge/receive/workers.py) are processes started in
    the same second: each takes its ids from its own part of the counter
    (part 0, the default, is the main process's), 128 parts of 2**25.
    """
    global _session_counter
    _session_counter = itertools.count((part & 0x7F) << 25)


RECEIVE_LOG_TYPE = "SMTP Receive Protocol Log"
SEND_LOG_TYPE = "SMTP Send Protocol Log"


def _escaped(line: bytes) -> str:
    """A client's line as the log may show it: control characters (an ESC for a terminal) as \\xNN."""
    if _CONTROL.search(line):
        line = _CONTROL.sub(lambda m: b"\\x%02x" % m.group()[0], line)
    return line.decode("ascii", "backslashreplace")


class ProtocolLog:
    def __init__(self, connector: str, session: str, verbose: bool, local: str, remote: str, file=None):
        self.connector = connector
        self.session = session
        self.verbose = verbose
        self.local = local
        self.remote = remote
        self.file = file if verbose else None
        self.sequence = 0            # rows of this session in the file, from 0 as Exchange counts

    def _emit(self, event: str, data: str) -> None:
        # the line is formatted here, once, and given as its own format
        # (exedge.logs.literal): this runs several times per message
        _log.info(
            literal(f"{self.connector},{self.session},{self.local},{self.remote},{event},{data}"),
            connector=self.connector, session=self.session, local=self.local,
            remote=self.remote, event=event, data=data,
        )
        if self.file is not None:
            self._row(event, data)

    def _row(self, event: str, data: str) -> None:
        self.file.write((self.connector, self.session, self.sequence, self.local, self.remote, event, data, ""))
        self.sequence += 1

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
        if not self.verbose:
            return
        text = data.decode("ascii", "replace").rstrip("\r\n")
        if self.file is None or "\n" not in text:
            return self._emit(">", text)
        # a multi-line reply written at once: one twistd line as before, one row per line in the file
        file, self.file = self.file, None
        try:
            self._emit(">", text)
        finally:
            self.file = file
        for line in text.split("\n"):
            self._row(">", line.rstrip("\r"))
