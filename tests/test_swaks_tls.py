"""
swaks, the admin's SMTP test client, talking STARTTLS to a real exedge:
the message is accepted inside TLS, with the certificate verified
against the test CA. swaks' TLS needs Perl's Net::SSLeay (Debian's
libnet-ssleay-perl, installed by `make install-test`).
"""

import shutil
import subprocess

import pytest

from certs import CA
from harness import read_log

SWAKS = shutil.which("swaks")
pytestmark = pytest.mark.skipif(
    SWAKS is None or subprocess.run(["perl", "-MNet::SSLeay", "-e1"], capture_output=True).returncode != 0,
    reason="swaks or its Net::SSLeay (libnet-ssleay-perl) is not installed")


def swaks(server, *extra):
    result = subprocess.run(
        [SWAKS, "--server", "127.0.0.1", "--port", str(server.port), "--ehlo", "client.test",
         "--from", "alice@sender.test", "--to", "bob@example.com",
         "--header", "Subject: swaks over TLS", "--body", "hello inside TLS", "--timeout", "15", *extra],
        capture_output=True, text=True, timeout=60)
    return result, result.stdout + result.stderr


def test_swaks_sends_over_starttls_with_a_verified_certificate(start_server, tmp_path):
    ca = CA(tmp_path)
    cert, key = ca.issue("edge01", "edge01.example.com")
    server = start_server(internet=f'certificate_file = "{cert}"\nprivate_key_file = "{key}"')
    result, out = swaks(server, "--tls", "--tls-verify", "--tls-ca-path", ca.cert_file)
    assert result.returncode == 0, out
    lines = out.splitlines()
    starttls = next(i for i, line in enumerate(lines) if line.startswith(" -> STARTTLS"))
    assert lines[starttls + 1].startswith("<-  220"), out
    assert any("TLS started with cipher" in line for line in lines), out
    # after the handshake swaks marks its lines ~> and <~: the message went inside TLS
    assert any(line.startswith(" ~> MAIL FROM:<alice@sender.test>") for line in lines), out
    accepted = [line for line in lines if line.startswith("<~  250 2.6.0")]
    assert accepted, out
    dropped = server.wait_for(server.drop_files, what="the message in the drop directory")
    stored = open(dropped[0], "rb").read()
    assert b"hello inside TLS" in stored
    assert b"with ESMTPS" in stored            # our Received field records the TLS session (RFC 3848)


def test_swaks_refuses_a_certificate_it_cannot_verify(start_server, tmp_path):
    """The check above means something: another CA's certificate fails swaks' verification."""
    (tmp_path / "other").mkdir()
    other = CA(tmp_path / "other", cn="another CA")
    ours = CA(tmp_path)
    cert, key = ours.issue("edge01", "edge01.example.com")
    server = start_server(internet=f'certificate_file = "{cert}"\nprivate_key_file = "{key}"')
    result, out = swaks(server, "--tls", "--tls-verify", "--tls-ca-path", other.cert_file)
    assert result.returncode != 0, out
    assert not any(line.startswith("<~  250 2.6.0") for line in out.splitlines()), out
    assert server.drop_files() == []
    assert "Traceback" not in read_log(server.log_path)
