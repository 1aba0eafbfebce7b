"""
A real fetchmail (Debian's) collecting from exedge, the way sites pair
with us: in its ETRN mode (exedge then delivers to the site's host) and in
its ODMR mode (ATRN after AUTH; fetchmail relays the turned-round session
to the site's SMTP receiver). The site's receiver is exedge's sink, run as
a process; fetchmail runs in the foreground and is stopped by its PID.
"""

import os
import shutil
import smtplib
import subprocess
import sys

import pytest

from harness import free_port
from test_etrn import wait_until
from test_tls_auth import PASSWORD, add_user

pytestmark = pytest.mark.skipif(shutil.which("fetchmail") is None and os.environ.get("CI") != "true",
                                reason="fetchmail is not installed")

SITE = """
[[pipeline]]
stage = "etrn"
receive_connectors = ["From Internet"]
atrn = true

[[send_connectors]]
name = "To Branch"
address_spaces = ["branch.fabrikam.com"]
smart_hosts = ["127.0.0.1:{sink}"]
dns_routing_enabled = false
remote_triggered_delivery = true
remote_trigger_accounts = ["branch@fabrikam.com"]

[[accepted_domains]]
domain_name = "branch.fabrikam.com"
domain_type = "InternalRelay"

[directory]
credentials_file = "{users}"
cram_md5_accounts = [{{ username = "branch@fabrikam.com", password_file = "{secret}" }}]
"""


@pytest.fixture
def sink(tmp_path):
    port, out = free_port(), tmp_path / "site"
    proc = subprocess.Popen([sys.executable, "-m", "exedge.testing", "--port", str(port), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    yield port, out
    proc.terminate()
    proc.wait(timeout=15)


def provider(start_server, tmp_path, sink_port):
    users = tmp_path / "users.txt"
    add_user(users, "branch@fabrikam.com")
    secret = tmp_path / "branch.secret"
    secret.write_text(PASSWORD + "\n")
    server = start_server(internet='auth_mechanisms = ["Tls", "BasicAuth"]\n'
                                   'permission_groups = ["AnonymousUsers", "ExchangeUsers"]\n'
                                   'auth_tarpit_interval = 0\nprotocol_logging_level = "Verbose"\n',
                          extra=SITE.format(sink=sink_port, users=users, secret=secret))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        for rcpt in ("bob@branch.fabrikam.com", "carol@branch.fabrikam.com"):
            c.sendmail("alice@partner.test", [rcpt], f"Subject: for {rcpt}\r\n\r\nheld for the branch\r\n".encode())
    return server


def fetchmail(tmp_path, rc: str, *args) -> subprocess.CompletedProcess:
    rcfile = tmp_path / "fetchmailrc"
    rcfile.write_text(rc)
    rcfile.chmod(0o600)
    env = dict(os.environ, HOME=str(tmp_path), FETCHMAILHOME=str(tmp_path))
    return subprocess.run(["fetchmail", "--nodetach", "--nosyslog", "-v", "-f", str(rcfile),
                           "--pidfile", str(tmp_path / "fetchmail.pid"), *args],
                          capture_output=True, text=True, timeout=120, env=env)


def delivered(out) -> list[str]:
    if not out.exists():
        return []
    return sorted((out / name).read_bytes().split(b"\r\n")[1].decode() for name in os.listdir(out)
                  if name.endswith(".eml"))


def test_fetchmail_in_etrn_mode_makes_exedge_deliver_the_held_mail(start_server, tmp_path, sink):
    sink_port, out = sink
    server = provider(start_server, tmp_path, sink_port)
    r = fetchmail(tmp_path, f"poll 127.0.0.1 service {server.port} protocol ETRN\n"
                            f"    fetchdomains branch.fabrikam.com\n")
    assert "253" in r.stdout + r.stderr, r.stdout + r.stderr
    assert wait_until(lambda: len(delivered(out)) == 2)
    assert delivered(out) == ["X-Sink-Rcpt: <bob@branch.fabrikam.com>", "X-Sink-Rcpt: <carol@branch.fabrikam.com>"]
    assert server.wait_for(lambda: not os.listdir(server.path("var", "spool", "queue")), what="an empty queue")


def test_fetchmail_in_odmr_mode_collects_over_its_own_connection(start_server, tmp_path, sink):
    sink_port, out = sink
    server = provider(start_server, tmp_path, 9)          # the smart host is never used: ATRN delivers over the session
    r = fetchmail(tmp_path, f'poll 127.0.0.1 service {server.port} protocol ODMR\n'
                            f'    user "branch@fabrikam.com" password "{PASSWORD}"\n'
                            f'    fetchdomains branch.fabrikam.com\n'
                            f'    smtphost 127.0.0.1/{sink_port}\n')
    assert delivered(out) == ["X-Sink-Rcpt: <bob@branch.fabrikam.com>", "X-Sink-Rcpt: <carol@branch.fabrikam.com>"], \
        r.stdout + r.stderr
    assert server.wait_for(lambda: not os.listdir(server.path("var", "spool", "queue")), what="an empty queue")
    assert "ATRN" in server.log and "reversing the connection" in server.log
