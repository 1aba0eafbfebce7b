"""
A message on its way into the spool: written while it arrives, edited by
the pipeline's actions, then handed to the committer.

Its data is kept in memory until it passes L{SPILL_THRESHOLD}, then
streamed to C{incoming/<id>} in order on the spool threads, so a 36 MB
message costs neither 36 MB of RAM nor a blocked reactor. Nothing here is
acknowledged: a crash leaves at most a file in C{incoming/}, which
start-up removes (L{exedge.queue.spool}).

What one message in flight holds in memory, however its bytes arrive: less
than L{SPILL_THRESHOLD} in one C{bytearray} (not a list of the pieces
written: a client trickling empty lines makes 2-byte writes, and a Python
object per piece would cost twenty times the bytes), plus, while the disk
is slower than the client, up to L{SPILL_BACKLOG} handed to the spool
threads and not yet written (past it the session stops reading).
"""

from __future__ import annotations

import contextlib
import os
import shutil

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from exedge.interfaces import IIncomingMessage, WireForm

from .envelope import Envelope

log = Logger()

SPILL_THRESHOLD = 512 * 1024
SPILL_BACKLOG = 4 * 1024 * 1024   # unwritten bytes past which the session stops reading
HEAD_WINDOW = 1024 * 1024         # where a streamed header edit looks for the header's end


@attrs.frozen
class CommitRequest:
    """
    A finished message, handed to whoever commits (the commit worker's
    L{exedge.queue.committer.ProcessCommitter}, or L{Spool}'s in-process
    batches): its data in memory, or C{data} None when it spilled to
    C{incoming/<queue_id>}, which then holds all C{length} octets and is
    closed; the committer adds the envelope footer.
    """

    queue_id: str
    envelope: Envelope
    data: bytes | None
    length: int


