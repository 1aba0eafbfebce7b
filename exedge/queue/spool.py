"""
The durable spool: nothing is acknowledged before it is on disk.

Written here rather than taken from C{twisted.mail.relaymanager.Queue},
which never fsyncs, pickles envelopes and leaves orphans (research §3).

Layout under the spool directory::

    incoming/<id>   being received; never acknowledged; removed at start-up
    incoming/spare-<pid>-<n>
                    a file the commit worker made ahead for a message to
                    come (commit_worker.Spares): new and empty, or a
                    recycled one, still holding its old bytes; removed at
                    start-up
    incoming/recycled-<slot>
                    a delivered message's file, renamed here instead of
                    unlinked for a commit worker to reuse as a spare,
                    written over by the next message (commit_worker's
                    "Recycled files"); removed at start-up
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

import errno
import itertools
import json
import os
import secrets
import sys
import time
from typing import Callable, Iterable, Iterator

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from exedge.queue.commit_worker import COMMITTED, RECYCLED_PREFIX, SPARE_PREFIX, write_group
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


def still_named(fd: int, path: str) -> None:
    """
    FileNotFoundError unless C{path} still names the file open as C{fd}.
    A reader of a queue file calls it after reading: a delivered message's
    file is recycled (L{Spool._remove_batch}) and may be holding another
    message by now, so what was read from a file that has lost its name
    may not be this message's. Its name goes before anything of it is
    reused, so a file that still has it was this message's while it was
    read.
    """
    if os.stat(path).st_ino != os.fstat(fd).st_ino:
        raise FileNotFoundError(errno.ENOENT, "removed while it was read", path)


def read_footer(f, path: str) -> tuple[int, Envelope]:
    """
    L{read_envelope} of the queue file C{path} open as C{f}, checked with
    L{still_named}: also when the footer does not parse, since a file
    half written over by another message has none.
    """
    try:
        result = read_envelope(f)
    except ValueError:
        still_named(f.fileno(), path)
        raise
    still_named(f.fileno(), path)
    return result


RECENT_DATA_BYTES = 32 * 1024 * 1024
# delivered messages are removed in batches of up to this many, or after this many seconds
REMOVALS_GATHERED = 32
REMOVAL_WAIT = 0.1
# a delivered message's file of at most this many bytes is recycled (commit_worker's "Recycled
# files") into one of this many slots; a larger one is unlinked: what waits in the slots is
# bounded by their product, and cutting a large file down costs what a new one would
RECYCLE_AT_MOST = 256 * 1024
RECYCLED_SLOTS = 64

# one empty set for every message with no outcome yet: CPython makes a new
# empty frozenset per call, 216 bytes for each of a million queued messages
NONE_DONE = frozenset()


class _Held:
    __slots__ = ("data", "envelope")

    def __init__(self, data: bytes):
        self.data: bytes | None = data
        self.envelope: Envelope | None = None   # given by the StoredMessage it belongs to


class RecentData:
    """
    The data of messages committed moments ago, kept in memory so that their
    first delivery attempt does not read back from disk what was just
    written to it: a trip to a delivery thread and three system calls per
    message, each a wait for the reactor's GIL. Their parsed envelopes stay
    with them, for the same reason (L{StoredMessage}), and each entry is
    counted as its data plus L{ENTRY_BYTES} for the envelope and the entry
    (about 0.7 KiB with one recipient, by tracemalloc): without that, a
    flood of tiny messages would hold several envelopes per counted KiB.
    Bounded by C{max_bytes}: the oldest are forgotten first (their delivery reads the file, as after a
    restart); a message is forgotten as soon as it leaves the spool, or
    waits where no attempt will take it soon (the queue manager's
    L{StoredMessage.compact}).
    """

    ENTRY_BYTES = 1024

    def __init__(self, max_bytes: int = RECENT_DATA_BYTES):
        self.max_bytes = max_bytes
        self._held: dict[str, _Held] = {}     # insertion order: oldest first
        self._bytes = 0

    def hold(self, queue_id: str, data: bytes) -> _Held | None:
        if len(data) > self.max_bytes // 4:
            return None
        held = self._held[queue_id] = _Held(data)
        self._bytes += len(data) + self.ENTRY_BYTES
        while self._bytes > self.max_bytes:
            self.release(next(iter(self._held)))
        return held

    def release(self, queue_id: str) -> None:
        held = self._held.pop(queue_id, None)
        if held is not None and held.data is not None:
            self._bytes -= len(held.data) + self.ENTRY_BYTES
            held.data = held.envelope = None

    @property
    def size(self) -> int:
        """What the held entries count for: their data and L{ENTRY_BYTES} each."""
        return self._bytes


def read_envelope(f) -> tuple[int, Envelope]:
    """(the data's length, the envelope) from an open queue file (blocking): the footer, then the JSON it points at."""
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
    return data_length, Envelope.from_json(f.read(meta_len))


@implementer(IStoredMessage)
class StoredMessage:
    """
    A committed message as the queue keeps it: a compact record.

    A million may wait in the queues at once, so what every waiting
    message holds is only what the queue manager needs without its
    envelope (measured with tracemalloc over a recovery of 20,000 queued
    messages: the parsed envelope was 712 of 1,214 bytes per message, the
    record and its path 305, the queue's entries the rest): the id, the
    data's length, the size, the arrival time, the number of recipients,
    the outcomes known at load, and the spool directory shared by all (the
    path is made when asked). The parsed L{Envelope} is kept only

     - while something uses it: L{pin} (an attempt, a report, routing) and
       L{unpin}; the last unpin drops it;
     - from the commit or the read-back until the queue has routed the
       message (L{compact} after that drops it unless pinned);
     - while the message's data is held in L{RecentData} (just committed,
       bounded in bytes: the first attempt of new mail reads nothing back).

    Otherwise it is read back from the file's footer when needed: on a
    delivery thread by the queue manager (L{read_envelope}, as Postfix's
    qmgr reads a queue file when it makes a message active), or, for
    what still asks C{envelope} of a compact message (the admins'
    listings), straight away and not kept.

    Not attrs: a plain class with C{__slots__} has no per-instance dict
    and no weakref slot, and compares by identity (a queue's items are
    told apart by the message they hold, never by value).
    """

    __slots__ = ("queue_id", "_dir", "data_length", "size", "received_at", "recipient_count",
                 "done", "_later", "held", "_envelope", "_pins")

    def __init__(self, queue_id: str, envelope: Envelope, path: str, data_length: int,
                 done: frozenset = NONE_DONE, delay_notified: frozenset = NONE_DONE, retry_at: float = 0.0,
                 held: _Held | None = None):
        directory, name = os.path.split(path)
        if name != queue_id:
            raise ValueError(f"a queue file is named by its id: {path!r} is not {queue_id!r}")
        self.queue_id = queue_id
        self._dir = sys.intern(directory)       # one string for every message of the spool
        self.data_length = data_length
        # the same int object when they agree (they do unless a stage's edit was not counted): no second int
        self.size = data_length if envelope.size == data_length else envelope.size
        self.received_at = envelope.received_at
        self.recipient_count = len(envelope.recipients)
        # recipient indexes with a final outcome (at load; the queue manager keeps it up to date)
        self.done = done
        # (recipients whose sender had a delay notice, the next retry time) as a state file left
        # them: one slot, and most messages have neither
        self._later = (delay_notified, retry_at) if delay_notified or retry_at else None
        self.held = held                        # see L{RecentData}
        if held is not None and held.data is not None:
            held.envelope = envelope
        self._envelope: Envelope | None = envelope
        self._pins = 0

    def __repr__(self) -> str:
        return f"<StoredMessage {self.queue_id} {self.recipient_count} rcpt(s) {self.data_length} octets>"

    @property
    def delay_notified(self) -> frozenset:
        """Recipients whose sender had a delay notice (from the state file)."""
        return self._later[0] if self._later is not None else NONE_DONE

    @property
    def retry_at(self) -> float:
        """Not to be tried before this time (a restart keeps the schedule)."""
        return self._later[1] if self._later is not None else 0.0

    @property
    def path(self) -> str:
        return os.path.join(self._dir, self.queue_id)

    def pending(self) -> list[int]:
        return [i for i in range(self.recipient_count) if i not in self.done]

    # -- the envelope --------------------------------------------------------

    @property
    def envelope(self) -> Envelope:
        """
        The envelope: the one in memory, else read from the file now
        (blocking) and not kept. The queue manager pins it first
        (L{read_envelope} on a delivery thread, then L{pin}); this
        fallback is for the admins' listings.
        """
        envelope = self.loaded_envelope()
        return envelope if envelope is not None else self.read_envelope()

    def loaded_envelope(self) -> Envelope | None:
        """The parsed envelope if it is in memory (never blocks), else None: the message is compact."""
        if self._envelope is not None:
            return self._envelope
        held = self.held
        return held.envelope if held is not None else None

    def read_envelope(self) -> Envelope:
        """The envelope as the file's footer has it (blocking: call on a spool thread)."""
        path = self.path
        with open(path, "rb") as f:
            return read_footer(f, path)[1]

    def pin(self, envelope: Envelope | None = None) -> None:
        """
        Keep the envelope in memory until as many L{unpin}s: the one
        loaded, else C{envelope} (from L{read_envelope}). ValueError when
        there is neither.
        """
        if self._envelope is None:
            self._envelope = self.loaded_envelope() or envelope
            if self._envelope is None:
                raise ValueError(f"{self.queue_id}: no envelope to pin; read it first")
        self._pins += 1

    def unpin(self) -> None:
        self._pins -= 1
        if self._pins <= 0:
            self._pins = 0
            self._envelope = None

    def compact(self) -> None:
        """Drop the envelope unless something pinned it (or RecentData still holds it with the data)."""
        if self._pins == 0:
            self._envelope = None
        if self.held is not None and self.held.data is None:
            self.held = None        # RecentData let it go: nothing left in it

    # -- the data --------------------------------------------------------------

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
        path = self.path
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            parts, left = [], self.data_length
            while left > 0:
                part = os.read(fd, left)
                if not part:
                    still_named(fd, path)       # a file reused meanwhile is shorter: say it is gone
                    raise OSError(f"{path}: {left} bytes short of its recorded length")
                parts.append(part)
                left -= len(part)
            still_named(fd, path)
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
                 committer=None, recycle: bool = False):
        """
        C{committer(spool)} builds what commits received messages (the
        server's L{exedge.queue.committer.ProcessCommitter}); by default a
        L{Batcher} of L{_commit_batch} on C{run}, for tests in one process.
        C{recycle}: delivered messages' files go to C{incoming/recycled-*}
        for the commit workers to reuse (only where commit workers take
        them: nothing else would).
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
        # ids begun while recovery reads queue/ (None when it does not): see L{start_recovery}
        self._new: set[str] | None = None
        # the arrival stamp of the first id recovery must not meet (see L{claim_recovered}), and the
        # ids at or past it that recovery announced before their committer named them
        self._mark: str | None = None
        self._raced: set[str] = set()
        self._recycle = recycle
        self._recycled = 0                  # slots filled so far, round the ring
        self.receiving = committer(self) if committer else Batcher(self.run, self._commit_batch)
        # delivery-side work gives way to receiving (bounded: see Batcher), and removals are
        # gathered: a hand-off to the delivery thread per delivered message cost more than its
        # unlink (the thread's wake-up and its turns at the GIL beside the reactor); gathered,
        # 1 KiB relayed at one connection went 1.01-1.17x (bench/README.md, "Removals gathered")
        self._remover = Batcher(self.run_delivery, self._remove_batch, 256,
                                defer_to=self.receiving if clock else None, clock=clock,
                                gather=REMOVALS_GATHERED, gather_wait=REMOVAL_WAIT)

    def prepare(self) -> None:
        """The spool's directories, each new one fsync'ed in its parent (a crash must not lose queue/)."""
        for d in (self.incoming_dir, self.queue_dir, self.state_dir, self.corrupt_dir):
            make_dirs(d)

    def begin(self) -> IncomingMessage:
        queue_id = new_queue_id()
        self.note_begun(queue_id)
        return IncomingMessage(self, queue_id)

    def note_begun(self, queue_id: str) -> None:
        """
        A message is being committed into queue/ by someone who will
        announce it (this process's cleanup, or a receive worker process):
        recovery, if it is running, must not announce it too.
        """
        if self._new is not None:
            self._new.add(queue_id)

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
        d = self._remover.submit((message, stateful))
        if self._new is not None:
            # once its file is gone recovery cannot meet it: forget it then, not before
            d.addCallback(self._forget_new, message.queue_id)
        return d

    def flush_removals(self) -> defer.Deferred:
        """
        Remove now what waits to be removed (L{remove} gathers them): at a
        stop, so that what was delivered is not delivered again after the
        restart. Fires when done.
        """
        return self._remover.flush()

    def _forget_new(self, result, queue_id: str):
        if self._new is not None:
            self._new.discard(queue_id)
        return result

    def _remove_batch(self, items: list) -> list:
        for message, stateful in items:
            self._remove_file(message)
            if stateful:        # a message delivered at the first attempt never had a state file
                try:
                    os.unlink(os.path.join(self.state_dir, message.queue_id))
                except FileNotFoundError:
                    pass
        return [None] * len(items)

    def _remove_file(self, message: StoredMessage) -> None:
        """
        Take C{message}'s file out of queue/: renamed to a recycled slot
        in incoming/ where it may be reused (see RECYCLE_AT_MOST), else
        unlinked. Either way it is gone from queue/ at once, which is all
        a reader or a restart looks at.
        """
        path = message.path
        if self._recycle and message.data_length <= RECYCLE_AT_MOST and os.path.dirname(path) == self.queue_dir:
            self._recycled = (self._recycled + 1) % RECYCLED_SLOTS
            try:
                os.rename(path, os.path.join(self.incoming_dir, f"{RECYCLED_PREFIX}{self._recycled}"))
                return
            except FileNotFoundError:
                return
            except OSError:
                pass            # unlinked below, as if it had not been recycled
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    # -- start-up ----------------------------------------------------------
    #
    # Recovery comes in two parts (driven by L{exedge.queue.recovery.Recovery}):
    # before anything listens, L{start_recovery} (directories, partial files:
    # O(partials)); then, while new mail is accepted, queue/ is read back in
    # steps on a spool thread (L{queue_names}, L{read_back}), and orphaned
    # state files are swept (L{state_names}, L{sweep_state}).

    def start_recovery(self) -> int:
        """
        What must be done before a session is served (blocking): make the
        directories, delete unacknowledged partial files (never answered
        250), and from now on note the id of every message begun, so that
        reading queue/ back in the background never takes a message
        committed meanwhile for one a previous run left. Returns how many
        partial files were deleted.
        """
        self.prepare()
        removed = 0
        with os.scandir(self.incoming_dir) as entries:
            for entry in entries:
                if entry.name.startswith((SPARE_PREFIX, RECYCLED_PREFIX)):
                    # a file a commit worker made ahead (commit_worker.Spares), or a delivered
                    # message's waiting to be one: never a message, and perhaps deleted or
                    # taken just now by a worker
                    try:
                        os.unlink(entry.path)
                    except FileNotFoundError:
                        pass
                    continue
                os.unlink(entry.path)
                removed += 1
                log.info("spool: removed unacknowledged partial message {name}", name=entry.name)
        self._new = set()
        self._mark = f"{time.time_ns() // 1000:014X}"
        return removed

    def claim_recovered(self, queue_id: str) -> bool:
        """
        At the moment recovery announces C{queue_id} (the reactor's
        thread): False when its committer will announce it (noted since
        it was read); else True, and an id begun after recovery started
        (a receive worker's commit whose name has not reached this
        process yet) is remembered, for L{announced_by_recovery}.
        """
        if self._new is not None and queue_id in self._new:
            return False
        if self._mark is not None and queue_id[:14] >= self._mark:
            self._raced.add(queue_id)
        return True

    def announced_by_recovery(self, queue_id: str) -> bool:
        """A committer is about to announce C{queue_id}: True (once) if recovery already did."""
        if queue_id in self._raced:
            self._raced.discard(queue_id)
            return True
        return False

    def end_recovery(self) -> None:
        """queue/ has been read back: stop noting new ids."""
        self._new = None

    def queue_names(self) -> Iterator[str]:
        """
        The names in queue/, read lazily (C{os.scandir}: a directory of a
        million files is never listed whole). Iterate it on one thread at a
        time. Each name that stays in the directory is given once; one
        added or removed meanwhile may or may not be (POSIX readdir), which
        is why L{read_back} skips new ids and tolerates vanished files.
        """
        with os.scandir(self.queue_dir) as entries:
            for entry in entries:
                yield entry.name

    def read_back(self, names: Iterable[str]) -> list[tuple[StoredMessage, bool]]:
        """
        Load these queue files with their outcomes (blocking: a spool
        thread), in arrival order: (message, whether it has a state/ file)
        for each, to be handed to L{adopt} then the queue. Skipped: ids begun
        by this process (their commit announces them), and files gone
        before they were read (delivered and removed meanwhile). Unreadable
        files are moved aside to corrupt/, never deleted.

        The set of new ids is read here while the reactor adds to it and
        prunes it: each test and change is one atomic operation under the
        GIL, and the order is what makes it exact: an id is added before
        its file can exist, and dropped only after its file is gone.
        """
        new = self._new
        loaded = []
        for name in sorted(names):
            if new is not None and name in new:
                continue
            path = os.path.join(self.queue_dir, name)
            try:
                loaded.append(self._load(name, path))
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError) as e:
                try:
                    os.rename(path, os.path.join(self.corrupt_dir, name))
                except FileNotFoundError:
                    continue
                log.error("spool: moved unreadable {name} to corrupt/: {error}", name=name, error=e)
        return loaded

    def adopt(self, message: StoredMessage, stateful: bool) -> None:
        """A message read back: remember that it has a state/ file, so its removal deletes that too."""
        if stateful:
            self._stateful.add(message.queue_id)

    def state_names(self) -> Iterator[str]:
        """The names in state/, read lazily (see L{queue_names})."""
        with os.scandir(self.state_dir) as entries:
            for entry in entries:
                yield entry.name

    def sweep_state(self, names: Iterable[str]) -> int:
        """
        Delete the state files of messages no longer in queue/ (blocking):
        left by a crash between a message's removal and its state file's.
        A state file is only ever written for a committed message, so one
        without its queue file belongs to nobody. Returns how many went.
        """
        swept = 0
        for name in names:
            if os.path.lexists(os.path.join(self.queue_dir, name)):
                continue
            try:
                os.unlink(os.path.join(self.state_dir, name))
                swept += 1
            except FileNotFoundError:
                pass
        return swept

    def recover(self) -> list[StoredMessage]:
        """
        Everything at once (blocking): partial files removed, every committed
        message read back, orphaned state files swept. For tests and tools;
        the server recovers in the background (L{exedge.queue.recovery}).
        """
        self.start_recovery()
        loaded = self.read_back(self.queue_names())
        self.end_recovery()
        for message, stateful in loaded:
            self.adopt(message, stateful)
        self.sweep_state(list(self.state_names()))
        return [message for message, _ in loaded]

    def _load(self, queue_id: str, path: str) -> tuple[StoredMessage, bool]:
        """The message and whether it has a state file; FileNotFoundError if it is gone."""
        with open(path, "rb") as f:
            data_length, envelope = read_footer(f, path)
        stateful, done, delayed, retry_at = self._load_state(queue_id)
        return StoredMessage(queue_id, envelope, path, data_length, done, delayed, retry_at), stateful

    def _load_state(self, queue_id: str) -> tuple[bool, frozenset, frozenset, float]:
        """
        (whether there is a state file, recipients with a final outcome,
        recipients told of a delay, the next retry time).
        """
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
            return False, NONE_DONE, NONE_DONE, 0.0
        return True, frozenset(done) or NONE_DONE, frozenset(delayed) or NONE_DONE, retry_at
