"""
AUTH against a real Active Directory: a Samba AD DC (the samba_ad session
fixture) with FABRIKAM.COM's users, checked by exedge over LDAPS with CA
validation, driven by smtplib.
"""

import base64
import smtplib
import socket
import ssl
import threading

import pytest
from ldap3 import SIMPLE, Connection, Server, Tls

from harness import LOCAL_DROP, LOOPBACK, free_port, server_config


def config(ad, *, servers=None, groups=("AnonymousUsers", "ExchangeUsers"), directory=None, accepted_domains=(),
           pipeline=(), send_connectors=()):
    """
    A client frontend doing AUTH against C{ad} (LDAPS by default); C{directory}:
    more [directory] keys, C{accepted_domains} besides example.com.
    """
    return server_config(
        accepted_domains=("example.com", *accepted_domains),
        receive_connectors=({"name": "Client Frontend", "bindings": [LOOPBACK], "remote_ip_ranges": ["127.0.0.0/8"],
                             "auth_mechanisms": ["Tls", "BasicAuth"], "permission_groups": list(groups),
                             "tarpit_interval": 0, "auth_tarpit_interval": 0, "max_logon_failures": 10},),
        directory={"servers": servers or [f"ldaps://{ad['LDAP_HOST']}:636"], "base_dn": ad["BASE_DN"],
                   "ca_file": ad["TLS_CA_FILE"], "timeout": 3, **(directory or {})},
        send_connectors=(LOCAL_DROP, *send_connectors), pipeline=pipeline)


