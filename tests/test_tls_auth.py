"""
STARTTLS, implicit TLS and AUTH on receive connectors, driven the way a
client does: smtplib and raw sockets with Python's ssl, against exedge
started by twistd, with certificates made by the test and users added
with `exedge user`.
"""

import base64
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import time

import pytest

from certs import CA
from harness import TWISTD, config_text, free_port, toml_table

EXEDGE = os.path.join(os.path.dirname(sys.executable), "exedge")
PASSWORD = "Corr3ct horse!"


@pytest.fixture
def ca(tmp_path):
    return CA(tmp_path)


def client_context(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca.cert_file)
    return ctx


def add_user(path, name, password=PASSWORD, *groups):
    args = [EXEDGE, "user", "add", name, "--file", str(path), "--password-stdin"]
    for g in groups:
        args += ["--group", g]
    r = subprocess.run(args, input=password + "\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def tls_server(start_server, ca, tmp_path, *, mechanisms='["Tls"]', groups='["AnonymousUsers"]',
               extra_internet="", users=True, extra_server="", extra=""):
    cert, key = ca.issue("edge01", "edge01.example.com")
    credentials = tmp_path / "users.txt"
    if users:
        add_user(credentials, "smtpgateway@fabrikam.com")
        add_user(credentials, "edgesync@fabrikam.com", PASSWORD, "ExchangeServers")
    return start_server(
        internet=f'auth_mechanisms = {mechanisms}\npermission_groups = {groups}\n'
                 f'certificate_file = "{cert}"\nprivate_key_file = "{key}"\n'
                 f'auth_tarpit_interval = 0\nprotocol_logging_level = "Verbose"\n' + extra_internet,
        extra=f'\n[directory]\ncredentials_file = "{credentials}"\n' + extra,
        server=extra_server)


def ehlo_keywords(c: smtplib.SMTP) -> set:
    c.ehlo("client.test")
    return set(c.esmtp_features)


def test_starttls_verified_against_the_connector_fqdn_and_recorded_in_received(start_server, ca, tmp_path):
    server = tls_server(start_server, ca, tmp_path)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        assert "starttls" in ehlo_keywords(c)
        ctx = client_context(ca)
        # the client checks the certificate names edge01.example.com
        c._host = "edge01.example.com"
        code, _ = c.starttls(context=ctx)
        assert code == 220
        assert "starttls" not in ehlo_keywords(c)      # never offered twice
        c.sendmail("alice@partner.test", ["bob@example.com"], b"Subject: tls\r\n\r\nover TLS\r\n")
    data = open(server.wait_for(server.drop_files, what="the delivery")[0], "rb").read()
    received = data.split(b"\r\n\r\n")[0].decode()
    assert "with ESMTPS id" in received
    assert "version=TLSv1.3" in received and "cipher=TLS_" in received and "no client certificate" in received


