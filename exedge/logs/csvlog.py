"""
Log files in Exchange's CSV style: the protocol logs and the message
tracking log.

Each file starts with Exchange's header lines::

    #Software: exedge
    #Version: 0.1.0
    #Log-type: SMTP Receive Protocol Log
    #Date: 2026-12-07T09:00:00.000Z
    #Fields: date-time,connector-id,...

and then one row per event, written by Python's C{csv} module (commas,
quotes and the like quoted as RFC 4180 says), UTF-8. Control characters
(C0, DEL, C1, the Unicode line separators) are written as C{\\xNN} or
C{\\uNNNN}: a row is always one line, and nothing a client sends can move
a terminal's cursor or forge a row for a line-based reader.

Files are named as Exchange names them, a prefix, the UTC day and a
sequence number (C{RECV20261207-1.LOG}); a new file begins at
C{max_file_size}, on a new day, and at every start (so a header's
C{#Date} is the start of what follows it). Retention is Exchange's:
files older than C{max_age} go, then the oldest while the directory is
larger than C{max_directory_size}.

Why written here and not with the standard library's rotating handler:
that one is for C{logging}, blocks on every record, knows no header, and
rotates by renaming files a reader may hold open. Here rows are kept in
memory and written by a short timer (C{flush_interval}, a
C{task.LoopingCall} on the injected clock) and at stop (after which each
row is written at once, for the sessions the reactor closes last): one C{write(2)} of
a few kilobytes per second into the page cache, no fsync (a log is not
the spool: what the last second held may be lost in a power cut, never a
message), so the reactor never waits on the disk for an event. Deleting
old files lists and stats a whole directory, so it runs on a thread
(C{run}), on its own slower timer.
"""

from __future__ import annotations

import csv
import datetime
import io
import math
import os
import re

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

import exedge
from exedge.logs.text import StampCache

log = Logger()

FLUSH_INTERVAL = 1.0       # seconds rows wait in memory at most
CLEANUP_INTERVAL = 3600.0  # seconds between looks for files to delete

_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(value) -> str:
    """C{value} as text one row may hold: control characters as \\xNN (\\uNNNN past Latin-1)."""
    text = "" if value is None else str(value)
    if _CONTROLS.search(text):
        text = _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                             else f"\\u{ord(m.group()):04x}", text)
    return text