def auth(port, user, password, mechanism="PLAIN"):
    """(code, text) of AUTH on a fresh session."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
        c.ehlo("client.test")
        if not (user + password).isascii():       # smtplib encodes credentials as ASCII; RFC 4954 says UTF-8
            response = base64.b64encode(f"\0{user}\0{password}".encode("utf-8")).decode()
            return c.docmd("AUTH", f"{mechanism} {response}")
        c.user, c.password = user, password
        try:
            return c.auth(mechanism, getattr(c, "auth_" + mechanism.lower()), initial_response_ok=True)
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code, e.smtp_error


@pytest.mark.parametrize("user,password,mechanism", [
    ("smtpgateway@fabrikam.com", "Gatew4y!pass", "PLAIN"),
    ("SMTPGateway@Fabrikam.com", "Gatew4y!pass", "LOGIN"),
    ("jdoe@corp.fabrikam.com", "Jd0e!passw0rd", "PLAIN"),      # UPN suffix is not the mail domain
    ("joerg@fabrikam.com", "Pässwörd!1€", "PLAIN"),            # non-ASCII password
])
def test_auth_by_user_principal_name(start_server, samba_ad, user, password, mechanism):
    server = start_server(config(samba_ad))
    code, text = auth(server.port, user, password, mechanism)
    assert (code, text[:5]) == (235, b"2.7.0")
    assert f"authenticated as {user.lower()}" in server.log


@pytest.mark.parametrize("user,password", [
    ("smtpgateway@fabrikam.com", "wrong"),
    ("nobody@fabrikam.com", "Gatew4y!pass"),
    ("bob@fabrikam.com", "Bob!pass1"),                         # disabled (data 533)
    ("smtpgateway", "Gatew4y!pass"),                           # not a UPN
])
def test_refused_logons_get_535(start_server, samba_ad, user, password):
    server = start_server(config(samba_ad))
    code, text = auth(server.port, user, password)
    assert (code, text[:5]) == (535, b"5.7.8")


def test_locked_out_account_is_refused_even_with_its_password(start_server, samba_ad):
    server = start_server(config(samba_ad))
    ad = Server(samba_ad["LDAP_HOST"], port=636, use_ssl=True,
                tls=Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=samba_ad["TLS_CA_FILE"]))
    for _ in range(3):      # the domain locks an account after 3 bad passwords
        assert not Connection(ad, user="mallory@fabrikam.com", password="bad", authentication=SIMPLE).bind()
    code, _ = auth(server.port, "mallory@fabrikam.com", "Mall0ry!pass")
    assert code == 535
    assert "authentication failed for mallory@fabrikam.com: account locked out" in server.log


def test_exchange_servers_group_membership_grants_the_server_rights(start_server, samba_ad, tmp_path):
    # a connector for servers only: a plain user authenticates but may not
    # submit; members of "Exchange Servers" (directly or through a nested
    # group) relay with every server right
    server = start_server(config(samba_ad, groups=["ExchangeServers"]))
    for user, password in (("edgesync@fabrikam.com", "Edg3sync!pass"), ("relay01@fabrikam.com", "R3lay01!pass")):
        with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as c:
            c.ehlo("client.test")
            c.login(user, password)
            c.mail("app@fabrikam.com")
            assert c.rcpt("someone@partner.test")[0] == 250
        assert f"authenticated as {user}; rights: Exchange Servers -> Submit, AcceptAnyRecipient" in server.log
    with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as c:
        c.ehlo("client.test")
        c.login("smtpgateway@fabrikam.com", "Gatew4y!pass")
        assert c.docmd("MAIL", "FROM:<app@fabrikam.com>")[0] == 530


class Forwarder:
    """A TCP relay to the directory that can be started late: the directory 'comes back'."""

    def __init__(self, target):
        self.target = target
        self.port = free_port()
        self.sock = None
        self.open: list = []

    def start(self):
        self.sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=10)
            self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self):
        """The directory goes away: no new connections, and the open ones are cut."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)     # wakes the accept(): close() alone does not on Linux
            except OSError:
                pass
            self.sock.close()
        for s in self.open:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def test_directory_down_means_454_then_success_once_it_is_back(start_server, samba_ad):
    forwarder = Forwarder((samba_ad["LDAP_HOST"], 636))
    # the certificate names 127.0.0.1 too, so the forwarder's address verifies
    server = start_server(config(samba_ad, servers=[f"ldaps://127.0.0.1:{forwarder.port}"]))
    try:
        code, text = auth(server.port, "smtpgateway@fabrikam.com", "Gatew4y!pass")
        assert (code, text[:5]) == (454, b"4.7.0")                   # never 535, never accepted
        forwarder.start()
        code, text = auth(server.port, "smtpgateway@fabrikam.com", "Gatew4y!pass")
        assert (code, text[:5]) == (235, b"2.7.0")
    finally:
        forwarder.stop()


def test_the_empty_password_never_reaches_the_directory(start_server, samba_ad):
    # real AD answers an empty-password simple bind as an anonymous success
    server = start_server(config(samba_ad))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as c:
        c.ehlo("client.test")
        code, text = c.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0smtpgateway@fabrikam.com\0").decode())
    assert (code, text[:5]) == (535, b"5.7.8")
    assert "authentication failed for smtpgateway" not in server.log     # the directory was never asked


def test_starttls_on_port_389_and_search_then_bind_with_a_service_account(start_server, samba_ad, tmp_path):
    # ldap:// means StartTLS (AD refuses simple binds in plain text); Search
    # mode lets users log on with a name the directory cannot bind with
    # (the sAMAccountName), found by the service account
    secret = tmp_path / "svc.secret"
    secret.write_text(samba_ad["ADMIN_PASSWORD"] + "\n")
    text = config(samba_ad, servers=[f"ldap://{samba_ad['LDAP_HOST']}:389"], directory={
        "bind_mode": "Search",
        "service_account": {"username": samba_ad["ADMIN_UPN"], "password_file": secret},
    })
    server = start_server(text)
    code, text_ = auth(server.port, "edgesync", "Edg3sync!pass")
    assert (code, text_[:5]) == (235, b"2.7.0")
    assert "authenticated as edgesync; rights:" in server.log
    assert auth(server.port, "edgesync", "wrong")[0] == 535
    assert auth(server.port, "nobody", "Edg3sync!pass")[0] == 535


