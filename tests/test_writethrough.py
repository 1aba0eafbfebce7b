"""
write_through on real loopback connections: a reply leaves at once when
nothing is queued, never overtakes queued bytes, survives a partial send,
and goes through TLS once TLS has started. write_through_to_child the same
on a real child process's standard input.
"""

import fcntl
import socket
import sys

import pytest_twisted
from twisted.internet import defer, endpoints, protocol, reactor, ssl, task

from exedge import tls
from exedge.writethrough import write_through, write_through_to_child


class Collect(protocol.Protocol):
    def __init__(self):
        self.data = b""
        self.connected_d = defer.Deferred()
        self.waiting: list = []

    def connectionMade(self):
        self.connected_d.callback(self)

    def dataReceived(self, data):
        self.data += data
        for want, d in list(self.waiting):
            if len(self.data) >= want:
                self.waiting.remove((want, d))
                d.callback(self.data)

    def until(self, length: int, timeout: float = 10):
        d = defer.Deferred()
        self.waiting.append((length, d))
        self.dataReceived(b"")
        return d.addTimeout(timeout, reactor)


@defer.inlineCallbacks
def pair(server_tls=None):
    """A listening server protocol and a connected client, both Collect."""
    servers = []

    def build():
        p = Collect()
        servers.append(p)
        return p

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(build), interface="127.0.0.1")
    client = Collect()
    yield endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
        protocol.Factory.forProtocol(lambda: client))
    while not servers:
        yield task.deferLater(reactor, 0.01, lambda: None)
    server = yield servers[0].connected_d
    return port, server, client


@defer.inlineCallbacks
def close(port, *protocols):
    for p in protocols:
        p.transport.loseConnection()
    yield port.stopListening()
    yield task.deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.inlineCallbacks
def test_a_reply_is_sent_before_returning():
    port, server, client = yield pair()
    try:
        write_through(server.transport, b"250 2.0.0 OK\r\n")
        # nothing left for the reactor to do: not buffered, not waiting on epoll
        assert server.transport.dataBuffer == b"" and server.transport._tempDataBuffer == []
        assert server.transport not in reactor.getWriters()
        got = yield client.until(14)
        assert got == b"250 2.0.0 OK\r\n"
    finally:
        yield close(port, server, client)


@pytest_twisted.inlineCallbacks
def test_never_overtakes_bytes_already_queued():
    port, server, client = yield pair()
    try:
        server.transport.write(b"first ")        # buffered until the reactor turns
        write_through(server.transport, b"second")
        got = yield client.until(12)
        assert got == b"first second"
    finally:
        yield close(port, server, client)


@pytest_twisted.inlineCallbacks
def test_the_rest_of_a_partial_send_is_queued_in_order():
    port, server, client = yield pair()
    try:
        # small socket buffers, so one send cannot take it all whatever the host's TCP tuning
        server.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        client.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.transport.pauseProducing()          # the peer stops reading: the socket fills
        big = bytes(range(256)) * (32 * 1024)      # 8 MiB
        write_through(server.transport, big)
        assert server.transport.dataBuffer or server.transport._tempDataBuffer, "expected a partial send"
        write_through(server.transport, b"END")
        client.transport.resumeProducing()
        got = yield client.until(len(big) + 3, timeout=30)
        assert got == big + b"END"
    finally:
        yield close(port, server, client)


@pytest_twisted.inlineCallbacks
def test_after_starttls_bytes_go_through_tls():
    cert, key = tls.self_signed("edge01.example.com")
    port, server, client = yield pair()
    try:
        server.transport.startTLS(tls.server_options(cert, key))
        client.transport.startTLS(ssl.CertificateOptions(verify=False))
        write_through(server.transport, b"220 over TLS\r\n")
        got = yield client.until(14)
        assert got == b"220 over TLS\r\n"            # decrypted by the client's TLS layer
    finally:
        yield close(port, server, client)


@pytest_twisted.inlineCallbacks
def test_nothing_is_sent_after_the_connection_is_aborted():
    port, server, client = yield pair()
    try:
        server.transport.abortConnection()
        write_through(server.transport, b"too late\r\n")
        yield task.deferLater(reactor, 0.1, lambda: None)
        assert client.data == b""
    finally:
        yield close(port, server, client)


class Echo(protocol.ProcessProtocol):
    """A child that reads its stdin to the end and writes it back on stdout."""

    def __init__(self):
        self.out = b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.out += data

    def processEnded(self, reason):
        self.ended.callback(self.out)


def echo_child() -> Echo:
    child = Echo()
    reactor.spawnProcess(child, sys.executable, [sys.executable, "-c",
                         "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())"],
                         env=None, childFDs={0: "w", 1: "r", 2: 2})
    return child


@pytest_twisted.inlineCallbacks
def test_a_request_to_a_child_is_written_before_returning():
    child = echo_child()
    stdin = child.transport.pipes[0]
    write_through_to_child(child.transport, [b"header ", b"message ", b"footer"])
    # nothing left for the reactor to do: not buffered, not waiting on epoll
    assert stdin.dataBuffer == b"" and stdin._tempDataBuffer == []
    assert stdin not in reactor.getWriters()
    child.transport.closeStdin()
    got = yield child.ended.addTimeout(30, reactor)
    assert got == b"header message footer"


@pytest_twisted.inlineCallbacks
def test_to_a_child_the_rest_of_a_partial_write_and_later_requests_follow_in_order():
    child = echo_child()
    stdin = child.transport.pipes[0]
    fcntl.fcntl(stdin.fileno(), fcntl.F_SETPIPE_SZ, 4096)      # a pipe that cannot take it all
    first = [bytes([n]) * 3000 for n in range(1, 40)]          # 117,000 bytes in 39 parts
    write_through_to_child(child.transport, first)
    assert stdin.dataBuffer or stdin._tempDataBuffer, "expected a partial write"
    write_through_to_child(child.transport, [b"second"])      # queued behind the rest, never ahead
    child.transport.closeStdin()
    got = yield child.ended.addTimeout(30, reactor)
    assert got == b"".join(first) + b"second"


@pytest_twisted.inlineCallbacks
def test_to_a_child_never_overtakes_bytes_already_queued():
    child = echo_child()
    child.transport.writeSequence([b"first "])                # buffered until the reactor turns
    write_through_to_child(child.transport, [b"second"])
    child.transport.closeStdin()
    got = yield child.ended.addTimeout(30, reactor)
    assert got == b"first second"
