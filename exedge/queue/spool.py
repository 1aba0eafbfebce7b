"""
The durable spool: nothing is acknowledged before it is on disk.

Written here rather than taken from C{twisted.mail.relaymanager.Queue},
which never fsyncs, pickles envelopes and leaves orphans (research §3).

Layout under the spool directory::

    incoming/<id>   being received; never acknowledged; removed at start-up
    queue/<id>      committed: message data, then the envelope as JSON, then
                    a fixed-size footer giving the envelope's length
    state/<id>      per-recipient outcomes, one JSON line each, appended and
                    fsync'ed as delivery goes on

A message is committed when C{incoming/<id>} has been written and fsync'ed,
renamed to C{queue/<id>} and the C{queue} directory fsync'ed. Only then does
the session answer 250. A crash before the rename leaves a file in
C{incoming/} that start-up deletes; a crash after it leaves a complete
message that start-up puts back in its queues. The envelope goes after the
data so a message can stream to disk while it is still arriving.

Disk work runs on a bounded thread pool (C{run}), never on the reactor; in
the server, commits go to the commit worker process instead
(L{exedge.queue.committer}), and the thread pool streams large messages
and reads messages back.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import shutil
import time
from typing import Callable, Iterable

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from exedge.queue.commit_worker import COMMITTED, write_group
from exedge.durable import DirectorySync, fsync_in_turn
from exedge.interfaces import IIncomingMessage, IMessageStore, IStoredMessage

from .batch import Batcher
from .envelope import Envelope

FOOTER_MAGIC = b"\n#exedge-envelope "
FOOTER_LEN = len(FOOTER_MAGIC) + 10 + 1   # magic, 10 digits, newline
SPILL_THRESHOLD = 512 * 1024
SPILL_BACKLOG = 4 * 1024 * 1024   # unwritten bytes past which the session stops reading
HEAD_WINDOW = 1024 * 1024         # where a streamed header edit looks for the header's end

log = Logger()


_ID_PREFIX = secrets.token_hex(2).upper()   # tells this process's ids from another's
_id_counter = itertools.count()


def envelope_footer(envelope: Envelope) -> bytes:
    """What follows a message's data in its queue file: the envelope and the footer giving its length."""
    meta = envelope.to_json()
    return meta + FOOTER_MAGIC + b"%010d\n" % len(meta)


def new_queue_id() -> str:
    """
    Sortable by arrival (microseconds), unique within the process (a
    counter) and across processes (a random prefix drawn once, not a
    random draw per message: that is a system call on the hot path).
    """
    return f"{time.time_ns() // 1000:014X}{_ID_PREFIX}{next(_id_counter) & 0xFFFF:04X}"


RECENT_DATA_BYTES = 32 * 1024 * 1024


class _Held:
    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data: bytes | None = data


class RecentData:
    """
    The data of messages committed moments ago, kept in memory so that their
    first delivery attempt does not read back from disk what was just
    written to it: a trip to a delivery thread and three system calls per
    message, each a wait for the reactor's GIL. Bounded by C{max_bytes}: the
    oldest are forgotten first (their delivery reads the file, as after a
    restart); a message is forgotten as soon as it leaves the spool.
    """

    def __init__(self, max_bytes: int = RECENT_DATA_BYTES):
        self.max_bytes = max_bytes
        self._held: dict[str, _Held] = {}     # insertion order: oldest first
        self._bytes = 0

    def hold(self, queue_id: str, data: bytes) -> _Held | None:
        if len(data) > self.max_bytes // 4:
            return None
        held = self._held[queue_id] = _Held(data)
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            self.release(next(iter(self._held)))
        return held

    def release(self, queue_id: str) -> None:
        held = self._held.pop(queue_id, None)
        if held is not None and held.data is not None:
            self._bytes -= len(held.data)
            held.data = None

    @property
    def size(self) -> int:
        return self._bytes


