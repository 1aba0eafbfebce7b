"""
Delivery into a drop directory, as Exchange's Foreign connectors do.

Each message becomes one C{<queue id>.eml} file whose first lines carry the
envelope as C{X-Sender:} and C{X-Receiver:} headers (Exchange's drop
directory format), written to a temporary name, fsync'ed and renamed. The
name is the queue id, so a redelivery after a crash replaces the same file
instead of adding a second copy.
"""

from __future__ import annotations

import os

from zope.interface import implementer

from exedge.interfaces import IDeliveryAgent
from exedge.queue.batch import Batcher
from exedge.durable import DirectorySync, publish, write_all
from exedge.interfaces import Outcome


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
        os.makedirs(self.directory, exist_ok=True)
        results: list = [None] * len(items)
        written = []
        for n, (message, recipients) in enumerate(items):
            temp = os.path.join(self.directory, "." + message.queue_id + ".tmp")
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
