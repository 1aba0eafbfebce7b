"""
Test helpers that exedge maintains for itself and for plugin authors.

L{StringSession} is an exedge receive session on a C{StringTransport},
with a C{task.Clock} and a real spool in a directory: bytes in, replies
out, no sockets (the way to test a pipeline stage's verdicts and
actions). L{ManualRun} stands in for the spool's thread pools: disk work
runs only when the test says so, to catch what happens while it waits.

L{RecordingSink} is a real SMTP server on stock C{twisted.mail.smtp.ESMTP}
(an implementation independent of exedge's own), listening on loopback,
that records every command line and every message it accepts, and can be
told to misbehave: per-recipient replies, a 421 greeting, PIPELINING and
SIZE advertised or not, a connection closed in the middle of DATA, a
STARTTLS that is offered and then refused or broken.
"""

from __future__ import annotations

import re

import attrs
from twisted.internet import defer, endpoints, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.mail import smtp
from zope.interface import implementer

from exedge.interfaces import IQueueSink


class ManualRun:
    """
    A spool thread pool that runs nothing until told: C{run(f)} gives a
    Deferred that fires with C{f()} when the test calls L{finish_one} or
    L{flush}, in the order the work was asked for.
    """

    def __init__(self):
        self.jobs: list = []

    def __call__(self, f) -> defer.Deferred:
        d = defer.Deferred()
        self.jobs.append((f, d))
        return d

    def finish_one(self) -> None:
        f, d = self.jobs.pop(0)
        d.callback(f())

    def flush(self) -> None:
        while self.jobs:
            self.finish_one()


@implementer(IQueueSink)
class Announced:
    """The queue, as far as cleanup can tell: it keeps the committed messages announced to it."""

    def __init__(self):
        self.messages: list = []

    def submit(self, message) -> None:
        self.messages.append(message)


_FINAL_LINE = re.compile(r"^[245]\.\d+\.\d+$")


class TLSStringTransport(StringTransport):
    """
    A C{StringTransport} that can be asked to start TLS: it only records
    the options (C{tls_options}), and whoever drives the session decides
    when the handshake is done (the protocol's C{handshakeCompleted}).
    """

    tls_options = None

    def startTLS(self, options) -> None:
        self.tls_options = options