def _second_text(whole: float) -> str:
    return datetime.datetime.fromtimestamp(whole, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.")


_seconds = StampCache(_second_text)      # the text up to the second, formatted once a second


def iso_time(seconds: float) -> str:
    """
    Exchange's date-time: ISO 8601 in UTC with milliseconds, "2026-12-07T09:00:00.123Z".

    Every row of every CSV log starts with one, several rows per message:
    the text up to the second is formatted once a second, and the
    milliseconds are those C{datetime.fromtimestamp} would give (its
    microseconds rounded half to even, carried into the second).
    """
    fraction, whole = math.modf(seconds)
    micro = round(fraction * 1e6)
    if micro >= 1_000_000:
        whole, micro = whole + 1, micro - 1_000_000
    elif micro < 0:
        whole, micro = whole - 1, micro + 1_000_000
    return f"{_seconds(whole)}{micro // 1000:03d}Z"


def _day(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y%m%d")


class CsvLog(Service):
    """
    One log directory: rows of C{fields} (the first is always
    C{date-time}, stamped here from C{clock}) in files C{PREFIXyyyymmdd-N.LOG}.

    C{run(f)}: runs the retention sweep off the reactor thread (a Deferred of
    C{f()}; by default the reactor's thread pool).
    """

    def __init__(self, directory: str, prefix: str, log_type: str, fields, *, clock,
                 max_file_size: int = 10 * 1024**2, max_age: float = 30 * 86400.0,
                 max_directory_size: int | None = 250 * 1024**2, flush_interval: float = FLUSH_INTERVAL,
                 cleanup_interval: float = CLEANUP_INTERVAL, run=None):
        self.directory = directory
        self.prefix = prefix
        self.log_type = log_type
        self.fields = tuple(fields)
        self.clock = clock
        self.max_file_size = max_file_size
        self.max_age = max_age
        self.max_directory_size = max_directory_size
        self.flush_interval = flush_interval
        self.cleanup_interval = cleanup_interval
        self.run = run
        self._rows: list[str] = []
        self._file = None
        self._path: str | None = None
        self._day = ""
        self._size = 0
        self._header_size = 0
        self._stopped = False
        self._flusher = None
        self._cleaner = None
        self._line = io.StringIO()
        self._writer = csv.writer(self._line, lineterminator="\r\n")

    @property
    def path(self) -> str | None:
        """The file being written now (None before the first row)."""
        return self._path

    # -- writing -------------------------------------------------------------

    def write(self, values) -> None:
        """One row: C{values} for every field after date-time, in order; control characters escaped."""
        texts = ["" if v is None else str(v) for v in values]
        if _CONTROLS.search("".join(texts)):
            # rare: the whole row is searched once (23 values a tracking row,
            # several rows a message), and only a row with a control escaped value by value
            texts = [escape(t) for t in texts]
        self._writer.writerow([iso_time(self.clock.seconds())] + texts)
        self._rows.append(self._line.getvalue())
        self._line.seek(0)
        self._line.truncate()
        if self._stopped:
            # the server is shutting down: the connections it closes now still log their end
            self.flush()

    def flush(self) -> None:
        """Write the rows kept so far (the timer's and stop's call); a failing disk costs rows, never the server."""
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        try:
            for row in rows:
                data = row.encode("utf-8", "backslashreplace")
                if self._file is None or self._size + len(data) > self.max_file_size and self._size > self._header_size \
                        or _day(self.clock.seconds()) != self._day:
                    self._open()
                self._file.write(data)
                self._size += len(data)
            self._file.flush()
        except OSError as e:
            log.error("{log_type}: cannot write {path}: {error}; {count} row(s) lost",
                      log_type=self.log_type, path=self._path or self.directory, error=e.strerror, count=len(rows))
            self._close()

    def _open(self) -> None:
        """The next file: today's next sequence number, its header first."""
        self._close()
        now = self.clock.seconds()
        self._day = _day(now)
        os.makedirs(self.directory, mode=0o750, exist_ok=True)
        stem = f"{self.prefix}{self._day}-"
        numbers = [int(n[len(stem):-4]) for n in os.listdir(self.directory)
                   if n.startswith(stem) and n.endswith(".LOG") and n[len(stem):-4].isdigit()]
        self._path = os.path.join(self.directory, f"{stem}{max(numbers, default=0) + 1}.LOG")
        header = (f"#Software: exedge\r\n#Version: {exedge.__version__}\r\n#Log-type: {self.log_type}\r\n"
                  f"#Date: {iso_time(now)}\r\n#Fields: {','.join(self.fields)}\r\n").encode("utf-8")
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self._file = os.fdopen(fd, "ab")
        self._file.write(header)
        self._header_size = self._size = len(header)

    def _close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    # -- retention -----------------------------------------------------------

    def cleanup(self) -> defer.Deferred:
        """Delete what retention says (on C{run}'s thread); fires with the names deleted."""
        keep = self._path
        now = self.clock.seconds()
        if self.run is None:
            from twisted.internet import reactor, threads
            d = threads.deferToThreadPool(reactor, reactor.getThreadPool(), self._expire, keep, now)
        else:
            d = self.run(lambda: self._expire(keep, now))

        def failed(f):
            log.failure("{log_type}: retention sweep of {dir}", f, log_type=self.log_type, dir=self.directory)
            return []
        return d.addErrback(failed)

    def _expire(self, keep: str | None, now: float) -> list[str]:
        """Files older than max_age, then the oldest while the directory is over max_directory_size."""
        try:
            names = [n for n in os.listdir(self.directory) if n.startswith(self.prefix) and n.endswith(".LOG")]
        except FileNotFoundError:
            return []
        files = []
        for n in names:
            path = os.path.join(self.directory, n)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, n, path, st.st_size))
        files.sort()
        deleted = []
        total = sum(f[3] for f in files)
        for mtime, n, path, size in files:
            if path == keep:
                continue
            too_old = now - mtime > self.max_age
            too_big = self.max_directory_size is not None and total > self.max_directory_size
            if not (too_old or too_big):
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            total -= size
            deleted.append(n)
        return deleted

    # -- the service ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        self._flusher = task.LoopingCall(self.flush)
        self._flusher.clock = self.clock
        self._flusher.start(self.flush_interval, now=False)
        self._cleaner = task.LoopingCall(self.cleanup)
        self._cleaner.clock = self.clock
        self._cleaner.start(self.cleanup_interval, now=True)

    def stopService(self):
        super().stopService()
        for call in (self._flusher, self._cleaner):
            if call is not None and call.running:
                call.stop()
        self._stopped = True
        self.flush()        # the file stays open for the rows of connections closed at shutdown
