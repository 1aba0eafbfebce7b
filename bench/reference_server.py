"""
The benchmark's reference: a minimal ESMTP server on stock Twisted.

C{twisted.mail.smtp.ESMTP} and C{SMTPFactory} unchanged, plus the smallest
C{IMessageDelivery} that makes the 250 after the final dot mean "on disk":
each message is written line by line to C{<spool>/tmp/<id>}, and on
C{eomReceived} the file is flushed, fsync'ed, renamed into C{<spool>/new/}
and that directory fsync'ed before the returned Deferred fires (already
fired: the disk work is synchronous, on the reactor thread, which is what a
naive stock-Twisted server does).

Any sender and any recipient are accepted. Nothing is delivered onwards.

    python bench/reference_server.py --port 2525 --spool /tmp/refspool

Listens on 127.0.0.1 only. Stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

from twisted.internet import defer
from twisted.mail import smtp
from zope.interface import implementer


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@implementer(smtp.IMessage)
class DurableMessage:
    def __init__(self, spool: "Spool"):
        self.spool = spool
        self.name = spool.new_name()
        self.tmp_path = os.path.join(spool.tmp_dir, self.name)
        self.file = open(self.tmp_path, "wb")

    def lineReceived(self, line: bytes) -> None:
        self.file.write(line + b"\r\n")

    def eomReceived(self) -> defer.Deferred:
        f, self.file = self.file, None
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.rename(self.tmp_path, os.path.join(self.spool.new_dir, self.name))
        _fsync_dir(self.spool.new_dir)
        return defer.succeed(None)

    def connectionLost(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
            try:
                os.unlink(self.tmp_path)
            except FileNotFoundError:
                pass


class Spool:
    def __init__(self, directory: str):
        self.tmp_dir = os.path.join(directory, "tmp")
        self.new_dir = os.path.join(directory, "new")
        os.makedirs(self.tmp_dir, exist_ok=True)
        os.makedirs(self.new_dir, exist_ok=True)
        self._counter = itertools.count()
        self._prefix = f"{int(time.time())}.{os.getpid()}"

    def new_name(self) -> str:
        return f"{self._prefix}.{next(self._counter)}"


@implementer(smtp.IMessageDelivery)
class Delivery:
    def __init__(self, spool: Spool):
        self.spool = spool

    def receivedHeader(self, helo, origin, recipients) -> bytes:
        return b"Received: from " + helo[0] + b" ([" + helo[1] + b"])\r\n\tby reference; " + smtp.rfc822date()

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        return lambda: DurableMessage(self.spool)


class Factory(smtp.SMTPFactory):
    protocol = smtp.ESMTP
    domain = b"reference.bench.test"

    def __init__(self, delivery: Delivery):
        super().__init__()
        self.delivery = delivery

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        p.delivery = self.delivery
        return p


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--spool", required=True, help="directory for tmp/ and new/")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    factory = Factory(Delivery(Spool(args.spool)))
    reactor.listenTCP(args.port, factory, interface="127.0.0.1", backlog=256)
    print(f"reference server listening on 127.0.0.1:{args.port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
