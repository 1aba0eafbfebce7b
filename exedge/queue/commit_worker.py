"""
The commit worker: a child process that makes received messages durable.

Why a process. Making a message durable is a run of system calls (create,
write, fsync, close, rename, and an fsync of the queue directory). On a
spool thread of the server every one of them gives up the GIL and then
waits to take it back from the reactor thread, which under load holds it
between its own socket calls. Measured at 10 connections (bench/README.md):
a commit batch of four messages took 1.7 ms to write the files and 2.9 ms
to sync them, mostly waiting for the lock, and the same run with the spool
on tmpfs relayed twice as fast. A child process has an interpreter and a
lock of its own, so its system calls follow one another at the speed of the
disk. Postfix's smtpd hands each message to its cleanup process for the
same reason.

The worker reads requests on stdin and answers on stdout, integers
big-endian::

    request  id u32, flags u8, name length u16, payload length u32, name, payload
    reply    id u32, errno i32 (0: committed), text length u16, text

C{name} is the message's file name in C{incoming/}; the payload is written
to it: the whole message and its envelope footer for a new file, or only
the footer (flag 1, L{APPEND}) for a message that spilled to disk while it
arrived. Every request read at once is committed as a group with
L{publish}: the files fsync'ed together (L{fsync_together}), each renamed
into C{queue/}, then one fsync of the directory for all of them; only then are their replies written. The
worker exits when stdin closes, after answering what it has read; it
ignores SIGINT and SIGTERM (sent to the whole process group by Ctrl-C or a
service manager) and commits nothing once the server is gone.

Files made ahead (L{Spares}). Creating a file is the dearest step of a
commit on some filesystems: on this machine's ext4, 240 microseconds of a
560-microsecond commit, more than the file's fsync. Postfix's cleanup
creates its queue file when smtpd opens the transaction, at MAIL FROM, so
the creation overlaps the client's RCPT and DATA; a commit here comes only
after the final dot. So after answering a group, while no request waits,
the worker creates empty files in C{incoming/} (C{spare-<pid>-<n>}, as
many as the last group held, at most L{SPARES}); a new message's spare is
renamed to C{incoming/<name>} (a rename costs a tenth of a creation),
written, and published into C{queue/} as before: a server cleaning up
after a dead receive worker unlinks C{incoming/<name>}, and a commit
still under way then fails instead of publishing what nobody
acknowledged. A spare is never a message: start-up deletes those left in
C{incoming/} like any partial file, the worker deletes its own when it
ends, and the server deletes those of a worker that was killed
(L{exedge.queue.committer.remove_spares}). Spares are made only between groups, never beside a group's fsyncs:
made by a thread of their own while the fsyncs ran, they joined the
journal transaction those fsyncs commit, and the rate fell (0.67-0.75x of
this way at one and ten connections, same run).

Recycled files. A spare is first taken from the files of delivered
messages: the server renames a delivered message's file (up to
L{exedge.queue.spool.RECYCLE_AT_MOST} bytes) to
C{incoming/recycled-<slot>} instead of unlinking it, and L{Spares.fill}
renames one of those to a spare's name, fsyncs C{queue/} (once for all it
took: the server's rename out of C{queue/} must be on the disk before the
inode holds another message's bytes) and keeps it open as it is. The
commit writes the new message over the old bytes from the start and cuts
the file to the new length before its fsync (L{_cut}). No inode is freed
by the delivery and none allocated by the next commit, and a message no
longer than the one before needs no new blocks either: emptying the file
first (C{O_TRUNC}) took 0.1 ms for 100 KiB, off the commit's path but in
batches a waiting request sat behind, and made the commit's write
allocate every block again (bench/README.md, "Overwritten, not
emptied"). A creation allocates an inode and a deletion frees one, which
a rename does not; on this machine's ext4, which has no journal,
that is dear: every new inode is found by stepping over each inode freed
in the last 30 seconds (the kernel's C{recently_deleted}). Relaying a few
hundred messages a second, a spare's creation took 0.8-1.3 ms (strace) and the
worker 0.9 ms of system time per message (bench/README.md, "Recycled
files"). The slots are few (L{exedge.queue.spool.RECYCLED_SLOTS}): a
rename onto a slot in use replaces, and so deletes, the file there. That
bounds what waits: at most that many delivered messages' bytes, and those
of the spares taken from them (L{SPARES}), each file still mode 0600 in
the spool's own directory, until a commit writes over it or start-up
deletes it. Since an inode may now be given to another message,
readers of queue files check that the name still holds the file they read
(L{exedge.queue.spool.still_named}).
"""

