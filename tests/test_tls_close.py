"""
Every TLS session ends: after QUIT, after an idle 421, after too many
failed logons, after STARTTLS's 220 with no handshake, and on an
implicit-TLS port whose client says nothing or half a ClientHello.

Real exedge (twistd) on loopback, and a TLS client built from Python's
ssl.MemoryBIO over a plain socket, so that the test sees the TCP
connection itself: whether close_notify came, and when the server really
let go (EOF or reset). Timeouts are the server's own (seconds in the test
config); a socket timeout on the client is only the generous upper bound
that turns "never closed" into a failure, never the thing waited for.
"""

from __future__ import annotations

import base64
import socket
import ssl

import pytest

from certs import CA
from harness import free_port

BOUND = 15.0        # far past every server timer these tests set: the connection must be gone by then


@pytest.fixture
def ca(tmp_path):
    return CA(tmp_path)


class TLSClient:
    """TLS through ssl.MemoryBIO over a socket the test keeps in hand."""

    def __init__(self, sock: socket.socket, ca: CA, hostname: str = "edge01.example.com"):
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        context = ssl.create_default_context(cafile=ca.cert_file)
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=hostname)
        self.plain = b""
        self.close_notify = False

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _pump(self) -> bool:
        """One read from the socket into TLS; False when the TCP connection has ended."""
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    def handshake(self) -> None:
        for _ in range(100):
            try:
                self.tls.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                assert self._pump(), "the server closed the connection during the handshake"
        pytest.fail("no handshake after 100 reads")

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def _decrypt(self) -> None:
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                self.close_notify = True
                return
            if not chunk:                   # how SSLObject.read reports the peer's close_notify
                self.close_notify = True
                return
            self.plain += chunk

    def reply(self) -> bytes:
        """The next complete reply (its last line, CRLF stripped)."""
        for _ in range(1000):
            while b"\r\n" in self.plain:
                line, self.plain = self.plain.split(b"\r\n", 1)
                if line[3:4] != b"-":
                    return line
            assert not self.close_notify, f"close_notify before a complete reply: {self.plain!r}"
            assert self._pump(), f"the connection ended before a complete reply: {self.plain!r}"
            self._decrypt()
        pytest.fail("no complete reply in 1000 reads")

    def until_close_notify(self) -> None:
        """Read until the server's close_notify; no further plaintext is expected."""
        for _ in range(1000):
            self._decrypt()
            if self.close_notify:
                assert self.plain == b"", self.plain
                return
            assert self._pump(), "the connection ended without close_notify"
        pytest.fail("no close_notify in 1000 reads")


    def answer_close_notify(self) -> None:
        """Send our close_notify (after the server's, so nothing is left to wait for)."""
        assert self.close_notify
        self.tls.unwrap()
        self._flush()


def wait_until_gone(sock: socket.socket) -> None:
    """The server ends the TCP connection (EOF or reset) within BOUND; whatever it sends first is ignored."""
    sock.settimeout(BOUND)
    for _ in range(10000):
        try:
            if not sock.recv(65536):
                return
        except ConnectionResetError:
            return
        except socket.timeout:
            pytest.fail(f"the server kept the connection open for more than {BOUND:.0f} s")
    pytest.fail("the server kept sending")


def raw_reply(f) -> bytes:
    for _ in range(50):
        line = f.readline()
        assert line.endswith(b"\r\n"), line
        if line[3:4] != b"-":
            return line.rstrip(b"\r\n")
    pytest.fail("reply of more than 50 lines")


def starttls_server(start_server, ca, tmp_path, *, inactivity="1s", session="2s"):
    """The Internet connector with STARTTLS and AUTH (an empty users file: every logon fails)."""
    cert, key = ca.issue("edge01", "edge01.example.com")
    users = tmp_path / "users.txt"
    users.write_text("")
    return start_server(
        internet=f'auth_mechanisms = ["Tls", "BasicAuth"]\npermission_groups = ["AnonymousUsers"]\n'
                 f'certificate_file = "{cert}"\nprivate_key_file = "{key}"\nauth_tarpit_interval = 0\n'
                 f'connection_inactivity_timeout = "{inactivity}"\nconnection_timeout = "{session}"\n'
                 f'protocol_logging_level = "Verbose"\n',
        extra=f'\n[directory]\ncredentials_file = "{users}"\n')


def implicit_server(start_server, ca, *, inactivity="1s", session="2s", limit=3):
    """A server with an implicit-TLS connector (returns the server and that port)."""
    cert, key = ca.issue("edge01", "edge01.example.com")
    port = free_port()
    server = start_server(extra=f"""
[[receive_connectors]]
name = "Implicit TLS"
bindings = ["127.0.0.1:{port}"]
remote_ip_ranges = ["127.0.0.0/8"]
fqdn = "edge01.example.com"
auth_mechanisms = ["Tls"]
permission_groups = ["AnonymousUsers"]
tls_mode = "Implicit"
certificate_file = "{cert}"
private_key_file = "{key}"
max_inbound_connection = {limit}
connection_inactivity_timeout = "{inactivity}"
connection_timeout = "{session}"
protocol_logging_level = "Verbose"
""")
    return server, port