def test_plaintext_after_starttls_is_discarded_not_executed(start_server, ca, tmp_path):
    server = tls_server(start_server, ca, tmp_path)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        f = raw.makefile("rb")
        f.readline()
        raw.sendall(b"EHLO client.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        # the injection: commands after STARTTLS in the same packet
        raw.sendall(b"STARTTLS\r\nRSET\r\nMAIL FROM:<injected@evil.test>\r\n")
        assert f.readline().startswith(b"220 ")
        tls = client_context(ca).wrap_socket(raw, server_hostname="edge01.example.com")
        tls.settimeout(1.0)
        with pytest.raises(socket.timeout):
            tls.recv(512)                               # RSET and MAIL were never answered
        tls.settimeout(10)
        tf = tls.makefile("rb")
        tls.sendall(b"RCPT TO:<bob@example.com>\r\n")
        assert tf.readline().startswith(b"503 ")        # no MAIL survived, and no EHLO either
        tls.sendall(b"MAIL FROM:<a@partner.test>\r\n")
        assert tf.readline().startswith(b"503 5.5.2")   # state reset: EHLO first (RFC 3207 4.2)
        tls.sendall(b"QUIT\r\n")


def test_certificate_not_naming_the_fqdn_stops_start_up_with_the_key_and_line(ca, tmp_path):
    cert, key = ca.issue("other", "mail.other.test")
    port = free_port()
    path = tmp_path / "c.toml"
    path.write_text(config_text(port, internet=f'certificate_file = "{cert}"\nprivate_key_file = "{key}"\n'))
    r = subprocess.run([TWISTD, "-n", "--pidfile=", "exedge", "--config", str(path)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 1
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("certificate_file"))
    assert f"{path}:{line}: receive_connectors[0].certificate_file: {cert} names mail.other.test, " \
           f"not edge01.example.com" in r.stderr
    check = subprocess.run([EXEDGE, "check-config", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and "names mail.other.test" in check.stdout


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_by_user_principal_name_then_relay(start_server, ca, tmp_path, mechanism):
    server = tls_server(start_server, ca, tmp_path, mechanisms='["Tls", "BasicAuth"]',
                        groups='["AnonymousUsers", "ExchangeUsers"]')
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        assert c.ehlo("client.test")[0] == 250 and c.has_extn("auth")
        c.mail("alice@example.com")
        assert c.rcpt("bob@partner.test")[0] == 550     # anonymous: no relay
        c.rset()
        c.user, c.password = "SMTPGateway@Fabrikam.com", PASSWORD
        code, text = c.auth(mechanism, getattr(c, "auth_" + mechanism.lower()), initial_response_ok=False)
        assert (code, text[:5]) == (235, b"2.7.0")
        c.mail("alice@example.com")
        assert c.rcpt("bob@partner.test")[0] == 250     # ExchangeUsers may relay
    assert "authenticated as smtpgateway@fabrikam.com; rights: NT AUTHORITY\\Authenticated Users" in server.log
    secret = base64.b64encode(f"\0SMTPGateway@Fabrikam.com\0{PASSWORD}".encode()).decode()
    assert secret not in server.log and base64.b64encode(PASSWORD.encode()).decode() not in server.log


def test_wrong_and_empty_passwords_then_too_many_failures(start_server, ca, tmp_path):
    server = tls_server(start_server, ca, tmp_path, mechanisms='["Tls", "BasicAuth"]',
                        groups='["AnonymousUsers", "ExchangeUsers"]')
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        f = raw.makefile("rb")
        f.readline()
        raw.sendall(b"EHLO client.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass

        def plain(user, password):
            raw.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0" + user + b"\0" + password) + b"\r\n")
            return f.readline()

        assert plain(b"smtpgateway@fabrikam.com", b"wrong").startswith(b"535 5.7.8")
        assert plain(b"smtpgateway@fabrikam.com", b"").startswith(b"535 5.7.8")    # never an anonymous bind
        assert plain(b"nobody@fabrikam.com", PASSWORD.encode()).startswith(b"421 4.7.0")  # third failure
        assert f.readline() == b""                                                      # and closed


def test_auth_dialogue_errors(start_server, ca, tmp_path):
    server = tls_server(start_server, ca, tmp_path, mechanisms='["Tls", "BasicAuth"]',
                        groups='["AnonymousUsers", "ExchangeUsers"]')
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        f = raw.makefile("rb")
        f.readline()

        def say(line):
            raw.sendall(line + b"\r\n")
            return f.readline()

        assert say(b"AUTH PLAIN").startswith(b"503")               # EHLO first
        raw.sendall(b"EHLO client.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        assert say(b"AUTH CRAM-MD5").startswith(b"504 5.5.4")
        assert say(b"AUTH PLAIN").rstrip(b"\r\n") == b"334 "
        assert say(b"*").startswith(b"501 5.0.0")                   # cancelled
        assert say(b"AUTH LOGIN").startswith(b"334 VXNlcm5hbWU6")
        assert say(b"not base64!").startswith(b"501 5.5.2")
        good = base64.b64encode(f"\0edgesync@fabrikam.com\0{PASSWORD}".encode())
        assert say(b"AUTH PLAIN " + good).startswith(b"235 2.7.0")
        assert say(b"AUTH PLAIN " + good).startswith(b"503")       # a second AUTH
    assert "authenticated as edgesync@fabrikam.com; rights: NT AUTHORITY\\Authenticated Users" in server.log


def test_basic_auth_require_tls_offers_auth_only_inside_tls(start_server, ca, tmp_path):
    server = tls_server(start_server, ca, tmp_path, mechanisms='["Tls", "BasicAuth", "BasicAuthRequireTLS"]',
                        groups='["ExchangeUsers"]')
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        assert "auth" not in ehlo_keywords(c)
        code, text = c.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0smtpgateway@fabrikam.com\0{PASSWORD}".encode()).decode())
        assert (code, text[:6]) == (538, b"5.7.11")
        code, _ = c.docmd("MAIL", "FROM:<alice@example.com>")
        assert code == 530                                   # ExchangeUsers only: nothing until AUTH
        c._host = "edge01.example.com"
        c.starttls(context=client_context(ca))
        assert "auth" in ehlo_keywords(c)
        c.login("smtpgateway@fabrikam.com", PASSWORD)
        c.sendmail("alice@example.com", ["bob@partner.test", "carol@example.com"], b"Subject: a\r\n\r\nx\r\n")
    data = open(server.wait_for(server.drop_files, what="the local delivery")[0], "rb").read()
    assert b"with ESMTPSA id" in data.split(b"\r\n\r\n")[0]


def test_credentials_that_cannot_be_checked_get_454_then_work_once_back(start_server, ca, tmp_path):
    server = tls_server(start_server, ca, tmp_path, mechanisms='["Tls", "BasicAuth"]',
                        groups='["AnonymousUsers", "ExchangeUsers"]')
    users = tmp_path / "users.txt"
    saved = users.read_bytes()
    users.unlink()
    users.mkdir()                            # unreadable as a file: the "directory" is down
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
            c.ehlo("client.test")
            with pytest.raises(smtplib.SMTPAuthenticationError) as e:
                c.login("smtpgateway@fabrikam.com", PASSWORD)
            assert e.value.smtp_code == 454 and e.value.smtp_error.startswith(b"4.7.0")
            users.rmdir()
            users.write_bytes(saved)
            time.sleep(0.05)
            assert c.login("smtpgateway@fabrikam.com", PASSWORD)[0] == 235
    finally:
        if users.is_dir():
            users.rmdir()


def test_implicit_tls_listener(start_server, ca, tmp_path):
    cert, key = ca.issue("edge01", "edge01.example.com")
    implicit = free_port()
    server = start_server(extra=toml_table("[[receive_connectors]]", {
        "name": "Implicit TLS",
        "bindings": [f"127.0.0.1:{implicit}"],
        "remote_ip_ranges": ["127.0.0.0/8"],
        "fqdn": "edge01.example.com",
        "auth_mechanisms": ["Tls"],
        "permission_groups": ["AnonymousUsers"],
        "tls_mode": "Implicit",
        "certificate_file": cert,
        "private_key_file": key,
    }))
    raw = socket.create_connection(("127.0.0.1", implicit), timeout=10)
    with client_context(ca).wrap_socket(raw, server_hostname="edge01.example.com") as tls:
        f = tls.makefile("rb")

        def say(line):
            tls.sendall(line + b"\r\n")
            return f.readline()

        assert f.readline().startswith(b"220 edge01.example.com")     # the banner, already encrypted
        assert say(b"EHLO client.test").startswith(b"250-")
        features = []
        while True:
            line = f.readline()
            features.append(line[4:].strip())
            if line.startswith(b"250 "):
                break
        assert b"STARTTLS" not in features
        assert say(b"MAIL FROM:<alice@partner.test>").startswith(b"250")
        assert say(b"RCPT TO:<bob@example.com>").startswith(b"250")
        assert say(b"DATA").startswith(b"354")
        assert say(b"Subject: 465\r\n\r\nx\r\n.").startswith(b"250")
    data = open(server.wait_for(server.drop_files, what="the delivery")[0], "rb").read()
    assert b"with ESMTPS id" in data


def partner_server(start_server, ca, tmp_path):
    cert, key = ca.issue("edge01", "edge01.example.com")
    return start_server(internet=f'''auth_mechanisms = ["Tls"]
certificate_file = "{cert}"
private_key_file = "{key}"
tls_receive_domain_secure_list = ["contoso.com"]
tls_client_ca_file = "{ca.cert_file}"
''')


def partner_session(server, ca, client_cert=None):
    """An smtplib session inside STARTTLS, presenting C{client_cert} (paths) if given."""
    ctx = client_context(ca)
    if client_cert:
        ctx.load_cert_chain(*client_cert)
    c = smtplib.SMTP("127.0.0.1", server.port, timeout=10)
    c.ehlo("mail.contoso.com")
    c._host = "edge01.example.com"
    c.starttls(context=ctx)
    c.ehlo("mail.contoso.com")
    return c


def test_domain_secure_partner_needs_a_certificate_naming_its_domain(start_server, ca, tmp_path):
    server = partner_server(start_server, ca, tmp_path)
    good = ca.issue("contoso", "mail.contoso.com", "contoso.com", client=True)
    wrong_name = ca.issue("fabrikam", "mail.fabrikam.com", client=True)
    (tmp_path / "other").mkdir()
    other_ca = CA(tmp_path / "other")
    untrusted = other_ca.issue("forged", "contoso.com", client=True)

    with partner_session(server, ca, good) as c:
        assert c.mail("alice@contoso.com")[0] == 250
        assert c.rcpt("bob@example.com")[0] == 250
        c.data(b"Subject: partner\r\n\r\nsecure\r\n")
    data = open(server.wait_for(server.drop_files, what="the partner's message")[0], "rb").read()
    assert b"client certificate verified for mail.contoso.com" in data.split(b"\r\n\r\n")[0]

    for cert in (None, wrong_name, untrusted):
        with partner_session(server, ca, cert) as c:
            code, text = c.mail("alice@contoso.com")
            assert (code, text[:5]) == (550, b"5.7.1"), cert
            c.rset()
            assert c.mail("someone@other.test")[0] == 250          # other senders are not partners

    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:      # no TLS at all
        c.ehlo("mail.contoso.com")
        code, text = c.mail("alice@contoso.com")
        assert (code, text[:5]) == (451, b"4.7.1")


def test_stages_see_the_tls_handshake_and_may_refuse_a_logon(start_server, ca, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "__init__.py").write_text("")
    shutil.copy(os.path.join(os.path.dirname(__file__), "plugin_files", "session_policy.py"), plugins)
    server = tls_server(start_server, ca, tmp_path, mechanisms='["Tls", "BasicAuth"]',
                        groups='["AnonymousUsers", "ExchangeUsers"]', extra_server=f'plugin_directory = "{plugins}"',
                        extra='''
[[pipeline]]
stage = "session_policy"
barred = ["edgesync@fabrikam.com"]
''')
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.ehlo("client.test")
        assert c.mail("alice@partner.test") == (530, b"5.7.10 Use STARTTLS first")
        c._host = "edge01.example.com"
        assert c.starttls(context=client_context(ca))[0] == 220
        c.ehlo("client.test")
        c.user, c.password = "edgesync@fabrikam.com", PASSWORD
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            c.auth("PLAIN", c.auth_plain)
        assert refused.value.smtp_code == 535 and b"may not log on here" in refused.value.smtp_error
        c.mail("alice@partner.test")
        assert c.rcpt("bob@partner.test")[0] == 550          # still anonymous: no relay
        c.rset()
        c.user, c.password = "smtpgateway@fabrikam.com", PASSWORD
        assert c.auth("PLAIN", c.auth_plain)[0] == 235
        c.mail("alice@partner.test")
        assert c.rcpt("bob@partner.test")[0] == 250