class StringSession:
    """
    One exedge SMTP session on a C{StringTransport}. C{config} is a loaded
    L{exedge.config.Config}; the session arrives on the first binding of
    its first receive connector (or C{local}, (host, port)) from C{peer}.
    Committed messages land in C{sink.messages}, and their bytes in a real
    spool under C{spool_directory} (or C{spool}, one the test shares with
    a queue manager); disk work runs at once, or through C{run} (a
    L{ManualRun}). C{pipeline}: an L{exedge.pipeline.Pipeline}
    of the stages under test, built on C{clock}.

    C{portal}: a twisted.cred portal for AUTH (None: AUTH is not offered).
    C{tls}: receive connector name -> TLS options, as the server's context
    has them; STARTTLS is then offered where the connector allows it, the
    transport is a L{TLSStringTransport}, and the test says how the
    handshake ends (L{handshake}, or C{proto.connectionLost} for a failed
    one). The bytes go on in clear text: what is tested is the session's
    state machine around TLS, not the TLS layer (Twisted's).
    """

    def __init__(self, config, spool_directory: str, *, peer: str = "127.0.0.1", local=None, run=None,
                 pipeline=None, clock=None, spool=None, portal=None, tls=None):
        from exedge.cleanup import Cleanup
        from exedge.queue import Spool
        from exedge.receive import ConnectorTable, ServerContext
        from exedge.routing import Router
        self.config = config
        self.clock = clock if clock is not None else task.Clock()
        self.sink = Announced()
        if spool is None:
            spool = Spool(spool_directory, run or (lambda f: defer.maybeDeferred(f)))
            spool.prepare()
        self.spool = spool
        self.context = ServerContext(
            server=config.server,
            connectors=ConnectorTable(config.receive_connectors),
            router=Router(config.accepted_domains, config.send_connectors),
            cleanup=Cleanup(self.spool, self.sink, self.clock, quarantine_mailbox=config.server.quarantine_mailbox),
            clock=self.clock,
            pipeline=pipeline,
            portal=portal,
            tls=dict(tls or {}),
        )
        if local is None:
            binding = config.receive_connectors[0].bindings[0]
            local = (binding.host, binding.port)
        self.local, self.peer = local, peer
        self.reconnect()

    def reconnect(self) -> None:
        """
        A new session on the same server (its context, clock, spool and
        connection counts): C{transport} and C{proto} are the new ones; the
        old session is left as it was (a fuzzer runs many sessions on one
        server this way, as a real one would).
        """
        from exedge.receive import SMTPServer
        self.transport = TLSStringTransport(hostAddress=IPv4Address("TCP", *self.local),
                                            peerAddress=IPv4Address("TCP", self.peer, 40000))
        self.proto = SMTPServer(self.context)
        self.proto.makeConnection(self.transport)

    def handshake(self) -> None:
        """The TLS handshake that STARTTLS began has completed (see L{TLSStringTransport})."""
        assert self.transport.tls_options is not None, "no STARTTLS began a handshake"
        self.proto.handshakeCompleted()

    def send(self, data: bytes) -> bytes:
        """Feed C{data} as the client; what the session wrote in answer."""
        self.transport.clear()
        self.proto.dataReceived(data)
        return self.transport.value()

    def codes(self, data: bytes) -> list[str]:
        """The code and enhanced status of each final reply line to C{data}: ["250 2.1.0", "354", ...]."""
        codes = []
        for line in self.send(data).decode().split("\r\n"):
            if line and line[3:4] == " ":
                first = line[4:].split(" ", 1)[0]
                codes.append(line[:3] + (" " + first if _FINAL_LINE.match(first) else ""))
        return codes


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
        self.protocol.deliveries = getattr(self.protocol, "deliveries", 0) + 1
        limit = self.sink.close_after_deliveries
        if limit is not None and self.protocol.deliveries >= limit:
            # after the 250 has gone out: the peer sees a clean answer, then a closed connection
            from twisted.internet import reactor
            reactor.callLater(0, self.protocol.transport.loseConnection)
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
        reply = self.sink.rcpt_replies.get(address)
        if isinstance(reply, str):
            # "550 No such user here"; a "\n" in the text makes a multi-line reply
            raise smtp.SMTPBadRcpt(user, int(reply[:3]), reply[4:])
        if reply is not None:
            raise smtp.SMTPBadRcpt(user, reply, f"{reply} refused by the test sink")
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

    _hello_awaited = False

    def dataReceived(self, data):
        if self._hello_awaited:
            # the client's TLS ClientHello: answer with what no TLS client can take
            self._hello_awaited = False
            self.transport.write(b"this is not a TLS record\r\n")
            self.transport.loseConnection()
            return
        return super().dataReceived(data)

    def lineReceived(self, line):
        if self.mode == smtp.COMMAND:
            self.sink.commands.append(line.decode("latin-1"))
        return super().lineReceived(line)

    def ext_STARTTLS(self, rest):
        broken = self.sink.broken_starttls
        if broken is None:
            return super().ext_STARTTLS(rest)
        if broken == "handshake":
            self.sendCode(220, b"2.0.0 Ready to start TLS")
            self._hello_awaited = True
        elif broken == "injected":
            # the 220 and a reply in plain text in one write, then hang up
            self.transport.write(b"220 2.0.0 Ready to start TLS\r\n250 injected in plain text\r\n")
            self.transport.loseConnection()
        else:
            self.sendCode(broken, b"TLS not available now")

    def extensions(self):
        ext = super().extensions()
        if self.sink.pipelining:
            ext[b"PIPELINING"] = None
        if self.sink.size is not None:
            ext[b"SIZE"] = [str(self.sink.size).encode()]
        if self.sink.dsn:
            ext[b"DSN"] = None
        ext[b"8BITMIME"] = None   # stock twisted.mail passes 8-bit bodies through untouched
        if self.sink.broken_starttls is not None and not self.startedTLS:
            ext[b"STARTTLS"] = None
        return ext


