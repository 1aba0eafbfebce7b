"""
Writing a reply to the socket at once instead of on the next turn of the
reactor.

Twisted's C{FileDescriptor.write} only buffers: it asks epoll to report the
socket writable (one C{epoll_ctl}), sends on a later turn of the loop, after
every other ready event has been handled, then tells epoll to stop watching
(another C{epoll_ctl}). For SMTP that is the common case: a short reply to a
client that sends one command and waits (C{smtp-source}, most MTAs without
pipelining), so each reply paid two system calls, a trip round the loop and
the wait behind other sessions' work. Profiling the 10-connection relay
benchmark showed eight of those per message (bench/README.md).

Twisted has no option for this, hence this function. It sends directly only
when that cannot reorder or lose anything: a plain TCP transport (not TLS,
whose bytes must go through the TLS layer), connected, not closing or
aborted, with
nothing already buffered. Whatever the socket does not take at once, and
any error, goes to the ordinary C{transport.write}, so flow control,
producers and connection-lost handling stay Twisted's.

L{write_through_to_child} is the same for a child process's standard
input: the commit worker's requests, for which the session waits before
its 250. Twisted's process writer also stops and restarts watching the
pipe for its end around every write (two more C{epoll_ctl}), and sent a
request only after every other event of that turn of the loop, a
delivery's replies and data among them (bench/README.md, "Commit
requests written at once").
"""

from __future__ import annotations

import os

from twisted.internet import process, tcp


def _open_and_empty(descriptor) -> bool:
    """Whether Twisted's C{FileDescriptor} C{descriptor} may still write and holds nothing unwritten."""
    return (descriptor.connected and not descriptor.disconnecting and not descriptor._writeDisconnected
            and not getattr(descriptor, "_aborting", False)
            and not descriptor.dataBuffer and not descriptor._tempDataBuffer)


def write_through(transport, data: bytes) -> None:
    """C{transport.write(data)}, sending at once when nothing is queued ahead of it."""
    if isinstance(transport, tcp.Connection) and not transport.TLS and data and _open_and_empty(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0   # EAGAIN, or an error Twisted's own write path will find and report
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def write_through_to_child(transport, parts: list[bytes]) -> None:
    """
    C{transport.writeSequence(parts)} to a child process's standard input,
    written at once (one C{writev}) when nothing is queued ahead of it;
    whatever the pipe does not take goes to C{writeSequence}.
    """
    writer = getattr(transport, "pipes", {}).get(0)
    if isinstance(writer, process.ProcessWriter) and parts and _open_and_empty(writer):
        try:
            sent = os.writev(writer.fd, parts)
        except OSError:
            sent = 0   # EAGAIN, or an error Twisted's own write path will find and report
        parts = _after(parts, sent)
        if not parts:
            return
    transport.writeSequence(parts)


def _after(parts: list[bytes], sent: int) -> list[bytes]:
    """What of C{parts} is left once their first C{sent} bytes are written."""
    for i, part in enumerate(parts):
        if sent < len(part):
            return [part[sent:], *parts[i + 1:]]
        sent -= len(part)
    return []