from __future__ import annotations

import os
import select
import signal
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from exedge.durable import DirectorySync, fsync_error, fsync_in_turn, publish, write_all

REQUEST = struct.Struct("!IBHI")
REPLY = struct.Struct("!IiH")
APPEND = 1
COMMITTED = "committed"   # only a request that reached this has its 0 reply
READ_SIZE = 4 * 1024 * 1024
FSYNC_THREADS = 16
SPARES = 32                    # files made ahead at most (L{Spares})
SPARE_PREFIX = "spare-"        # their names in incoming/: never a queue id (hexadecimal)
RECYCLED_PREFIX = "recycled-"  # delivered messages' files waiting to be spares (see above)


def encode_request(request_id: int, name: str, parts: list[bytes], append: bool) -> list[bytes]:
    """A request frame, as pieces for C{writeSequence}: the payload is C{parts} in order, never joined here."""
    raw = name.encode("ascii")
    return [REQUEST.pack(request_id, APPEND if append else 0, len(raw), sum(map(len, parts))), raw, *parts]


def take_frames(buffer: bytearray, header: struct.Struct, parts: int) -> list:
    """
    The complete frames at the start of C{buffer}, removed from it: the
    C{header}'s fields and the C{parts} byte strings that follow it, whose
    lengths are the header's last C{parts} fields. Both sides read with it.
    """
    frames, offset = [], 0
    while len(buffer) - offset >= header.size:
        fields = header.unpack_from(buffer, offset)
        lengths = fields[-parts:]
        end = offset + header.size + sum(lengths)
        if end > len(buffer):
            break
        pieces, at = [], offset + header.size
        with memoryview(buffer) as view:          # one copy of each piece, not two
            for length in lengths:
                pieces.append(bytes(view[at:at + length]))
                at += length
        frames.append((fields, pieces))
        offset = end
    del buffer[:offset]
    return frames


def take_requests(buffer: bytearray) -> list:
    """The complete requests at the start of C{buffer}, removed from it: (id, flags, name, payload)."""
    return [(request_id, flags, name.decode("ascii", "replace"), payload)
            for (request_id, flags, _, _), (name, payload) in take_frames(buffer, REQUEST, 2)]


_fsync_pool: ThreadPoolExecutor | None = None


def fsync_together(fds: list[int]) -> list:
    """
    The group's fsyncs at the same time, from threads: the filesystem then
    covers several with one journal commit instead of one each (measured
    here: a group of four synced in 1.95 ms, against 2.8 ms one by one).
    This process has its own interpreter lock, so the threads cost the
    server nothing.
    """
    global _fsync_pool
    if len(fds) < 2:
        return fsync_in_turn(fds)
    if _fsync_pool is None:
        _fsync_pool = ThreadPoolExecutor(max_workers=FSYNC_THREADS, thread_name_prefix="fsync")
    return list(_fsync_pool.map(fsync_error, fds))