@implementer(IStoredMessage)
@attrs.frozen
class StoredMessage:
    """A committed message: its id, envelope, and recipients already done."""

    queue_id: str
    envelope: Envelope
    path: str
    data_length: int
    done: frozenset = frozenset()   # recipient indexes with a final outcome
    delay_notified: frozenset = frozenset()   # recipients whose sender had a delay notice
    retry_at: float = 0.0           # not to be tried before this time (a restart keeps the schedule)
    held: _Held | None = attrs.field(default=None, eq=False, repr=False)   # see L{RecentData}

    def pending(self) -> list[int]:
        return [i for i in range(len(self.envelope.recipients)) if i not in self.done]

    def in_memory(self) -> bytes | None:
        """The data if it is still held in memory (L{RecentData}), else None."""
        held = self.held
        return held.data if held is not None else None

    def read_data(self) -> bytes:
        """
        The message bytes (blocking: call on a spool thread). Raw system
        calls: a buffered file object costs three more, each a wait for the
        reactor's GIL.
        """
        data = self.in_memory()
        if data is not None:
            return data
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            parts, left = [], self.data_length
            while left > 0:
                part = os.read(fd, left)
                if not part:
                    raise OSError(f"{self.path}: {left} bytes short of its recorded length")
                parts.append(part)
                left -= len(part)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        finally:
            os.close(fd)


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

    def __init__(self, spool: "Spool", queue_id: str):
        self.spool = spool
        self.queue_id = queue_id
        self.path = os.path.join(spool.incoming_dir, queue_id)
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._file = None
        self._tail: defer.Deferred = defer.succeed(None)
        self._closed = False
        self._unwritten = 0
        self._drain_waiters: list = []

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= SPILL_THRESHOLD:
            self._spill()

    def _spill(self) -> None:
        chunks, size = self._chunks, self._buffered
        self._chunks, self._buffered = [], 0
        self._unwritten += size
        self._tail.addCallback(lambda _: self.spool.run(lambda: self._write_chunks(chunks)))
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

    def _write_chunks(self, chunks: list[bytes]) -> None:
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
            chunks = list(self._chunks)
            if self._file is None:
                done.callback(b"".join(chunks))
                return None
            return self.spool.run(lambda: self._read_file() + b"".join(chunks)).addCallback(done.callback)

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
            chunks, self._chunks, self._buffered = self._chunks, [], 0
            if self._file is None:
                data = edit.apply(b"".join(chunks))
                self._chunks, self._buffered = [data], len(data)
                done.callback(len(data))
                return None
            return self.spool.run(lambda: self._rewrite_file(chunks, edit)).addCallback(done.callback)

        self._tail.addCallback(step)
        self._tail.addErrback(lambda f: (done.errback(f), f)[1])
        return done

    def _rewrite_file(self, chunks: list[bytes], edit) -> int:
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

    def _rewrite_head(self, chunks: list[bytes], edit) -> int | None:
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

    def commit(self, envelope: Envelope) -> defer.Deferred:
        """Write, fsync and rename into the queue; fires with L{StoredMessage}."""
        chunks, self._chunks = self._chunks, []
        self._closed = True
        d = self._tail
        d.addCallback(lambda _: self._finished(envelope, chunks))
        d.addCallback(self.spool.receiving.submit)
        d.addErrback(self._cleanup_after_failure)
        return d

    def _finished(self, envelope: Envelope, chunks: list[bytes]):
        """The L{CommitRequest}: at once for a message in memory, after a spool thread closes a spilled one."""
        if self._file is None:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            return CommitRequest(self.queue_id, envelope, data, len(data))
        d = self.spool.run(lambda: self._finish_spilled(chunks))
        return d.addCallback(lambda length: CommitRequest(self.queue_id, envelope, None, length))

    def _finish_spilled(self, chunks: list[bytes]) -> int:
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
        self._chunks = []
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


