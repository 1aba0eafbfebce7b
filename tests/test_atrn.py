"""
ATRN (RFC 2645) and TURN end to end: a real server holds mail for a
branch; the branch connects, starts TLS, authenticates against the
credentials file and asks with ATRN; after the 250 the roles turn round on
the same connection and the test, now the SMTP server, receives the held
messages. TURN is refused by default and for anyone who may not collect.
"""

import base64
import os
import socket
import ssl

import pytest

from test_tls_auth import PASSWORD, add_user

HELD = """
[[pipeline]]
stage = "etrn"
receive_connectors = ["From Internet"]
atrn = {atrn}
turn = {turn}

[[send_connectors]]
name = "To Branch"
address_spaces = ["branch.fabrikam.com", "sales.fabrikam.com"]
smart_hosts = ["192.0.2.10"]
dns_routing_enabled = false
remote_triggered_delivery = true
remote_trigger_accounts = ["branch@fabrikam.com"]

[[accepted_domains]]
domain_name = "branch.fabrikam.com"
domain_type = "InternalRelay"

[[accepted_domains]]
domain_name = "sales.fabrikam.com"
domain_type = "InternalRelay"

[directory]
credentials_file = "{users}"
"""


@pytest.fixture
def ca(tmp_path):
    from certs import CA
    return CA(tmp_path)


def odmr_server(start_server, ca, tmp_path, *, atrn=True, turn=False):
    cert, key = ca.issue("edge01", "edge01.example.com")
    users = tmp_path / "users.txt"
    add_user(users, "branch@fabrikam.com")
    add_user(users, "someone@fabrikam.com")
    return start_server(
        internet=f'auth_mechanisms = ["Tls", "BasicAuth", "BasicAuthRequireTLS"]\n'
                 f'permission_groups = ["AnonymousUsers", "ExchangeUsers"]\n'
                 f'certificate_file = "{cert}"\nprivate_key_file = "{key}"\nauth_tarpit_interval = 0\n'
                 f'protocol_logging_level = "Verbose"\n',
        extra=HELD.format(atrn=str(atrn).lower(), turn=str(turn).lower(), users=users))


def hold(server, *rcpts):
    import smtplib
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        for rcpt in rcpts:
            c.sendmail("alice@partner.test", [rcpt], f"Subject: for {rcpt}\r\n\r\nheld\r\n".encode())