class Spares:
    """
    Empty files in C{incoming/}, created and opened ahead of the commits
    that will fill them (see the module's docstring). Only this process
    knows them: a spare is a name in C{incoming/} and an open descriptor.
    """

    def __init__(self, incoming_dir: str, limit: int = SPARES, before_reuse: Callable[[], None] = lambda: None):
        """
        C{before_reuse}: makes the server's renames out of C{queue/}
        durable (an fsync of that directory); called after recycled files
        are claimed and before any of them is handed out (see L{fill}).
        """
        self.incoming_dir = incoming_dir
        self.limit = limit
        self.before_reuse = before_reuse
        self.wanted = 0
        self._files: list[tuple[int, str]] = []
        self._made = 0

    def __len__(self) -> int:
        return len(self._files)

    def take(self) -> tuple[int, str] | None:
        """A spare's descriptor and path, now the caller's; None when there is none."""
        return self._files.pop() if self._files else None

    def want(self, count: int) -> None:
        """Keep C{count} spares ready (the size of the group just committed), within the limit."""
        self.wanted = max(0, min(count, self.limit))

    def fill(self, waiting=lambda: False) -> None:
        """
        Spares up to the number wanted, stopping as soon as C{waiting()}
        says a request is there: first every recycled file there is, up to
        the limit (they cost no creation, and their one directory fsync is
        shared), then new files up to the number wanted.

        A recycled file is handed out only once its removal from
        C{queue/} is on the disk (C{before_reuse}). The server renamed it
        out of C{queue/} without an fsync, as an unlink is; on a file
        system without a journal a crash could otherwise leave the old
        name in C{queue/} on the disk, leading to the new message's bytes.
        Without a journal, ext4 avoids that for unlinked inodes by never
        reusing one freed in the last 30 seconds; this is the same guard.
        """
        if len(self._files) < self.limit:
            claimed = []
            for name in names_starting(self.incoming_dir, RECYCLED_PREFIX):
                if len(self._files) + len(claimed) >= self.limit or waiting():
                    break
                path = self._claim(name)
                if path is not None:
                    claimed.append(path)
            if claimed:
                self._reuse(claimed)
        while len(self._files) < self.wanted and not waiting():
            path = self._next_path()
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError:
                return          # a full or failing disk: the commits create their own files, and say why
            self._files.append((fd, path))

    def _next_path(self) -> str:
        path = os.path.join(self.incoming_dir, f"{SPARE_PREFIX}{os.getpid()}-{self._made}")
        self._made += 1
        return path

    def _claim(self, name: str) -> str | None:
        """
        The recycled file C{name} renamed to a spare's name, so that no
        other commit worker takes it too and the server's next rename onto
        its slot leaves it alone; None if it is gone.
        """
        path = self._next_path()
        try:
            os.rename(os.path.join(self.incoming_dir, name), path)
        except OSError:
            return None         # another commit worker took it, or a new one replaced it in its slot
        return path

    def _reuse(self, claimed: list[str]) -> None:
        """
        Once the server's renames out of queue/ are durable, the claimed
        files kept as spares as they are: the commit that takes one writes
        over the old bytes and cuts it to the new length (L{_cut}).
        """
        try:
            self.before_reuse()
        except OSError:
            for path in claimed:
                _unlink(path)   # not known to be out of queue/ on the disk: never reused
            return
        for path in claimed:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                _unlink(path)
                continue
            self._files.append((fd, path))

    def discard(self) -> None:
        """Close and delete every spare (the worker is ending)."""
        files, self._files = self._files, []
        for fd, path in files:
            _discard(fd, path)


def names_starting(directory: str, prefix: str) -> list[str]:
    """The names in C{directory} now that start with C{prefix} (none if it cannot be read)."""
    try:
        with os.scandir(directory) as entries:
            return [entry.name for entry in entries if entry.name.startswith(prefix)]
    except OSError:
        return []


def _discard(fd: int, path: str) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
    _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _into_place(spare: tuple[int, str], path: str) -> int:
    """
    A spare's descriptor, the spare renamed to C{path}: the message's own
    name in incoming/ while it is committed, as a file created for it would
    be. A server cleaning up after a dead receive worker unlinks
    incoming/<name>, and the publication then fails instead of leaving in
    queue/ a message nobody acknowledged.
    """
    fd, spare_path = spare
    try:
        os.rename(spare_path, path)
    except OSError:
        _discard(fd, spare_path)
        raise
    return fd


def _cut(fd: int, length: int) -> None:
    """
    A spare just written with a message of C{length} bytes cut to that
    length: a recycled file is overwritten, not emptied first (see
    L{Spares._reuse}), and whatever of the delivered message lay beyond
    the new one's end goes before the file is fsync'ed and published.
    """
    if os.fstat(fd).st_size > length:
        os.ftruncate(fd, length)


