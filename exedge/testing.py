"""
Test helpers that exedge maintains for itself and for plugin authors.

L{RecordingSink} is a real SMTP server on stock C{twisted.mail.smtp.ESMTP}
(an implementation independent of exedge's own), listening on loopback,
that records every command line and every message it accepts, and can be
told to misbehave: per-recipient replies, a 421 greeting, PIPELINING and
SIZE advertised or not, a connection closed in the middle of DATA.
"""

from __future__ import annotations

import attrs
from twisted.internet import defer, endpoints
from twisted.mail import smtp
from zope.interface import implementer


@attrs.define
class Received:
    sender: str
    recipient: str
    data: bytes


@implementer(smtp.IMessage)
class _Message:
    def __init__(self, sink: "RecordingSink", sender: str, recipient: str, protocol):
        self.sink, self.sender, self.recipient, self.protocol = sink, sender, recipient, protocol
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)
        if self.sink.close_after_lines is not None and len(self.lines) >= self.sink.close_after_lines:
            self.protocol.transport.abortConnection()

    def eomReceived(self):
        data = b"".join(line + b"\r\n" for line in self.lines)
        received = Received(self.sender, self.recipient, data)
        self.sink.messages.append(received)
        if self.sink.on_message is not None:
            self.sink.on_message(received)
        return defer.succeed(None)

    def connectionLost(self) -> None:
        self.lines = []


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def __init__(self, sink: "RecordingSink"):
        self.sink = sink

    def receivedHeader(self, helo, origin, recipients):
        return None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        address = str(user.dest)
        code = self.sink.rcpt_replies.get(address)
        if code is not None:
            raise smtp.SMTPBadRcpt(user, code, f"{code} refused by the test sink")
        sender = str(user.orig)
        return lambda: _Message(self.sink, sender, address, user.protocol)


class _SinkProtocol(smtp.ESMTP):
    def connectionMade(self):
        self.sink.connections += 1
        if self.sink.greeting_code != 220:
            self.transport.write(b"%d sink.test not now\r\n" % self.sink.greeting_code)
            self.transport.loseConnection()
            return
        super().connectionMade()

    def lineReceived(self, line):
        if self.mode == smtp.COMMAND:
            self.sink.commands.append(line.decode("latin-1"))
        return super().lineReceived(line)

    def extensions(self):
        ext = super().extensions()
        if self.sink.pipelining:
            ext[b"PIPELINING"] = None
        if self.sink.size is not None:
            ext[b"SIZE"] = [str(self.sink.size).encode()]
        if self.sink.dsn:
            ext[b"DSN"] = None
        return ext


class RecordingSink:
    """A loopback SMTP server that records what it is sent."""

    def __init__(self, *, pipelining: bool = True, size: int | None = None, dsn: bool = True,
                 greeting_code: int = 220, rcpt_replies: dict | None = None,
                 close_after_lines: int | None = None):
        self.pipelining = pipelining
        self.size = size
        self.dsn = dsn
        self.greeting_code = greeting_code
        self.rcpt_replies = dict(rcpt_replies or {})   # address -> 4xx/5xx code
        self.close_after_lines = close_after_lines
        self.messages: list[Received] = []
        self.commands: list[str] = []
        self.connections = 0
        self.port = None
        self.on_message = None   # called with each Received

    @defer.inlineCallbacks
    def start(self, reactor, host: str = "127.0.0.1", port: int = 0):
        factory = smtp.SMTPFactory()
        factory.protocol = _SinkProtocol
        factory.domain = b"sink.test"
        sink = self

        def build(addr):
            p = smtp.SMTPFactory.buildProtocol(factory, addr)
            p.sink = sink
            p.delivery = _Delivery(sink)
            p.host = b"sink.test"
            return p

        factory.buildProtocol = build
        endpoint = endpoints.TCP4ServerEndpoint(reactor, port, interface=host)
        self.listening = yield endpoint.listen(factory)
        self.port = self.listening.getHost().port
        return self

    def stop(self):
        return self.listening.stopListening()


def main(argv=None) -> None:
    """
    Run a sink as its own process (for tests that drive exedge with
    blocking clients): each accepted message and recipient becomes a file
    in --out, its first lines X-Sink-From: and X-Sink-Rcpt:.

        python -m exedge.testing --port 2627 --out DIR [--refuse ADDR=550] [--greeting 421]
    """
    import argparse
    import itertools
    import os

    from twisted.internet import reactor

    parser = argparse.ArgumentParser(prog="python -m exedge.testing")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--refuse", action="append", default=[], metavar="ADDRESS=CODE")
    parser.add_argument("--greeting", type=int, default=220)
    parser.add_argument("--no-pipelining", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    refuse = {a: int(c) for a, _, c in (r.partition("=") for r in args.refuse)}
    sink = RecordingSink(pipelining=not args.no_pipelining, greeting_code=args.greeting, rcpt_replies=refuse)
    counter = itertools.count()

    def store(received: Received) -> None:
        name = os.path.join(args.out, f"{next(counter):06d}.eml")
        with open(name + ".tmp", "wb") as f:
            f.write(b"X-Sink-From: <%s>\r\nX-Sink-Rcpt: <%s>\r\n" % (received.sender.encode(),
                                                                     received.recipient.encode()))
            f.write(received.data)
        os.rename(name + ".tmp", name)

    sink.on_message = store

    sink.start(reactor, port=args.port).addErrback(lambda f: (print(f.getTraceback()), reactor.stop()))
    reactor.run()


if __name__ == "__main__":
    main()
