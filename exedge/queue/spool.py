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
and reads messages back. A message being received is an
L{exedge.queue.incoming.IncomingMessage} until its commit.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import time
from typing import Callable, Iterable

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from exedge.queue.commit_worker import COMMITTED, write_group
from exedge.durable import DirectorySync, fsync_in_turn, make_dirs
from exedge.interfaces import IMessageStore, IStoredMessage

from .batch import Batcher
from .envelope import Envelope
from .incoming import IncomingMessage

FOOTER_MAGIC = b"\n#exedge-envelope "
FOOTER_LEN = len(FOOTER_MAGIC) + 10 + 1   # magic, 10 digits, newline

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
        """The spool's directories, each new one fsync'ed in its parent (a crash must not lose queue/)."""
        for d in (self.incoming_dir, self.queue_dir, self.state_dir, self.corrupt_dir):
            make_dirs(d)

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
