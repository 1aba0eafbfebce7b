"""
Making renames durable, with group commit.

A file renamed into a directory survives a crash only once the directory
itself has been fsync'ed after the rename. When many sessions commit at the
same moment, one directory fsync that *starts* after all their renames
covers them all; L{DirectorySync} lets concurrent callers share it instead
of queueing one fsync each (the group commit of databases and of Postfix's
queue manager). Blocking: call it on a spool thread.

Beside the rooms rather than in one: the queue room (the spool, the commit
worker) and the send room (the drop directory agent) both publish files
with it. It imports the standard library only, so the commit worker can
use it without Twisted.
"""

from __future__ import annotations

import os
import threading


def write_all(fd: int, data: bytes) -> None:
    """C{os.write} until everything is written (a regular file may take less at once)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str, mode: int = 0o777) -> None:
    """
    C{os.makedirs}, durably: each directory made here is fsync'ed in its
    parent, so that a crash after a file is published in it (and the new
    directory fsync'ed) cannot lose the directory entry that leads to it.
    Nothing to do, and no fsync, when C{path} exists already.
    """
    if os.path.isdir(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    if parent != path:
        make_dirs(parent, mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return                    # made meanwhile by someone else, who syncs it
    fsync_dir(parent)


class DirectorySync:
    def __init__(self, path: str):
        self.path = path
        self._cond = threading.Condition()
        self._requested = 0   # tickets handed out
        self._covered = 0     # every ticket up to this one is durable
        self._running = False

    def sync(self) -> None:
        """Return once an fsync of the directory begun after this call has finished."""
        with self._cond:
            self._requested += 1
            ticket = self._requested
            while self._covered < ticket:
                if self._running:
                    self._cond.wait()
                    continue
                # an fsync started now covers every ticket handed out so far
                self._running = True
                target = self._requested
                self._cond.release()
                try:
                    fsync_dir(self.path)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                self._covered = max(self._covered, target)


def fsync_error(fd: int) -> OSError | None:
    """fsync C{fd}; the error instead of raising it."""
    try:
        os.fsync(fd)
    except OSError as e:
        return e
    return None


def fsync_in_turn(fds: list[int]) -> list:
    return [fsync_error(fd) for fd in fds]


def publish(written: list, directory: DirectorySync, results: list, fsync_all=fsync_in_turn) -> None:
    """
    Make files durable under their final names, as a group: C{written}
    holds C{(n, fd, temp_path, final_path, value)}; each file is
    fsync'ed, closed and renamed, then one directory fsync covers every
    rename. C{results[n]} becomes C{value}, or the C{OSError} that stopped
    that file (blocking: call on a spool thread).

    C{fsync_all(fds)} does the file fsyncs and returns an error or None for
    each: one after another by default; the commit worker runs them in
    parallel, so the filesystem can cover them with fewer journal commits.
    """
    renamed = []
    errors = fsync_all([fd for _, fd, _, _, _ in written])
    for (n, fd, temp, final, value), error in zip(written, errors):
        try:
            os.close(fd)
        except OSError as e:
            error = error or e
        if error is None:
            try:
                os.rename(temp, final)
            except OSError as e:
                error = e
        if error is not None:
            results[n] = error
            continue
        renamed.append((n, final, value))
    if not renamed:
        return
    try:
        directory.sync()
    except OSError as e:
        # not durable, so not published: whoever waits gets the error (a 451,
        # a retry), and the file must not turn up again after a restart
        for n, final, _ in renamed:
            results[n] = e
            try:
                os.unlink(final)
            except OSError:
                pass
        return
    for n, _, value in renamed:
        results[n] = value
