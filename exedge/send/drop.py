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
from exedge.queue.manager import Outcome


def _envelope_headers(message, recipients) -> bytes:
    env = message.envelope
    lines = [b"X-Sender: <%s>\r\n" % env.sender.encode("ascii")]
    lines += [b"X-Receiver: <%s>\r\n" % env.recipients[i].address.encode("ascii") for i in recipients]
    return b"".join(lines)


@implementer(IDeliveryAgent)
class DropDirectoryAgent:
    def __init__(self, connector, run):
        self.connector = connector
        self.directory = connector.drop_directory
        self.run = run

    def deliver(self, message, recipients):
        return self.run(lambda: self._write(message, recipients))

    def _write(self, message, recipients):
        os.makedirs(self.directory, exist_ok=True)
        final = os.path.join(self.directory, message.queue_id + ".eml")
        temp = os.path.join(self.directory, "." + message.queue_id + ".tmp")
        with open(temp, "wb") as f:
            f.write(_envelope_headers(message, recipients))
            f.write(message.read_data())
            f.flush()
            os.fsync(f.fileno())
        os.rename(temp, final)
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        detail = f"dropped as {os.path.basename(final)}"
        return [Outcome(i, "delivered", detail) for i in recipients]