def inside_starttls(server, ca) -> tuple[socket.socket, TLSClient]:
    """A session that said EHLO, STARTTLS, finished the handshake and said EHLO again."""
    sock = _starttls_no_handshake(server, ca)
    tls = TLSClient(sock, ca)
    tls.handshake()
    tls.send(b"EHLO client.test\r\n")
    assert tls.reply().startswith(b"250 ")
    return sock, tls


def half_client_hello(ca) -> bytes:
    """The first half of a real ClientHello record."""
    outgoing = ssl.MemoryBIO()
    tls = ssl.create_default_context(cafile=ca.cert_file).wrap_bio(ssl.MemoryBIO(), outgoing,
                                                                   server_hostname="edge01.example.com")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16" and len(hello) > 100      # a handshake record
    return hello[:len(hello) // 2]


# -- a graceful close ----------------------------------------------------------


def test_quit_inside_starttls_gets_221_and_close_notify_at_once(start_server, ca, tmp_path):
    # long timers: nothing but the QUIT may end this session
    server = starttls_server(start_server, ca, tmp_path, inactivity="60s", session="120s")
    sock, tls = inside_starttls(server, ca)
    with sock:
        tls.send(b"QUIT\r\n")
        assert tls.reply().startswith(b"221 2.0.0")
        sock.settimeout(5)
        try:
            tls.until_close_notify()                    # before the fix: never sent (a producer was registered)
        except socket.timeout:
            pytest.fail("no close_notify within 5 s of the 221")
        # our close_notify in answer completes the TLS close: the server
        # closes TCP at once (an EOF; the grace would end in a reset)
        tls.answer_close_notify()
        try:
            assert sock.recv(1024) == b""
        except socket.timeout:
            pytest.fail("the server did not close TCP within 5 s of the client's close_notify")


# -- silent clients ------------------------------------------------------------


def _starttls_no_handshake(server, ca):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=BOUND)
    f = sock.makefile("rb")
    assert raw_reply(f).startswith(b"220 ")
    sock.sendall(b"EHLO client.test\r\n")
    assert raw_reply(f).startswith(b"250 ")
    sock.sendall(b"STARTTLS\r\n")
    assert raw_reply(f).startswith(b"220 2.0.0")
    return sock                                          # and never a ClientHello


def _idle_inside_tls(server, ca):
    sock, _tls = inside_starttls(server, ca)
    return sock                                          # silent: the idle 421 goes out, nothing comes back


def _failed_logons_inside_tls(server, ca):
    sock, tls = inside_starttls(server, ca)
    secret = base64.b64encode(b"\0nobody@fabrikam.com\0wrong").decode()
    for expected in (b"535 5.7.8", b"535 5.7.8", b"421 4.7.0"):
        tls.send(f"AUTH PLAIN {secret}\r\n".encode())
        assert tls.reply().startswith(expected)
    return sock                                          # never answers the server's close_notify


STARTTLS_CASES = {
    "after STARTTLS's 220, no handshake": _starttls_no_handshake,
    "idle inside TLS": _idle_inside_tls,
    "too many failed logons inside TLS": _failed_logons_inside_tls,
}


@pytest.mark.parametrize("case", list(STARTTLS_CASES))
def test_silent_starttls_client_is_disconnected(start_server, ca, tmp_path, case):
    server = starttls_server(start_server, ca, tmp_path)
    with STARTTLS_CASES[case](server, ca) as sock:
        wait_until_gone(sock)


@pytest.mark.parametrize("case", ["nothing", "half a ClientHello"])
def test_silent_implicit_tls_client_is_disconnected(start_server, ca, case):
    server, port = implicit_server(start_server, ca)
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND) as sock:
        if case != "nothing":
            sock.sendall(half_client_hello(ca))
        wait_until_gone(sock)


def test_three_silent_clients_do_not_hold_an_implicit_tls_connector(start_server, ca):
    """
    The denial of service: a connector allowing three connections, three
    clients that go silent (before, in the middle of and after the
    handshake). Each must be disconnected by the server's own timers (the
    session limit is far away here: the inactivity timeout and the close
    grace must do it), and then a new client must be served.
    """
    server, port = implicit_server(start_server, ca, inactivity="1s", session="120s", limit=3)
    silent = [socket.create_connection(("127.0.0.1", port), timeout=BOUND) for _ in range(3)]
    try:
        silent[1].sendall(half_client_hello(ca))
        TLSClient(silent[2], ca).handshake()            # then silent: the idle 421, close_notify, no answer
        with socket.create_connection(("127.0.0.1", port), timeout=BOUND) as refused:
            assert refused.recv(512).startswith(b"421 4.3.2")   # every slot is taken now
        for sock in silent:
            wait_until_gone(sock)
    finally:
        for sock in silent:
            sock.close()
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND) as sock:
        tls = TLSClient(sock, ca)
        tls.handshake()
        assert tls.reply().startswith(b"220 edge01.example.com")
        tls.send(b"QUIT\r\n")
        assert tls.reply().startswith(b"221 ")