def test_recipient_lookup_in_the_directory_with_a_short_cache(start_server, samba_ad, tmp_path):
    # Exchange's Recipient Filter with Recipient Lookup: mail or any proxy
    # address, either case; unknown users 550 5.1.1; a directory that cannot
    # answer defers (451 4.4.3) what it has not answered before
    forwarder = Forwarder((samba_ad["LDAP_HOST"], 636))
    forwarder.start()
    secret = tmp_path / "svc.secret"
    secret.write_text(samba_ad["ADMIN_PASSWORD"] + "\n")
    text = config(samba_ad, servers=[f"ldaps://127.0.0.1:{forwarder.port}"],
                  directory={"service_account": {"username": samba_ad["ADMIN_UPN"], "password_file": secret}},
                  accepted_domains=("fabrikam.com",),
                  pipeline=({"stage": "recipient_filter", "recipient_lookup": "Directory", "lookup_cache": "5m"},))
    server = start_server(text)
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as c:
            c.ehlo("client.test")
            c.mail("someone@partner.test")
            assert c.rcpt("smtpgateway@fabrikam.com")[0] == 250            # mail
            assert c.rcpt("John.Doe@FABRIKAM.com")[0] == 250               # secondary proxy address, any case
            assert c.rcpt("nobody@fabrikam.com") == (550, b"5.1.1 User unknown")
            assert c.rcpt("someone@elsewhere.test")[0] == 550              # not ours: the relay check's answer
            forwarder.stop()                                               # the directory goes away
            assert c.rcpt("smtpgateway@fabrikam.com")[0] == 250            # answered from the cache
            assert c.rcpt("nobody@fabrikam.com")[0] == 550
            assert c.rcpt("edgesync@fabrikam.com") == (451, b"4.4.3 Recipient address lookup failed; try again later")
    finally:
        forwarder.stop()


def test_recipient_lookup_needs_a_service_account(tmp_path, samba_ad):
    from exedge.config import ConfigError, loads
    from exedge.pipeline import build_pipeline
    cfg = loads(config(samba_ad, pipeline=({"stage": "recipient_filter", "recipient_lookup": "Directory"},))
                .format(port=2525))
    with pytest.raises(ConfigError, match="needs \\[directory\\] servers and service_account"):
        build_pipeline(cfg, None)


def test_atrn_after_auth_against_the_directory(start_server, samba_ad):
    """ATRN (RFC 2645) with the account checked by the real AD: the held mail comes over the turned connection."""
    from test_atrn import Line
    server = start_server(config(
        samba_ad, accepted_domains=({"domain_name": "branch.fabrikam.com", "domain_type": "InternalRelay"},),
        pipeline=({"stage": "etrn", "atrn": True},),
        send_connectors=({"name": "To Branch", "address_spaces": ["branch.fabrikam.com"], "smart_hosts": ["192.0.2.10"],
                          "dns_routing_enabled": False, "remote_triggered_delivery": True,
                          "remote_trigger_accounts": ["smtpgateway@fabrikam.com"]},)))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.sendmail("alice@partner.test", ["bob@branch.fabrikam.com"], b"Subject: for the branch\r\n\r\nheld\r\n")
    peer = Line(socket.create_connection(("127.0.0.1", server.port), timeout=20))
    assert peer.reply().startswith(b"220 ")
    assert b"ATRN" in peer.command("EHLO branch.fabrikam.com")
    token = base64.b64encode(b"\0SMTPGateway@Fabrikam.com\0Gatew4y!pass").decode()
    assert peer.command(f"AUTH PLAIN {token}").startswith(b"235 ")
    assert peer.command("ATRN branch.fabrikam.com") == b"250 2.0.0 OK now reversing the connection"
    [(rcpts, data)] = peer.serve()
    assert rcpts == ["bob@branch.fabrikam.com"] and b"Subject: for the branch" in data