class RecordingSink:
    """A loopback SMTP server that records what it is sent."""

    def __init__(self, *, pipelining: bool = True, size: int | None = None, dsn: bool = True,
                 greeting_code: int = 220, rcpt_replies: dict | None = None,
                 close_after_lines: int | None = None, close_after_deliveries: int | None = None,
                 broken_starttls: str | int | None = None):
        """
        C{rcpt_replies}: address -> a code (answered "<code> refused by the
        test sink") or a whole reply, "550 No such user here" (a "\n" in
        its text makes it multi-line). C{broken_starttls}: STARTTLS is
        offered, then "handshake": 220, and bytes that are no TLS in answer
        to the client's hello; "injected": 220 and a plain-text reply in
        one write, then the connection closed; a 4xx or 5xx code: refused.
        """
        self.pipelining = pipelining
        self.size = size
        self.dsn = dsn
        self.greeting_code = greeting_code
        self.rcpt_replies = dict(rcpt_replies or {})   # address -> 4xx/5xx code, or a whole reply
        self.close_after_lines = close_after_lines
        self.close_after_deliveries = close_after_deliveries   # per connection, one per recipient
        self.broken_starttls = broken_starttls
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


class _MemoryAuthority:
    """A twisted.names authority over records held in memory (no zone file)."""

    @staticmethod
    def make(zone: str, records: dict):
        from twisted.names import authority, common, dns

        class Memory(authority.FileAuthority):
            def __init__(self):
                common.ResolverBase.__init__(self)
                self._cache = {}
                self.soa = (zone.encode(), dns.Record_SOA(mname=b"ns." + zone.encode(),
                                                           rname=b"hostmaster." + zone.encode(),
                                                           serial=1, minimum=60))
                self.records = {}
                for name, recs in records.items():
                    self.records[name.lower().encode()] = list(recs)
                self.records.setdefault(zone.encode(), []).insert(0, self.soa[1])

        return Memory()


class DNSZoneServer:
    """
    An authoritative DNS server on loopback (UDP and TCP on one port) for
    routing tests: C{zones} maps a zone name to {owner name: [records]},
    with records written as ("MX", 10, "mx1.example.test"), ("A", "127.0.0.1"),
    ("AAAA", "::1"), ("TXT", "v=spf1 -all") (several strings: ("TXT", "a", "b")).
    A null MX (RFC 7505) is ("MX", 0, ".").
    """

    def __init__(self, zones: dict):
        from twisted.names import dns

        def record(spec):
            kind = spec[0]
            if kind == "MX":
                name = b"" if spec[2] == "." else spec[2].encode()
                return dns.Record_MX(spec[1], name, ttl=60)
            if kind == "A":
                return dns.Record_A(spec[1], ttl=60)
            if kind == "AAAA":
                return dns.Record_AAAA(spec[1], ttl=60)
            if kind == "TXT":
                return dns.Record_TXT(*(part.encode() for part in spec[1:]), ttl=60)
            raise ValueError(f"unsupported record {spec!r}")

        self.authorities = [
            _MemoryAuthority.make(zone, {name: [record(r) for r in recs] for name, recs in names.items()})
            for zone, names in zones.items()
        ]
        self.port = None

    def start(self, reactor, port: int = 0, host: str = "127.0.0.1"):
        from twisted.names import dns, server

        from twisted.internet.error import CannotListenError

        authorities = self.authorities

        class Factory(server.DNSServerFactory):
            def gotResolverError(self, failure, protocol, message, address):
                """NXDOMAIN with the zone's SOA in the authority section, as RFC 2308 §3 has servers answer."""
                if not failure.check(dns.AuthoritativeDomainError):
                    return super().gotResolverError(failure, protocol, message, address)
                response = self._responseFromMessage(message=message, rCode=dns.ENAME)
                response.auth = True
                name = message.queries[0].name.name if message.queries else b""
                for zone in authorities:
                    origin, soa = zone.soa
                    if name.lower() == origin.lower() or name.lower().endswith(b"." + origin.lower()):
                        response.authority = [dns.RRHeader(origin, dns.SOA, dns.IN, soa.minimum, soa, auth=True)]
                self.sendReply(protocol, response, address)

        factory = Factory(authorities=authorities)
        # UDP picks the port; the same TCP port may be taken (by any
        # client's ephemeral port): then try another, a bounded number of times
        for attempt in range(20):
            self._udp = reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface=host)
            self.port = self._udp.getHost().port
            try:
                self._tcp = reactor.listenTCP(self.port, factory, interface=host)
                return self
            except CannotListenError:
                self._udp.stopListening()
                if port or attempt == 19:
                    raise
        return self

    def stop(self):
        return defer.gatherResults([defer.maybeDeferred(self._udp.stopListening),
                                    defer.maybeDeferred(self._tcp.stopListening)])


