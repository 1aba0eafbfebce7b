"""
What the main process and its child processes share: the receive workers
(L{exedge.receive.workers}) and the delivery process (L{exedge.send.process}).

A child is started with C{spawnProcess} and speaks on its standard streams:

  - frames on stdin (main to child) and stdout (child to main): a kind
    byte, a payload length, the payload (L{frame}, L{take_control_frames});
  - its twistd log lines on stderr, one per line, "level<TAB>text" with
    control characters escaped (L{StderrLog} in the child, L{ChildLog} in
    the main process, which writes them into the one log).

Written here rather than taken from C{twisted.protocols.amp}: AMP's
values are capped at 64 KiB (a message's data travels in one frame), and
every box costs a dict of byte strings to build and parse, where these
frames cost one C{struct} call each way.
"""

from __future__ import annotations

import json
import struct
import sys
import threading

from twisted.internet import protocol
from twisted.logger import Logger, formatEvent
from twisted.python import threadable

from exedge.logs.csvlog import escape
from exedge.logs.literal import literal
from exedge.queue.commit_worker import take_frames

log = Logger()

# kind, payload length, payload
FRAME = struct.Struct("!BI")
MAX_FRAME = 64 * 1024 * 1024


def frame(kind: int, payload: bytes = b"") -> bytes:
    return FRAME.pack(kind, len(payload)) + payload


def take_control_frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """The complete frames at the start of C{buffer}, removed; ValueError for a frame too long to be ours."""
    if len(buffer) >= FRAME.size and FRAME.unpack_from(buffer)[1] > MAX_FRAME:
        raise ValueError("control frame over the size limit")
    return [(kind, payload) for (kind, _), (payload,) in take_frames(buffer, FRAME, 1)]


def to_json(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


class Channel(protocol.Protocol):
    """
    The child's stdin/stdout: frames to and from the main process. C{owner}
    has C{told(kind, payload)}, C{main_gone()} and C{shut_down()}.
    """

    def __init__(self, owner):
        self.owner = owner
        self.buffer = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        try:
            frames = take_control_frames(self.buffer)
        except ValueError:
            log.error("unreadable frame from the main process; stopping")
            return self.owner.shut_down()
        for kind, payload in frames:
            self.owner.told(kind, payload)

    def send(self, kind: int, payload: bytes = b"") -> None:
        if self.transport is not None:
            self.transport.write(frame(kind, payload))

    def connectionLost(self, reason=None) -> None:
        self.owner.main_gone()


class StderrLog:
    """
    A child's log observer: one line per event on stderr, "level<TAB>text",
    control characters escaped; a failure's traceback after it.

    The lines of one turn of the reactor go out in one write. A session
    logs three or four lines per message, and a write each cost a system
    call here and a wake-up of the main process, which reads them (py-spy,
    two workers, 10 connections: 2-3 % of a worker's samples in those
    writes alone). An error, a failure, or a line from another thread
    or with the reactor stopped is written at once, after what waits, so a
    child about to die leaves its last words.
    """

    def __init__(self, reactor, stream=None):
        self.reactor = reactor
        self.stream = stream
        self._pending: list[str] = []
        self._scheduled = False
        self._lock = threading.Lock()

    def __call__(self, event) -> None:
        level = event.get("log_level")
        name = level.name if level is not None else "info"
        lines = [f"{name}\t{escape(formatEvent(event))}"]
        failure = event.get("log_failure")
        if failure is not None:
            lines += [f"error\t{escape(line)}" for line in failure.getTraceback().splitlines()]
        urgent = (failure is not None or name in ("error", "critical") or not self.reactor.running
                  or not threadable.isInIOThread())
        with self._lock:
            self._pending += lines
            if urgent:
                return self._write()
            if self._scheduled:
                return
            self._scheduled = True
        self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        with self._lock:
            self._write()

    def _write(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        text, self._pending = "\n".join(self._pending) + "\n", []
        stream = self.stream or sys.__stderr__
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            pass


class ChildLog:
    """
    The main process's side of L{StderrLog}: a child's stderr, line by line,
    into this process's log, each line prefixed with C{name} ("receive
    worker 2"); C{fields} are added to every event. The text is escaped
    again here: the child is trusted to frame, not to be well-behaved.
    """

    def __init__(self, name: str, **fields):
        self.name = name
        self.fields = fields
        self.buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer += data
        *lines, rest = bytes(self.buffer).split(b"\n")
        self.buffer = bytearray(rest[-65536:])
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if not line.strip():
                continue
            level, _, text = line.partition("\t")
            line, text = escape(line), escape(text)
            if level in ("info", "debug"):
                log.info(literal(f"{self.name}: {text}"), text=text, **self.fields)
            elif level == "warn":
                log.warn(literal(f"{self.name}: {text}"), text=text, **self.fields)
            else:
                log.error("{child}: {text}", child=self.name, text=text if text else line, **self.fields)

    def flush(self) -> None:
        """What is left without its newline (the child ended)."""
        if self.buffer:
            self.feed(b"\n")
