"""
Delivery into a drop directory, as Exchange's Foreign connectors do.

Each message becomes one C{<queue id>.eml} file whose first lines carry the
envelope as C{X-Sender:} and C{X-Receiver:} headers (Exchange's drop
directory format), written to a temporary name, fsync'ed and renamed. The
name is the queue id, so a redelivery after a crash replaces the same file
instead of adding a second copy. The temporary name is C{.<queue id>.tmp}:
a crash between its write and its rename leaves one, which start-up
removes (L{remove_abandoned}) before anything is delivered; the message
itself was never recorded as delivered, so it is dropped again, once.
A drop directory that does not exist is made and fsync'ed in its parent.
"""

from __future__ import annotations

import os
import re

from twisted.logger import Logger
from zope.interface import implementer

from exedge.interfaces import IDeliveryAgent
from exedge.queue.batch import Batcher
from exedge.durable import DirectorySync, make_dirs, publish, write_all
from exedge.interfaces import Outcome

log = Logger()

_TEMP_NAME = re.compile(r"\.[0-9A-Za-z]{1,64}\.tmp")   # what _write_batch writes before its rename


def _temp_path(directory: str, queue_id: str) -> str:
    return os.path.join(directory, "." + queue_id + ".tmp")


def remove_abandoned(directory: str) -> int:
    """
    Remove the temporary files a crash left in a drop directory (blocking:
    at start-up, before any delivery). Only our own names: whatever else
    is there belongs to whoever reads the directory. Returns how many.
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    removed = 0
    for name in names:
        if _TEMP_NAME.fullmatch(name):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                continue
            removed += 1
            log.info("drop directory {directory}: removed {name}, left by a delivery that did not finish",
                     directory=directory, name=name)
    return removed


def _envelope_headers(message, recipients) -> bytes:
    env = message.envelope
    lines = [b"X-Sender: <%s>\r\n" % env.sender.encode("ascii")]
    lines += [b"X-Receiver: <%s>\r\n" % env.recipients[i].address.encode("ascii") for i in recipients]
    return b"".join(lines)


@implementer(IDeliveryAgent)
class DropDirectoryAgent:
    # a whole batch in flight: the files of one batch share their fsyncs
    concurrency = 256

    def __init__(self, connector, run, *, defer_to=None, clock=None):
        """C{defer_to}: the spool's receiving batcher, which goes first."""
        self.connector = connector
        self.directory = connector.drop_directory
        self._sync = DirectorySync(self.directory)
        self._batcher = Batcher(run, self._write_batch, self.concurrency, defer_to=defer_to, clock=clock)

    def deliver(self, message, recipients):
        return self._batcher.submit((message, recipients))

    def _write_batch(self, items: list) -> list:
        """Write every file, fsync each, rename each, one directory fsync (spool thread)."""
        make_dirs(self.directory)
        results: list = [None] * len(items)
        written = []
        for n, (message, recipients) in enumerate(items):
            temp = _temp_path(self.directory, message.queue_id)
            try:
                data = _envelope_headers(message, recipients) + message.read_data()
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                try:
                    write_all(fd, data)
                except BaseException:
                    os.close(fd)
                    raise
                name = message.queue_id + ".eml"
                outcomes = [Outcome(i, "delivered", f"250 2.0.0 dropped as {name}", "2.0.0", action="delivered")
                            for i in recipients]
                written.append((n, fd, temp, os.path.join(self.directory, name), outcomes))
            except OSError as e:
                results[n] = e
        publish(written, self._sync, results)
        return results