def main(argv=None) -> None:
    """
    Run a sink as its own process (for tests that drive exedge with
    blocking clients): each accepted message and recipient becomes a file
    in --out, its first lines X-Sink-From: and X-Sink-Rcpt:.

        python -m exedge.testing --port 2627 --out DIR [--refuse ADDR=550] [--greeting 421]
        python -m exedge.testing ... --refuse "ADDR=550 No such user here"     (the whole reply)
    """
    import argparse
    import itertools
    import os

    from twisted.internet import reactor

    parser = argparse.ArgumentParser(prog="python -m exedge.testing")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address to listen on")
    parser.add_argument("--out", help="where the sink writes what it receives")
    parser.add_argument("--dns", metavar="ZONES_JSON",
                        help="run a DNS zone server instead: {zone: {name: [[type, ...], ...]}}")
    parser.add_argument("--refuse", action="append", default=[], metavar="ADDRESS=CODE",
                        help='ADDRESS=550, or ADDRESS="550 the whole reply" (\\n in it: a multi-line reply)')
    parser.add_argument("--greeting", type=int, default=220)
    parser.add_argument("--no-pipelining", action="store_true")
    parser.add_argument("--no-dsn", action="store_true", help="do not offer DSN")
    args = parser.parse_args(argv)
    if args.dns:
        import json

        with open(args.dns) as f:
            zones = {zone: {name: [tuple(r) for r in recs] for name, recs in names.items()}
                     for zone, names in json.load(f).items()}
        DNSZoneServer(zones).start(reactor, port=args.port, host=args.host)
        reactor.run()
        return
    os.makedirs(args.out, exist_ok=True)
    refuse = {a: int(c) if c.isdigit() else c.replace("\\n", "\n")
              for a, _, c in (r.partition("=") for r in args.refuse)}
    sink = RecordingSink(pipelining=not args.no_pipelining, dsn=not args.no_dsn, greeting_code=args.greeting,
                         rcpt_replies=refuse)
    counter = itertools.count()

    def store(received: Received) -> None:
        name = os.path.join(args.out, f"{next(counter):06d}.eml")
        with open(name + ".tmp", "wb") as f:
            f.write(b"X-Sink-From: <%s>\r\nX-Sink-Rcpt: <%s>\r\n" % (received.sender.encode(),
                                                                     received.recipient.encode()))
            f.write(received.data)
        os.rename(name + ".tmp", name)

    sink.on_message = store

    sink.start(reactor, host=args.host, port=args.port).addErrback(lambda f: (print(f.getTraceback()), reactor.stop()))
    reactor.run()


if __name__ == "__main__":
    main()