def write_group(incoming_dir: str, queue_dir: str, sync: DirectorySync, requests: list,
                fsync_all=fsync_together, spares: Spares | None = None) -> list:
    """
    Commit C{requests} (name, payload, append) as one group: each payload
    written to C{incoming/<name>} (a new file, or appended to a spilled
    one; a new message goes into one of C{spares} where there is one),
    then L{publish}. One result per request: L{COMMITTED} or the
    C{OSError} that stopped it. The server's in-process spool (tests) uses
    this too, with its fsyncs in turn and no spares.
    """
    results: list = [None] * len(requests)
    written = []
    for n, (name, payload, append) in enumerate(requests):
        if "/" in name or name.startswith("."):
            results[n] = OSError(22, f"bad file name {name!r}")
            continue
        path = os.path.join(incoming_dir, name)
        # a spare only where a new file could be created: where incoming/<name>
        # exists (a second request of that name), O_EXCL below refuses it
        use_spare = not append and spares is not None and len(spares) and not os.path.lexists(path)
        try:
            if use_spare:
                fd = _into_place(spares.take(), path)
            else:
                mode = os.O_APPEND if append else os.O_CREAT | os.O_EXCL
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | mode, 0o600)
            try:
                write_all(fd, payload)
                if use_spare:
                    _cut(fd, len(payload))
            except BaseException:
                os.close(fd)
                raise
        except OSError as e:
            results[n] = e
            continue
        written.append((n, fd, path, os.path.join(queue_dir, name), COMMITTED))
    publish(written, sync, results, fsync_all)
    return [r if r is COMMITTED or isinstance(r, OSError) else OSError(5, "not committed") for r in results]


def commit(incoming_dir: str, queue_dir: str, sync: DirectorySync, requests: list,
           spares: Spares | None = None) -> list[bytes]:
    """Commit C{requests} (id, flags, name, payload) as one group; the replies, in order."""
    results = write_group(incoming_dir, queue_dir, sync,
                          [(name, payload, bool(flags & APPEND)) for _, flags, name, payload in requests],
                          spares=spares)
    replies = []
    for (request_id, _, _, _), result in zip(requests, results):
        if result is COMMITTED:
            replies.append(REPLY.pack(request_id, 0, 0))
            continue
        text = str(result).encode("utf-8", "replace")[:2000]
        replies.append(REPLY.pack(request_id, result.errno or 5, len(text)) + text)
    return replies


def serve(spool_dir: str, server: int, rfd: int = 0, wfd: int = 1) -> None:
    """Commit requests until stdin closes or the server (process id C{server}) is gone."""
    incoming_dir = os.path.join(spool_dir, "incoming")
    queue_dir = os.path.join(spool_dir, "queue")
    sync = DirectorySync(queue_dir)
    spares = Spares(incoming_dir, before_reuse=sync.sync)
    buffer = bytearray()

    # read into one buffer kept for the worker's life: os.read(READ_SIZE)
    # would map and unmap 4 MiB for every request
    chunk = memoryview(bytearray(READ_SIZE))

    def waiting() -> bool:
        return bool(select.select([rfd], [], [], 0)[0])

    try:
        while True:
            got = os.readv(rfd, [chunk])
            if not got:
                return
            buffer += chunk[:got]
            requests = take_requests(buffer)
            if not requests:
                continue
            if os.getppid() != server:
                # the server died (SIGKILL): nobody can acknowledge these, and a
                # new server may already have scanned queue/; commit nothing
                return
            write_all(wfd, b"".join(commit(incoming_dir, queue_dir, sync, requests, spares)))
            # the next group's files, while nobody waits for this process
            spares.want(sum(1 for _, flags, _, _ in requests if not flags & APPEND))
            spares.fill(waiting)
    finally:
        spares.discard()


if __name__ == "__main__":
    # Ctrl-C and a service manager's SIGTERM reach the whole process group;
    # the worker finishes what it has read and leaves when its stdin closes
    # (the server kills it if it takes too long)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else os.getppid())
