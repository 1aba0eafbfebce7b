"""
Hostile and malformed SMTP input against the real server (twistd on
loopback), driven over raw sockets the way a misbehaving or malicious client
would drive it.

Written from the hostile-input specification, not from the code:

  - over-long command lines (> 512 octets) and text lines (> 1000 octets);
  - bare CR / LF / NUL, in commands and in DATA (SMTP smuggling);
  - max_protocol_errors, tarpit, SIZE, recipient, hop-count and header limits;
  - relay refusal for every routing trick;
  - PIPELINING reply order, connection caps, peers no connector accepts.

Reply synchronisation: where a test must prove that *nothing else* was
executed, it sends HELP afterwards and collects every reply that precedes
the 214; any extra command the server ran shows up as an extra reply.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

import pytest

from harness import FROM_INTERNAL_ORG, LOCAL_DROP, server_config

TIMEOUT = 10.0          # every socket operation
ANON = "127.0.0.1"      # "From Internet": anonymous
SECURED = "127.0.0.2"   # "From Internal Org": externally secured, may relay

SMUGGLED = (
    b"MAIL FROM:<evil@evil.test>\r\n"
    b"RCPT TO:<victim@example.com>\r\n"
    b"DATA\r\n"
    b"From: evil@evil.test\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"SMUGGLED-PAYLOAD\r\n"
)


# -- a raw SMTP client --------------------------------------------------------


class ServerClosed(AssertionError):
    pass


@dataclass
class Reply:
    code: int
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def status(self) -> str | None:
        m = re.match(r"^(\d\.\d{1,3}\.\d{1,3})(?:\s|$)", self.lines[0])
        return m.group(1) if m else None

    def __repr__(self) -> str:
        return f"<{self.code} {self.text!r}>"


class Client:
    """Sends bytes, reads complete (multi-line) replies; every recv has a timeout."""

    def __init__(self, port: int, source: str | None = None, timeout: float = TIMEOUT):
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout,
            source_address=(source, 0) if source else None,
        )
        self.buf = b""

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("ascii")
        self.sock.sendall(data)

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except ConnectionResetError:
            return b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self._recv()
            if not chunk:
                raise ServerClosed(f"server closed the connection (unparsed: {self.buf!r})")
            self.buf += chunk
            assert len(self.buf) < 1 << 20, "reply line without CRLF"
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> Reply:
        lines: list[str] = []
        code = None
        while True:
            raw = self._line()
            m = re.match(rb"^(\d{3})([ -])(.*)$", raw)
            assert m, f"malformed reply line {raw!r}"
            this = int(m.group(1))
            assert code is None or this == code, f"reply code changed inside a multi-line reply: {raw!r}"
            code = this
            lines.append(m.group(3).decode("ascii", "replace"))
            if m.group(2) == b" ":
                return Reply(code, lines)

    def cmd(self, line: bytes | str) -> Reply:
        if isinstance(line, str):
            line = line.encode("ascii")
        self.send(line + b"\r\n")
        return self.reply()

    def greeting(self) -> Reply:
        r = self.reply()
        assert r.code == 220, r
        return r

    def ehlo(self, name: str = "client.test") -> Reply:
        r = self.cmd(f"EHLO {name}")
        assert r.code == 250, r
        return r

    def replies_until_sync(self) -> list[Reply]:
        """Send HELP; return every reply that came before its 214."""
        self.send(b"HELP\r\n")
        out = []
        while True:
            r = self.reply()
            if r.code == 214:
                return out
            out.append(r)
            assert len(out) < 50, out

    def assert_closed(self, within: float = 5.0) -> None:
        """The server closes the connection (EOF or reset) with nothing more to say."""
        assert self.buf == b"", f"unexpected data before close: {self.buf!r}"
        self.sock.settimeout(within)
        try:
            data = self._recv()
        except socket.timeout:
            pytest.fail("the server did not close the connection")
        finally:
            self.sock.settimeout(TIMEOUT)
        assert data == b"", f"expected the connection to be closed, got {data!r}"

    # -- transactions -------------------------------------------------------

    def mail(self, sender: str, params: str = "") -> Reply:
        return self.cmd(f"MAIL FROM:<{sender}>{' ' + params if params else ''}")

    def rcpt(self, rcpt: str) -> Reply:
        return self.cmd(f"RCPT TO:<{rcpt}>")

    def send_message(self, sender: str, rcpts: list[str], content: bytes) -> Reply:
        """A whole transaction; returns the reply to the final dot."""
        r = self.mail(sender)
        assert r.code == 250, r
        for rcpt in rcpts:
            r = self.rcpt(rcpt)
            assert r.code == 250, (rcpt, r)
        r = self.cmd("DATA")
        assert r.code == 354, r
        assert content.endswith(b"\r\n")
        self.send(content + b".\r\n")
        return self.reply()


def connect(server, source: str | None = None) -> Client:
    c = Client(server.port, source)
    c.greeting()
    return c


def message(subject: str, body: bytes = b"hello\r\n", sender: str = "alice@sender.test") -> bytes:
    return (f"From: {sender}\r\nTo: bob@example.com\r\nSubject: {subject}\r\n\r\n".encode("ascii") + body)


def big_body(size: int) -> bytes:
    line = b"0123456789" * 9 + b"ABCDEFGH\r\n"     # 100 octets
    return line * (size // len(line) + 1)


def open_data(c: Client) -> None:
    """EHLO, MAIL, RCPT and DATA: the client is now sending message data."""
    c.ehlo()
    assert_ok(c.mail("alice@sender.test"))
    assert_ok(c.rcpt("bob@example.com"))
    assert c.cmd("DATA").code == 354


def assert_ok(r: Reply) -> None:
    assert r.code == 250, r


def assert_queued(r: Reply) -> None:
    assert r.code == 250 and "Queued mail for delivery" in r.text, r


# -- what was delivered -------------------------------------------------------


@dataclass
class Dropped:
    sender: str
    receivers: list[str]
    data: bytes


def dropped(server) -> list[Dropped]:
    out = []
    for path in server.drop_files():
        with open(path, "rb") as f:
            data = f.read()
        sender = re.search(rb"^X-Sender: <(.*?)>\r\n", data)
        receivers = re.findall(rb"^X-Receiver: <(.*?)>\r\n", data, re.M)
        out.append(Dropped(sender.group(1).decode() if sender else "",
                           [r.decode() for r in receivers], data))
    return out


def wait_dropped(server, subject: str) -> Dropped:
    """Wait until the message with this Subject is in the drop folder."""
    needle = f"Subject: {subject}\r\n".encode()

    def find():
        return [d for d in dropped(server) if needle in d.data]

    found = server.wait_for(find, what=f"drop file for {subject!r}")
    assert len(found) == 1, found
    return found[0]


def committed_files(server) -> list[bytes]:
    """Every delivered or queued message the server holds (drop folder and spool queue)."""
    out = []
    for top in (server.path("var", "drop"), server.path("var", "spool", "queue")):
        for root, _dirs, files in os.walk(top):
            for name in files:
                try:
                    with open(os.path.join(root, name), "rb") as f:
                        out.append(f.read())
                except FileNotFoundError:   # delivered and removed meanwhile
                    pass
    return out


def assert_nothing_smuggled(server, canary: str) -> None:
    """
    A canary sent after the attack has been delivered; by then nothing from
    the smuggled envelope may be in the drop folder or the queue.
    """
    wait_dropped(server, canary)
    for d in dropped(server):
        assert d.sender != "evil@evil.test", d
        assert "victim@example.com" not in d.receivers, d
    for data in committed_files(server):
        assert b"evil@evil.test" not in data and b"SMUGGLED-PAYLOAD" not in data, data[:500]


def send_canary(c: Client, subject: str) -> None:
    assert_queued(c.send_message("canary@sender.test", ["bob@example.com"], message(subject)))


# -- command line length --------------------------------------------------------


def test_command_line_of_exactly_512_octets_is_accepted(start_server):
    server = start_server()
    with connect(server) as c:
        c.ehlo()
        line = b"NOOP " + b"a" * (512 - 2 - 5)
        assert len(line + b"\r\n") == 512
        assert_ok(c.cmd(line))


def test_command_line_over_512_octets_gets_500_and_remainder_is_not_executed(start_server):
    server = start_server()
    with connect(server) as c:
        c.ehlo()
        # whatever the server cut off, its remainder must not run as a command
        line = b"NOOP " + b"a" * 505 + b"QUIT RSET NOOP" + b"b" * 100 + b" QUIT"
        assert len(line) + 2 > 512
        c.send(line + b"\r\n")
        replies = c.replies_until_sync()
        assert [(r.code, r.status) for r in replies] == [(500, "5.5.2")], replies
        assert_ok(c.cmd("NOOP"))
        # the session is fully usable: a whole transaction goes through
        send_canary(c, "after long command line")
    wait_dropped(server, "after long command line")


def test_command_line_of_513_octets_gets_500(start_server):
    server = start_server()
    with connect(server) as c:
        c.ehlo()
        line = b"NOOP " + b"a" * (513 - 2 - 5)
        assert len(line + b"\r\n") == 513
        c.send(line + b"\r\n")
        replies = c.replies_until_sync()
        assert [(r.code, r.status) for r in replies] == [(500, "5.5.2")], replies
        assert_ok(c.cmd("NOOP"))


def test_100kb_line_without_crlf_is_refused_once_and_not_executed(start_server):
    server = start_server()
    with connect(server) as c:
        c.ehlo()
        c.send(b"NOOP " * 20000)            # 100 KB, no CRLF, looks like commands
        c.send(b"\r\n")
        replies = c.replies_until_sync()
        assert [(r.code, r.status) for r in replies] == [(500, "5.5.2")], replies
        assert_ok(c.cmd("NOOP"))
    # the server is alive and serves a new connection
    with connect(server) as c2:
        c2.ehlo()
        assert_ok(c2.cmd("NOOP"))


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_endless_line_without_crlf_does_not_grow_server_memory(start_server):
    server = start_server()
    pid = server.proc.pid
    with connect(server) as c:
        c.ehlo()
        assert_ok(c.cmd("NOOP"))
        before = _rss_kb(pid)
        chunk = b"X" * (1 << 20)
        for _ in range(48):                 # 48 MB in one "line"
            c.send(chunk)
        c.send(b"\r\n")
        replies = c.replies_until_sync()
        after = _rss_kb(pid)
        assert [(r.code, r.status) for r in replies] == [(500, "5.5.2")], replies
    assert after - before < 24 * 1024, f"server RSS grew from {before} kB to {after} kB"
    with connect(server) as c2:
        assert_ok(c2.cmd("NOOP"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_client_that_never_reads_replies_cannot_grow_server_memory(start_server):
    server = start_server()
    pid = server.proc.pid
    before = _rss_kb(pid)
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(3)
        chunk = b"EHLO a.test\r\n" * 4096      # each EHLO answers ~16 times its size
        try:
            while sent < 25 * (1 << 20):          # bounded: 25 MiB of commands at most
                s.sendall(chunk)
                sent += len(chunk)
        except socket.timeout:
            pass                                  # the server stopped reading: as it should
        after = _rss_kb(pid)
    assert sent < 25 * (1 << 20), "the server kept reading although its replies were not read"
    assert after - before < 32 * 1024, f"server RSS grew from {before} kB to {after} kB"
    with connect(server) as c:
        assert_ok(c.cmd("NOOP"))


# -- CR, LF, NUL inside a command line ---------------------------------------------


@pytest.mark.parametrize("line", [
    b"MAIL FROM:<a@b.test>\x00",
    b"NOOP\rNOOP",
    b"NOOP\nNOOP",
    b"MAIL FROM:<a@b.test>\rRSET",
    b"MAIL FROM:<a@b.test>\nRSET",
    b"RSET\x00NOOP",
], ids=["nul-after-mail", "bare-cr", "bare-lf", "mail-cr", "mail-lf", "nul-inside"])
def test_cr_lf_nul_inside_command_line_is_refused_and_not_executed(start_server, line):
    server = start_server()
    with connect(server) as c:
        c.ehlo()
        c.send(line + b"\r\n")
        replies = c.replies_until_sync()
        assert [(r.code, r.status) for r in replies] == [(500, "5.5.2")], replies
        # had any MAIL part run, this would be 503 "sender already specified"
        assert_ok(c.mail("a@b.test"))


# -- DATA: long lines ----------------------------------------------------------------


def test_text_line_of_1000_octets_in_data_is_accepted(start_server):
    server = start_server()
    with connect(server) as c:
        c.ehlo()
        line = b"y" * 998 + b"\r\n"
        assert len(line) == 1000
        assert_queued(c.send_message("alice@sender.test", ["bob@example.com"],
                                     message("line of 1000", b"before\r\n" + line + b"after\r\n")))
    d = wait_dropped(server, "line of 1000")
    assert line in d.data


def test_text_line_over_1000_octets_is_rejected_after_dot_and_session_stays_in_sync(start_server):
    server = start_server()
    with connect(server) as c:
        open_data(c)
        # 1001 octets whose last character is a dot: a server that cut the line
        # at 998/1000 would see ".\r\n" and end DATA early, then run what follows
        long_line = b"L" * 998 + b".\r\n"
        assert len(long_line) == 1001
        c.send(message("long line") + long_line + SMUGGLED + b".\r\n")
        replies = c.replies_until_sync()
        assert [(r.code, r.status) for r in replies] == [(554, "5.6.0")], replies
        # the next transaction in the same session works
        send_canary(c, "after long data line")
    assert_nothing_smuggled(server, "after long data line")
    assert all(b"long line" not in d.data for d in dropped(server))


def test_very_long_text_line_split_across_writes_is_rejected(start_server):
    server = start_server()
    with connect(server) as c:
        open_data(c)
        c.send(message("long split line") + b"z" * 700)
        time.sleep(0.05)
        c.send(b"z" * 70000)
        time.sleep(0.05)
        c.send(b"z\r\n" + SMUGGLED + b".\r\n")
        replies = c.replies_until_sync()
        assert [(r.code, r.status) for r in replies] == [(554, "5.6.0")], replies
        send_canary(c, "after long split line")
    assert_nothing_smuggled(server, "after long split line")


# -- DATA: bare CR / LF (SMTP smuggling) --------------------------------------------


@pytest.mark.parametrize("fake_end", [
    b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r",
], ids=["LF.LF", "LF.CRLF", "CRLF.LF", "CR.CR", "CR.CRLF", "CRLF.CR"])
def test_bare_cr_or_lf_never_ends_data_and_smuggled_envelope_is_never_delivered(start_server, fake_end):
    server = start_server()
    with connect(server) as c:
        open_data(c)
        c.send(message("smuggle carrier", b"hello") + fake_end + SMUGGLED + b".\r\n")
        replies = c.replies_until_sync()
        # exactly one reply for the end of DATA, and it refuses the message
        assert [(r.code, r.status) for r in replies] == [(554, "5.6.0")], replies
        send_canary(c, "after smuggling attempt")
    assert_nothing_smuggled(server, "after smuggling attempt")
    assert all(b"smuggle carrier" not in d.data for d in dropped(server))


def test_smuggling_attempt_sent_in_one_write_with_the_envelope(start_server):
    """The whole attack pipelined in a single packet, as an exploit would send it."""
    server = start_server()
    with connect(server) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
               + message("one-write carrier", b"hello") + b"\n.\r\n" + SMUGGLED + b".\r\n")
        codes = [c.reply() for _ in range(3)]
        assert [r.code for r in codes] == [250, 250, 354], codes
        replies = c.replies_until_sync()
        assert [(r.code, r.status) for r in replies] == [(554, "5.6.0")], replies
        send_canary(c, "after one-write smuggling")
    assert_nothing_smuggled(server, "after one-write smuggling")


# -- max_protocol_errors -----------------------------------------------------------


def test_fifth_protocol_error_gets_421_and_connection_is_closed(start_server):
    server = start_server()
    with connect(server) as c:
        c.ehlo()
        errors = [b"XYZZY", b"MAIL TO:<a@b.test>", b"FOO BAR", b"EHLO", b"HELO"]
        for bad in errors[:4]:
            r = c.cmd(bad)
            assert 500 <= r.code < 600, (bad, r)
        r = c.cmd(errors[4])
        if r.code != 421:              # the fifth error's own reply, then 421
            assert 500 <= r.code < 600, r
            r = c.reply()
        assert (r.code, r.status) == (421, "4.7.0"), r
        c.assert_closed()
    with connect(server) as c2:        # only that session was ended
        assert_ok(c2.cmd("NOOP"))


def test_four_protocol_errors_do_not_close_the_session(start_server):
    server = start_server()
    with connect(server) as c:
        c.ehlo()
        for bad in [b"XYZZY", b"MAIL TO:<a@b.test>", b"FOO", b"RCPT FROM:<x@y.test>"]:
            r = c.cmd(bad)
            assert 500 <= r.code < 600, (bad, r)
        assert_ok(c.cmd("NOOP"))
        send_canary(c, "after four errors")
    wait_dropped(server, "after four errors")


# -- tarpit --------------------------------------------------------------------------


def _time_unknown_command(server, source):
    with connect(server, source) as c:
        c.ehlo()
        start = time.monotonic()
        r = c.cmd("XYZZY")
        elapsed = time.monotonic() - start
    assert 500 <= r.code < 600, r
    return elapsed


def test_tarpit_delays_error_reply_to_anonymous_peer(start_server):
    server = start_server(tarpit="1")
    elapsed = _time_unknown_command(server, ANON)
    assert elapsed >= 0.8, f"error reply came after {elapsed:.3f}s; tarpit is 1s"


def test_tarpit_does_not_delay_externally_secured_peer(start_server):
    server = start_server(tarpit="1")
    elapsed = _time_unknown_command(server, SECURED)
    assert elapsed < 0.8, f"error reply to the secured peer came after {elapsed:.3f}s"


# -- SIZE and message size ----------------------------------------------------------


def test_declared_size_over_limit_is_refused_at_mail(start_server):
    server = start_server()     # max_message_size = 36MB
    with connect(server) as c:
        c.ehlo()
        r = c.mail("a@x.test", f"SIZE={36 * 1024 * 1024 + 1}")
        assert (r.code, r.status) == (552, "5.3.4"), r
        # no transaction was started: a new MAIL is accepted
        assert_ok(c.mail("a@x.test", "SIZE=1000"))


def test_undeclared_oversize_message_is_refused_after_dot_and_session_stays_usable(start_server):
    server = start_server(internet='max_message_size = "64KB"')
    with connect(server) as c:
        c.ehlo()
        r = c.send_message("alice@sender.test", ["bob@example.com"],
                           message("oversize", big_body(100 * 1024)))
        assert (r.code, r.status) == (552, "5.3.4"), r
        assert_ok(c.cmd("NOOP"))
        send_canary(c, "after oversize")
    wait_dropped(server, "after oversize")
    assert all(b"Subject: oversize" not in d.data for d in dropped(server))


def test_externally_secured_peer_bypasses_message_size_limit(start_server):
    server = start_server(internal='max_message_size = "64KB"')
    with connect(server, SECURED) as c:
        c.ehlo()
        assert_ok(c.mail("alice@sender.test", f"SIZE={110 * 1024}"))
        assert_ok(c.rcpt("bob@example.com"))
        assert c.cmd("DATA").code == 354
        c.send(message("big from secured", big_body(100 * 1024)) + b".\r\n")
        assert_queued(c.reply())
    d = wait_dropped(server, "big from secured")
    assert len(d.data) > 100 * 1024


# -- recipients ------------------------------------------------------------------------


def test_recipient_beyond_max_recipients_per_message_gets_452(start_server):
    server = start_server(internet="max_recipients_per_message = 100")
    rcpts = [f"user{i}@example.com" for i in range(101)]
    with connect(server) as c:
        c.ehlo()
        assert_ok(c.mail("alice@sender.test"))
        c.send(b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts))   # pipelined
        replies = [c.reply() for _ in rcpts]
        assert all(r.code == 250 for r in replies[:100]), [r for r in replies[:100] if r.code != 250]
        assert (replies[100].code, replies[100].status) == (452, "4.5.3"), replies[100]
        assert c.cmd("DATA").code == 354
        c.send(message("hundred recipients") + b".\r\n")
        assert_queued(c.reply())
    d = wait_dropped(server, "hundred recipients")
    assert sorted(d.receivers) == sorted(rcpts[:100])


# -- hop count and header size ----------------------------------------------------------


def _received_lines(n: int) -> bytes:
    return b"".join(
        b"Received: from hop%d.test (hop%d.test [192.0.2.%d]) by hop%d.test; "
        b"Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (i, i, i % 250 + 1, i + 1)
        for i in range(n)
    )


def test_more_than_30_received_headers_is_refused_as_loop(start_server):
    server = start_server()
    with connect(server) as c:
        c.ehlo()
        r = c.send_message("alice@sender.test", ["bob@example.com"],
                           _received_lines(31) + message("loop 31"))
        assert (r.code, r.status) == (554, "5.4.6"), r
        send_canary(c, "after loop")
    wait_dropped(server, "after loop")
    assert all(b"Subject: loop 31" not in d.data for d in dropped(server))


def test_30_received_headers_are_accepted(start_server):
    server = start_server()
    with connect(server) as c:
        c.ehlo()
        assert_queued(c.send_message("alice@sender.test", ["bob@example.com"],
                                     _received_lines(30) + message("loop 30")))
    wait_dropped(server, "loop 30")


def test_header_over_max_header_size_is_refused(start_server):
    server = start_server(internet='max_header_size = "1KB"')
    filler = b"".join(b"X-Filler-%02d: %s\r\n" % (i, b"f" * 80) for i in range(25))  # ~2.4 KB
    with connect(server) as c:
        c.ehlo()
        r = c.send_message("alice@sender.test", ["bob@example.com"], filler + message("big header"))
        assert (r.code, r.status) == (552, "5.3.4"), r
        # a small header still passes on the same session
        send_canary(c, "small header")
    wait_dropped(server, "small header")
    assert all(b"Subject: big header" not in d.data for d in dropped(server))


# -- relay ---------------------------------------------------------------------------------


RELAY_TRICKS = [
    ("user%evil.test@example.com", {550}),
    ("evil.test!user@example.com", {550}),
    ('"user@evil.test"@example.com', {550}),
    ("@example.com:user@evil.test", {550}),
    ("@example.com,@other.test:user@example.com", {550}),
    ("user@[127.0.0.1]", {550}),
    ("user@example.com.", {501, 550}),
    ("user@evil.test", {550}),
    ("user@sub.example.com", {550}),
]


@pytest.mark.parametrize("rcpt,codes", RELAY_TRICKS, ids=[t[0] for t in RELAY_TRICKS])
def test_anonymous_peer_cannot_relay(start_server, rcpt, codes):
    server = start_server()
    with connect(server) as c:
        c.ehlo()
        assert_ok(c.mail("alice@sender.test"))
        r = c.rcpt(rcpt)
        assert r.code in codes, r
        if r.code == 550:
            assert r.status == "5.7.54", r
        # the refused recipient is not part of the transaction
        assert_ok(c.rcpt("bob@example.com"))
        assert c.cmd("DATA").code == 354
        c.send(message("relay attempt") + b".\r\n")
        assert_queued(c.reply())
    d = wait_dropped(server, "relay attempt")
    assert d.receivers == ["bob@example.com"], d.receivers
    assert len(dropped(server)) == 1
    for data in committed_files(server):   # every trick's local part is "user"
        assert b"user" not in data, data[:400]


def test_anonymous_peer_relay_attempt_without_other_recipients_gets_no_data(start_server):
    server = start_server()
    with connect(server) as c:
        c.ehlo()
        assert_ok(c.mail("alice@sender.test"))
        r = c.rcpt("user@evil.test")
        assert (r.code, r.status) == (550, "5.7.54"), r
        r = c.cmd("DATA")
        assert 500 <= r.code < 600, r


def test_externally_secured_peer_may_relay(start_server):
    server = start_server()
    with connect(server, SECURED) as c:
        c.ehlo()
        assert_ok(c.mail("alice@sender.test"))
        assert_ok(c.rcpt("user@evil.test"))


# -- pipelining ------------------------------------------------------------------------------


def test_pipelined_replies_come_in_order(start_server):
    server = start_server()
    with connect(server) as c:
        ehlo = c.ehlo()
        assert "PIPELINING" in [line.split()[0].upper() for line in ehlo.lines[1:] if line.split()]
        c.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<bob@example.com>\r\nRCPT TO:<x@evil.test>\r\nDATA\r\n")
        replies = [c.reply() for _ in range(4)]
        assert [r.code for r in replies] == [250, 250, 550, 354], replies
        assert replies[2].status == "5.7.54", replies[2]
        c.send(message("pipelined", sender="a@x.test") + b".\r\n")
        assert_queued(c.reply())
    d = wait_dropped(server, "pipelined")
    assert d.receivers == ["bob@example.com"]


def test_whole_transaction_and_quit_in_one_write(start_server):
    server = start_server()
    with connect(server) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
               + message("one write", sender="a@x.test") + b".\r\nQUIT\r\n")
        replies = [c.reply() for _ in range(5)]
        assert [r.code for r in replies] == [250, 250, 354, 250, 221], replies
        assert "Queued mail for delivery" in replies[3].text, replies[3]
        c.assert_closed()
    wait_dropped(server, "one write")


# -- connections -------------------------------------------------------------------------------


def test_connections_per_source_are_capped(start_server):
    server = start_server(internet="max_inbound_connection_per_source = 2")
    first = connect(server)
    assert_ok(first.cmd("NOOP"))
    second = connect(server)
    try:
        assert_ok(second.cmd("NOOP"))
        with Client(server.port) as third:
            r = third.reply()
            assert (r.code, r.status) == (421, "4.3.2"), r
            third.assert_closed()
        # closing one session frees a slot
        assert first.cmd("QUIT").code == 221
        first.assert_closed()
        with connect(server) as fourth:
            assert_ok(fourth.cmd("NOOP"))
    finally:
        first.close()
        second.close()


def test_peer_matching_no_connector_gets_554_and_is_closed(start_server):
    server = start_server(config=NO_CONNECTOR_CONFIG)
    with Client(server.port, ANON) as c:
        r = c.reply()
        assert (r.code, r.status) == (554, "5.7.1"), r
        c.assert_closed()
    # the connector does serve the address it names
    with connect(server, "127.0.0.5") as c:
        c.ehlo()
        assert_ok(c.cmd("NOOP"))


NO_CONNECTOR_CONFIG = server_config(
    server={"dns_servers": []},
    accepted_domains=({"domain_name": "example.com", "domain_type": "Authoritative"},),
    receive_connectors=(dict(FROM_INTERNAL_ORG, name="Only 127.0.0.5", usage="Custom", remote_ip_ranges=["127.0.0.5"],
                             tarpit_interval="0"),),
    send_connectors=(dict(LOCAL_DROP, usage="Custom"),),
)


# -- a real client ---------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_delivers_a_message(start_server):
    server = start_server()
    result = subprocess.run(
        [shutil.which("swaks"), "--server", "127.0.0.1", "--port", str(server.port),
         "--ehlo", "client.test", "--from", "alice@sender.test", "--to", "bob@example.com",
         "--header", "Subject: swaks message", "--body", "hello from swaks",
         "--pipeline", "--timeout", "15"],
        capture_output=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    d = wait_dropped(server, "swaks message")
    assert d.sender == "alice@sender.test"
    assert d.receivers == ["bob@example.com"]
    assert b"hello from swaks" in d.data