@implementer(IIncomingMessage)
class IncomingMessage:
    """
    A message being received. Data is kept in memory until it passes
    L{SPILL_THRESHOLD}, then streamed to C{incoming/<id>} in order on the
    spool threads, so a 36 MB message costs neither 36 MB of RAM nor a
    blocked reactor.
    """

    def __init__(self, spool, queue_id: str):
        self.spool = spool
        self.queue_id = queue_id
        self.path = os.path.join(spool.incoming_dir, queue_id)
        self._data = bytearray()          # what is not spilled yet: less than SPILL_THRESHOLD
        self._file = None
        self._tail: defer.Deferred = defer.succeed(None)
        self._closed = False
        self._unwritten = 0
        self._drain_waiters: list = []
        self._spilled_any = False

    def write(self, data: bytes) -> None:
        self._data += data
        if len(self._data) >= SPILL_THRESHOLD:
            self._spill()

    @property
    def in_memory(self) -> int:
        """Octets of this message held in memory and not yet handed to the disk (< SPILL_THRESHOLD)."""
        return len(self._data)

    @property
    def spilled(self) -> bool:
        """Whether part of the message has been handed to the disk (C{incoming/<id>})."""
        return self._spilled_any

    def _spill(self) -> None:
        chunk, self._data = self._data, bytearray()
        size = len(chunk)
        self._spilled_any = True
        self._unwritten += size
        self._tail.addCallback(lambda _: self.spool.run(lambda: self._write_chunks([chunk])))
        self._tail.addBoth(self._spilled, size)

    def _spilled(self, result, size: int):
        self._unwritten -= size
        if not self.backlogged:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter()
        return result

    @property
    def backlogged(self) -> bool:
        """More is waiting for the disk than a session may hold in memory."""
        return self._unwritten > SPILL_BACKLOG

    def when_drained(self, callback) -> None:
        if self.backlogged:
            self._drain_waiters.append(callback)
        else:
            callback()

    def _write_chunks(self, chunks: list) -> None:
        if self._file is None:
            self._file = open(self.path, "w+b")      # "+": pipeline stages may read it back
        self._file.writelines(chunks)

    def read_back(self) -> defer.Deferred:
        """
        Everything written so far (for pipeline stages that need the body):
        from memory for a small message, from the file on a spool thread
        once it has spilled. In order with the writes.
        """
        done = defer.Deferred()

        def step(_):
            held = bytes(self._data)
            if self._file is None:
                done.callback(held)
                return None
            return self.spool.run(lambda: self._read_file() + held).addCallback(done.callback)

        self._tail.addCallback(step)
        self._tail.addErrback(lambda f: (done.errback(f), f)[1])
        return done

    def _read_file(self) -> bytes:
        f = self._file
        f.flush()
        with open(self.path, "rb") as reader:
            return reader.read()

    def rewrite(self, edit) -> defer.Deferred:
        """
        Replace what was written with C{edit.apply(it)} (an
        L{exedge.interfaces.IMessageEdit}: the pipeline's header edits, a
        stripped attachment); fires with the new length.
        The message is not acknowledged yet, so rewriting in place is safe:
        a crash leaves a file in incoming/ that start-up removes.
        """
        done = defer.Deferred()

        def step(_):
            chunks, self._data = [self._data], bytearray()
            if self._file is None:
                data = edit.apply(bytes(chunks[0]))
                self._data = bytearray(data)
                done.callback(len(data))
                return None
            return self.spool.run(lambda: self._rewrite_file(chunks, edit)).addCallback(done.callback)

        self._tail.addCallback(step)
        self._tail.addErrback(lambda f: (done.errback(f), f)[1])
        return done

    def _rewrite_file(self, chunks: list, edit) -> int:
        f = self._file
        f.flush()
        if edit.head_only:
            length = self._rewrite_head(chunks, edit)
            if length is not None:
                return length
        f.seek(0)
        data = edit.apply(f.read() + b"".join(chunks))
        f.seek(0)
        f.truncate()
        f.write(data)
        return len(data)

    def _rewrite_head(self, chunks: list, edit) -> int | None:
        """
        Header edits on a spilled message, streamed: only the header
        section goes through the edit; the rest is copied to a new file
        in 1 MiB pieces, which then replaces the old one. A 35 MB message
        with an added header costs 1 MiB of memory, not 70. None if the
        header section does not end within the first L{HEAD_WINDOW} bytes
        (the caller then transforms it whole, as for a small message).
        """
        f = self._file
        f.seek(0)
        window = f.read(HEAD_WINDOW)
        head = header_section_end(window, edit.prefix_length)
        if head < 0:
            return None
        temp = self.path + ".rewrite"    # in incoming/: start-up removes it after a crash
        out = open(temp, "w+b")
        try:
            out.write(edit.apply(window[:head]))
            f.seek(head)
            shutil.copyfileobj(f, out, 1024 * 1024)
            out.writelines(chunks)
            out.flush()
            os.replace(temp, self.path)
        except BaseException:
            out.close()
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        f.close()
        self._file = out
        return out.tell()

    def commit(self, envelope: Envelope, wire_form: bool = False) -> defer.Deferred:
        """Write, fsync and rename into the queue; fires with L{StoredMessage} (see L{IIncomingMessage})."""
        chunks, self._data = [self._data], bytearray()
        self._closed = True
        d = self._tail
        d.addCallback(self._submit, envelope, chunks, wire_form)
        d.addErrback(self._cleanup_after_failure)
        return d

    def _submit(self, _, envelope: Envelope, chunks: list, wire_form: bool = False):
        """
        The L{CommitRequest} to the committer: at once for a message in
        memory, after a spool thread has closed a spilled one.
        """
        if self._file is None:
            data = (WireForm if wire_form else bytes)(chunks[0])
            return self.spool.receiving.submit(CommitRequest(self.queue_id, envelope, data, len(data)))
        d = self.spool.run(lambda: self._finish_spilled(chunks))
        return d.addCallback(lambda length: self.spool.receiving.submit(
            CommitRequest(self.queue_id, envelope, None, length)))

    def _finish_spilled(self, chunks: list) -> int:
        """
        The last data of a spilled message written and its file closed,
        for the committer to add the footer (spool thread); returns the
        data's length.
        """
        self._write_chunks(chunks)
        f = self._file
        f.flush()
        length = f.tell()
        self._file = None
        f.close()
        return length

    def _cleanup_after_failure(self, failure):
        self.spool.run(self._discard).addErrback(
            lambda f: log.failure("discarding {path}", f, path=self.path))
        return failure

    def abort(self) -> None:
        """Forget the message (the client never got a 250)."""
        if self._closed:
            return
        self._closed = True
        self._data = bytearray()
        # addBoth: after a failed spill (disk full) the partial file must go too
        self._tail.addBoth(lambda _: self.spool.run(self._discard))
        self._tail.addErrback(lambda f: log.failure("discarding {path}", f, path=self.path))

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def header_section_end(data: bytes, start: int = 0) -> int:
    """
    Where the header section that begins at C{start} ends: the offset just
    after its empty line, or -1 if C{data} holds no such line. A message
    may have no header fields at all (it then begins with the empty line).
    """
    if data[start:start + 2] == b"\r\n":
        return start + 2
    end = data.find(b"\r\n\r\n", start)
    return end + 4 if end >= 0 else -1
