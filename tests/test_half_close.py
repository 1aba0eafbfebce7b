"""
A client that closes its sending side (shutdown(SHUT_WR)) still gets every
answer it is owed, in order, and then the server closes.

Exim sends the final dot and QUIT in one packet and then half-closes; a
server that takes the half-close for a lost connection never sends the 250
of a message it has already queued, so Exim sends it again. Real exedge
(twistd) on loopback, a raw socket, and the drop directory to count what
was delivered.
"""

from __future__ import annotations

import re
import socket

import pytest

from test_hostile_input import Client, assert_queued, committed_files, dropped, message, wait_dropped

BOUND = 10.0     # the server's inactivity timeout is 60 s: closing must not wait for it


def replies_until_eof(sock: socket.socket) -> list[bytes]:
    """Every reply line the server sends until it closes; fails if it does not close within BOUND."""
    sock.settimeout(BOUND)
    data = b""
    for _ in range(1000):
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            pytest.fail(f"the server neither answered nor closed within {BOUND:.0f} s; got {data!r}")
        except ConnectionResetError:
            pytest.fail(f"the server reset the connection instead of closing it; got {data!r}")
        if not chunk:
            break
        data += chunk
    else:
        pytest.fail("the server kept sending")
    assert data.endswith(b"\r\n") or data == b"", data
    return [line for line in data.split(b"\r\n")[:-1] if line[3:4] != b"-"]   # the last line of each reply


def codes(lines: list[bytes]) -> list[str]:
    return [line[:3].decode() for line in lines]


def envelope(subject: str) -> bytes:
    return (b"EHLO exim.client.test\r\nMAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
            + message(subject) + b".\r\n")


def test_dot_and_quit_then_half_close_get_250_and_221_and_one_delivery(start_server):
    server = start_server()
    with socket.create_connection(("127.0.0.1", server.port), timeout=BOUND) as sock:
        # everything in one send, as a pipelining client that ignores the
        # 354 wait would; Exim's own packet is the dot and QUIT
        sock.sendall(envelope("half-closed") + b"QUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        lines = replies_until_eof(sock)
    assert codes(lines) == ["220", "250", "250", "250", "354", "250", "221"], lines
    queued = lines[5].decode()
    assert re.match(r"^250 2\.6\.0 <\S+> Queued mail for delivery$", queued), queued
    delivered = wait_dropped(server, "half-closed")    # asserts exactly one file with this subject
    queue_id = re.search(r"<(\S+)>", queued).group(1)
    assert queue_id.encode() in delivered.data.split(b"\r\n\r\n")[0]
    # a later message arrives too, and still no second copy of the first
    with Client(server.port) as c:
        c.greeting()
        c.ehlo()
        assert_queued(c.send_message("alice@sender.test", ["bob@example.com"], message("after")))
    wait_dropped(server, "after")
    assert sum(b"Subject: half-closed\r\n" in d.data for d in dropped(server)) == 1


def test_dot_then_half_close_without_quit_gets_the_250(start_server):
    server = start_server()
    with socket.create_connection(("127.0.0.1", server.port), timeout=BOUND) as sock:
        sock.sendall(envelope("no quit"))
        sock.shutdown(socket.SHUT_WR)
        lines = replies_until_eof(sock)
    assert codes(lines) == ["220", "250", "250", "250", "354", "250"], lines
    wait_dropped(server, "no quit")


@pytest.mark.parametrize("tail, answered", [
    (b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<victim@exa", ["250"]),          # in the middle of a command line
    (b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
     b"Subject: unfinished\r\n\r\nSMUGGLED-PAYLOAD\r\n", ["250", "250", "354"]),   # in DATA, no final dot
])
def test_half_close_in_the_middle_queues_nothing_of_it_and_ends(start_server, tail, answered):
    server = start_server()
    with socket.create_connection(("127.0.0.1", server.port), timeout=BOUND) as sock:
        sock.sendall(envelope("complete") + tail)
        sock.shutdown(socket.SHUT_WR)
        lines = replies_until_eof(sock)
    # the complete message's 250 (owed, sent after the half-close), the
    # answers to the complete commands after it, nothing for the unfinished one
    assert codes(lines) == ["220", "250", "250", "250", "354", "250"] + answered, lines
    assert lines[5].startswith(b"250 2.6.0 ")
    wait_dropped(server, "complete")
    with Client(server.port) as c:                      # a canary: once it is delivered, so is anything else
        c.greeting()
        c.ehlo()
        assert_queued(c.send_message("canary@sender.test", ["bob@example.com"], message("canary")))
    wait_dropped(server, "canary")
    for data in committed_files(server):
        assert b"evil@evil.test" not in data and b"SMUGGLED-PAYLOAD" not in data, data[:500]
    assert "Traceback" not in server.log, server.log[-4000:]


def test_half_close_right_after_the_banner_ends_the_session(start_server):
    server = start_server()
    with socket.create_connection(("127.0.0.1", server.port), timeout=BOUND) as sock:
        sock.shutdown(socket.SHUT_WR)
        assert codes(replies_until_eof(sock)) == ["220"]