class Line:
    """A line-oriented SMTP peer on a socket that may be wrapped in TLS half-way."""

    def __init__(self, sock):
        self.sock, self.buffer = sock, b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buffer)
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def reply(self) -> bytes:
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return b"\r\n".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, text: str) -> bytes:
        self.send(text.encode() + b"\r\n")
        return self.reply()

    def serve(self) -> list:
        """Be the SMTP server of a turned connection: the messages received, until QUIT."""
        got, rcpts = [], []
        self.send(b"220 branch.fabrikam.com ESMTP ready for the turned session\r\n")
        while True:
            command = self.line()
            verb = command[:4].upper()
            if verb == b"EHLO":
                self.send(b"250-branch.fabrikam.com\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                rcpts = []
                self.send(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                rcpts.append(command[command.index(b"<") + 1:command.index(b">")].decode())
                self.send(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                self.send(b"354 go on\r\n")
                data = []
                while (line := self.line()) != b".":
                    data.append(line)
                got.append((rcpts, b"\r\n".join(data)))
                self.send(b"250 2.0.0 received\r\n")
            elif verb == b"QUIT":
                self.send(b"221 2.0.0 bye\r\n")
                return got
            else:
                self.send(b"502 5.5.1 not here\r\n")


def connect_and_authenticate(server, ca, user="branch@fabrikam.com") -> Line:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    peer = Line(sock)
    assert peer.reply().startswith(b"220 ")
    assert b"STARTTLS" in peer.command("EHLO branch.fabrikam.com")
    assert peer.command("STARTTLS").startswith(b"220 ")
    context = ssl.create_default_context(cafile=ca.cert_file)
    peer.sock = context.wrap_socket(sock, server_hostname="edge01.example.com")
    keywords = peer.command("EHLO branch.fabrikam.com")
    assert b"ATRN" in keywords and b"AUTH PLAIN" in keywords
    token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
    assert peer.command(f"AUTH PLAIN {token}").startswith(b"235 ")
    return peer


def test_atrn_after_tls_and_auth_turns_the_connection_round_and_delivers_the_held_mail(start_server, ca, tmp_path):
    server = odmr_server(start_server, ca, tmp_path)
    hold(server, "bob@branch.fabrikam.com", "carol@sales.fabrikam.com")
    queue = server.path("var", "spool", "queue")
    assert len(os.listdir(queue)) == 2
    peer = connect_and_authenticate(server, ca)
    assert peer.command("ATRN branch.fabrikam.com") == b"250 2.0.0 OK now reversing the connection"
    got = peer.serve()
    assert [rcpts for rcpts, _ in got] == [["bob@branch.fabrikam.com"]]
    assert b"Subject: for bob@branch.fabrikam.com" in got[0][1]
    with pytest.raises((EOFError, ssl.SSLError, OSError)):
        peer.line()                                    # then the connection closes
    assert server.wait_for(lambda: len(os.listdir(queue)) == 1, what="bob's message gone")
    # ATRN without domains collects the rest of what the account may collect
    peer = connect_and_authenticate(server, ca)
    assert peer.command("ATRN").startswith(b"250 ")
    assert [rcpts for rcpts, _ in peer.serve()] == [["carol@sales.fabrikam.com"]]
    assert server.wait_for(lambda: not os.listdir(queue), what="an empty queue")
    peer = connect_and_authenticate(server, ca)
    assert peer.command("ATRN") == b"453 4.2.0 You have no mail"


def test_atrn_refusals(start_server, ca, tmp_path):
    server = odmr_server(start_server, ca, tmp_path)
    hold(server, "bob@branch.fabrikam.com")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    anonymous = Line(sock)
    anonymous.reply()
    anonymous.command("EHLO branch.fabrikam.com")
    assert anonymous.command("ATRN branch.fabrikam.com") == b"530 5.7.0 Authentication required"
    peer = connect_and_authenticate(server, ca, user="someone@fabrikam.com")
    assert peer.command("ATRN branch.fabrikam.com") == b"450 4.7.1 ATRN request refused"   # not this account's
    peer = connect_and_authenticate(server, ca)
    assert peer.command("ATRN elsewhere.test") == b"450 4.7.1 ATRN request refused"
    assert peer.command("ATRN branch.fabrikam.com,;rm -rf") .startswith(b"501 5.5.4 ")
    assert peer.command("TURN").startswith(b"502 5.5.1 ")                 # not enabled: exedge's own 502
    assert len(os.listdir(server.path("var", "spool", "queue"))) == 1


def test_turn_only_when_enabled_and_only_for_a_collector(start_server, ca, tmp_path):
    server = odmr_server(start_server, ca, tmp_path, atrn=False, turn=True)
    hold(server, "bob@branch.fabrikam.com")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    anonymous = Line(sock)
    anonymous.reply()
    anonymous.command("EHLO branch.fabrikam.com")
    assert anonymous.command("TURN").startswith(b"502 5.7.0 ")            # never for anonymous sessions
    assert anonymous.command("ATRN").startswith(b"502 5.5.1 ")            # ATRN is not enabled here
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    peer = Line(sock)
    peer.reply()
    peer.command("EHLO branch.fabrikam.com")
    peer.command("STARTTLS")
    peer.sock = ssl.create_default_context(cafile=ca.cert_file).wrap_socket(sock, server_hostname="edge01.example.com")
    peer.command("EHLO branch.fabrikam.com")
    token = base64.b64encode(f"\0branch@fabrikam.com\0{PASSWORD}".encode()).decode()
    assert peer.command(f"AUTH PLAIN {token}").startswith(b"235 ")
    assert peer.command("TURN").startswith(b"250 ")
    assert [rcpts for rcpts, _ in peer.serve()] == [["bob@branch.fabrikam.com"]]


def test_cram_md5_only_for_the_accounts_whose_secret_is_held(start_server, ca, tmp_path):
    """
    CRAM-MD5 (RFC 2195) is offered beside PLAIN and LOGIN when [directory]
    cram_md5_accounts names accounts: it needs their secret in clear here.
    smtplib prefers it when offered.
    """
    import smtplib
    cert, key = ca.issue("edge01", "edge01.example.com")
    users = tmp_path / "users.txt"
    add_user(users, "branch@fabrikam.com")
    add_user(users, "someone@fabrikam.com")
    secret = tmp_path / "branch.secret"
    secret.write_text(PASSWORD + "\n")
    server = start_server(
        internet='auth_mechanisms = ["Tls", "BasicAuth"]\npermission_groups = ["AnonymousUsers", "ExchangeUsers"]\n'
                 'auth_tarpit_interval = 0\nmax_logon_failures = 0\n',
        extra=f'[directory]\ncredentials_file = "{users}"\n'
              f'cram_md5_accounts = [{{ username = "branch@fabrikam.com", password_file = "{secret}" }}]\n')
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.ehlo()
        assert "CRAM-MD5" in c.esmtp_features["auth"].split()
        c.user, c.password = "branch@fabrikam.com", PASSWORD
        assert c.auth("CRAM-MD5", c.auth_cram_md5)[0] == 235
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.ehlo()
        c.user, c.password = "branch@fabrikam.com", "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            c.auth("CRAM-MD5", c.auth_cram_md5)
        assert e.value.smtp_code == 535
        c.user, c.password = "someone@fabrikam.com", PASSWORD       # no secret held for this one
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.auth("CRAM-MD5", c.auth_cram_md5)
        c.user = "someone@fabrikam.com"
        assert c.auth("PLAIN", c.auth_plain)[0] == 235              # its password still works as ever
    assert PASSWORD not in server.log