@implementer(IMessageStore)
class Spool:
    """
    The spool directory. C{run(f)} executes blocking file work and returns a
    Deferred: a thread pool in the server, the same thread in protocol tests.
    Receiving (commits) and delivery (outcomes, removal) get separate
    runners, as Postfix separates smtpd from its delivery agents, so a
    backlog of deliveries never delays a 250.
    """

    def __init__(self, directory: str, run: Callable[[Callable], defer.Deferred],
                 run_delivery: Callable[[Callable], defer.Deferred] | None = None, *, clock=None,
                 committer=None):
        """
        C{committer(spool)} builds what commits received messages (the
        server's L{exedge.queue.committer.ProcessCommitter}); by default a
        L{Batcher} of L{_commit_batch} on C{run}, for tests in one process.
        """
        self.directory = directory
        self._now = clock.seconds if clock is not None else time.time
        self.run = run
        self.run_delivery = run_delivery or run
        self.incoming_dir = os.path.join(directory, "incoming")
        self.queue_dir = os.path.join(directory, "queue")
        self.state_dir = os.path.join(directory, "state")
        self.corrupt_dir = os.path.join(directory, "corrupt")
        self._queue_sync = DirectorySync(self.queue_dir)
        self.recent = RecentData()
        self._stateful: set[str] = set()    # queue ids that have a state/ file
        self.receiving = committer(self) if committer else Batcher(self.run, self._commit_batch)
        # delivery-side work gives way to receiving (bounded: see Batcher)
        self._remover = Batcher(self.run_delivery, self._remove_batch, 256,
                                defer_to=self.receiving if clock else None, clock=clock)

    def prepare(self) -> None:
        for d in (self.incoming_dir, self.queue_dir, self.state_dir, self.corrupt_dir):
            os.makedirs(d, exist_ok=True)

    def begin(self) -> IncomingMessage:
        return IncomingMessage(self, new_queue_id())

    def _commit_batch(self, items: list) -> list:
        """
        Commit messages together (spool thread), as the commit worker does
        (L{write_group}): write each, fsync each, rename each, then one
        fsync of the queue directory covers them all.
        """
        requests = []
        for item in items:
            footer = envelope_footer(item.envelope)
            if item.data is None:
                requests.append((item.queue_id, footer, True))
            else:
                requests.append((item.queue_id, item.data + footer, False))
        written = write_group(self.incoming_dir, self.queue_dir, self._queue_sync, requests, fsync_in_turn)
        return [result if result is not COMMITTED else
                StoredMessage(item.queue_id, item.envelope, os.path.join(self.queue_dir, item.queue_id), item.length)
                for item, result in zip(items, written)]

    # -- after commit ------------------------------------------------------

    def record(self, message: StoredMessage, indexes: Iterable[int], status: str, detail: str = "",
               *, at: float | None = None, durable: bool = True) -> defer.Deferred:
        """
        Note something about these recipients: a final outcome (delivered,
        failed), "delay-notified", or "retry" with the time of the next try.
        Hints (durable=False) are not fsync'ed: losing one costs an early
        retry after a crash, nothing more.
        """
        line = json.dumps({"rcpts": sorted(indexes), "status": status, "detail": detail,
                           "at": self._now() if at is None else at})
        self._stateful.add(message.queue_id)

        def append():
            with open(os.path.join(self.state_dir, message.queue_id), "ab") as f:
                f.write(line.encode("utf-8") + b"\n")
                if durable:
                    f.flush()
                    os.fsync(f.fileno())

        return self.run_delivery(append)

    def remove(self, message: StoredMessage) -> defer.Deferred:
        """Delete a message whose recipients all have a final outcome."""
        self.recent.release(message.queue_id)
        stateful = message.queue_id in self._stateful
        self._stateful.discard(message.queue_id)
        return self._remover.submit((message, stateful))

    def _remove_batch(self, items: list) -> list:
        for message, stateful in items:
            # a message delivered at the first attempt never had a state file
            paths = (message.path, os.path.join(self.state_dir, message.queue_id)) if stateful else (message.path,)
            for path in paths:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        return [None] * len(items)

    # -- start-up ----------------------------------------------------------

    def recover(self) -> list[StoredMessage]:
        """
        Rebuild the list of committed messages (blocking; called once at
        start-up before any session is served). Unacknowledged partial files
        are deleted; unreadable queue files are moved aside, never deleted.
        """
        self.prepare()
        for name in os.listdir(self.incoming_dir):
            os.unlink(os.path.join(self.incoming_dir, name))
            log.info("spool: removed unacknowledged partial message {name}", name=name)
        messages = []
        for name in sorted(os.listdir(self.queue_dir)):
            path = os.path.join(self.queue_dir, name)
            try:
                message = self._load(name, path)
            except (OSError, ValueError, KeyError, TypeError) as e:
                os.rename(path, os.path.join(self.corrupt_dir, name))
                log.error("spool: moved unreadable {name} to corrupt/: {error}", name=name, error=e)
                continue
            messages.append(message)
        live = {m.queue_id for m in messages}
        for name in os.listdir(self.state_dir):
            if name not in live:
                os.unlink(os.path.join(self.state_dir, name))
            else:
                self._stateful.add(name)
        return messages

    def _load(self, queue_id: str, path: str) -> StoredMessage:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            total = f.tell()
            if total < FOOTER_LEN:
                raise ValueError("too short for a footer")
            f.seek(total - FOOTER_LEN)
            footer = f.read(FOOTER_LEN)
            if not footer.startswith(FOOTER_MAGIC):
                raise ValueError("no envelope footer")
            meta_len = int(footer[len(FOOTER_MAGIC):-1])
            data_length = total - FOOTER_LEN - meta_len
            if data_length < 0:
                raise ValueError("envelope length out of range")
            f.seek(data_length)
            envelope = Envelope.from_json(f.read(meta_len))
        done, delayed, retry_at = self._load_state(queue_id)
        return StoredMessage(queue_id, envelope, path, data_length, done, delayed, retry_at)

    def _load_state(self, queue_id: str) -> tuple[frozenset, frozenset, float]:
        """(recipients with a final outcome, recipients told of a delay, the next retry time)."""
        done: set[int] = set()
        delayed: set[int] = set()
        retry_at = 0.0
        try:
            with open(os.path.join(self.state_dir, queue_id), "rb") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                        rcpts = [int(i) for i in record["rcpts"]]
                        status = record.get("status")
                        if status in ("delivered", "failed"):
                            done.update(rcpts)
                        elif status == "delay-notified":
                            delayed.update(rcpts)
                        elif status == "retry":
                            retry_at = max(retry_at, float(record["at"]))
                    except (ValueError, TypeError, KeyError):
                        # a torn last line: that outcome was never acted on;
                        # anything else unreadable counts as not done, so the
                        # worst case is a second delivery, never none
                        continue
        except FileNotFoundError:
            pass
        return frozenset(done), frozenset(delayed), retry_at
