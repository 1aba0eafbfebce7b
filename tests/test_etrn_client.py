"""
The ETRN client, the dial-up site's side: `exedge etrn NAME` against a
real exedge that holds mail for the site, and the client's runs on its
schedule and interval, driven by a task.Clock against a small ETRN peer
on loopback.
"""

import datetime
import os
import subprocess
import sys
import zoneinfo

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.protocols import basic

from exedge.config import ConfigError, loads
from exedge.dequeue.client import EtrnClientService
from harness import free_port
from test_etrn import ETRN_SERVER, wait_until

EXEDGE = os.path.join(os.path.dirname(sys.executable), "exedge")
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def site_config(port: int, *, extra: str = "") -> str:
    return f"""
[server]
fqdn = "gw.branch.fabrikam.com"

[[etrn_clients]]
name = "ISP"
server = "127.0.0.1:{port}"
domains = ["branch.fabrikam.com", "@sales.fabrikam.com"]
{extra}
"""


def test_exedge_etrn_asks_a_real_exedge_that_then_delivers(start_server, tmp_path):
    sink_port = free_port()
    sink_dir = tmp_path / "sink"
    sink = subprocess.Popen([sys.executable, "-m", "exedge.testing", "--port", str(sink_port), "--out", str(sink_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        isp = start_server(extra=ETRN_SERVER.format(sink=sink_port))
        import smtplib
        with smtplib.SMTP("127.0.0.1", isp.port, timeout=10) as c:
            c.sendmail("alice@partner.test", ["bob@branch.fabrikam.com"], b"Subject: held\r\n\r\nfor the branch\r\n")
        config = tmp_path / "site.toml"
        config.write_text(site_config(isp.port))
        r = subprocess.run([EXEDGE, "etrn", "isp", "--config", str(config)], capture_output=True, text=True, timeout=60)
        assert r.stdout.splitlines()[0] == \
            "ETRN branch.fabrikam.com: 253 2.0.0 OK, 1 pending messages for node branch.fabrikam.com started"
        assert r.stdout.splitlines()[1].startswith("ETRN @sales.fabrikam.com: 459 ")   # not held there
        assert r.returncode == 1                                   # not every domain got a 25x
        assert wait_until(lambda: sink_dir.exists() and os.listdir(sink_dir))
        config.write_text(site_config(isp.port).replace(', "@sales.fabrikam.com"', ""))
        r = subprocess.run([EXEDGE, "etrn", "ISP", "--config", str(config)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "251 2.0.0 OK, no messages waiting" in r.stdout
        closed = free_port()
        config.write_text(site_config(closed))
        r = subprocess.run([EXEDGE, "etrn", "ISP", "--config", str(config)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "ISP: 127.0.0.1:" in r.stderr and "refused" in r.stderr.lower()
        r = subprocess.run([EXEDGE, "etrn", "nobody", "--config", str(config)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "no [[etrn_clients]] named 'nobody'" in r.stderr
    finally:
        sink.terminate()
        sink.wait(timeout=15)


class Provider(basic.LineReceiver):
    """Answers ETRN with 250 and notes when it was asked (on the test's clock)."""

    def connectionMade(self):
        self.sendLine(b"220 isp.test ESMTP")

    def lineReceived(self, line):
        verb = line[:4].upper()
        if verb == b"EHLO":
            self.sendLine(b"250-isp.test\r\n250 ETRN")
        elif verb == b"ETRN":
            self.factory.asked.append((self.factory.clock.seconds(), line[5:].decode()))
            self.sendLine(b"250 OK, queuing for node started")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()


@pytest_twisted.inlineCallbacks
def test_runs_at_each_window_opening_and_every_interval_inside_it():
    clock = task.Clock()
    clock.advance(datetime.datetime(2026, 12, 7, 7, 0, tzinfo=BERLIN).timestamp())    # Monday 07:00
    factory = protocol.Factory.forProtocol(Provider)
    factory.asked, factory.clock = [], clock
    port = yield reactor.listenTCP(0, factory, interface="127.0.0.1")
    config = loads(site_config(port.getHost().port, extra='schedule = ["Mon 08:00-09:00"]\n'
                                                          'schedule_time_zone = "Europe/Berlin"\ninterval = "30m"\n'
                                                          'domains = ["branch.fabrikam.com"]\n').replace(
        'domains = ["branch.fabrikam.com", "@sales.fabrikam.com"]\n', ""))
    service = EtrnClientService(config.etrn_clients[0], helo="gw.branch.fabrikam.com", reactor=reactor, clock=clock)
    try:
        service.startService()
        assert factory.asked == []                              # outside its window: nothing at start

        @defer.inlineCallbacks
        def until(n):
            for _ in range(250):
                if len(factory.asked) >= n:
                    return
                yield task.deferLater(reactor, 0.02, lambda: None)
            raise AssertionError(f"{len(factory.asked)} runs, not {n}")

        for hour, minute, n in ((8, 0, 1), (8, 30, 2)):
            clock.advance(datetime.datetime(2026, 12, 7, hour, minute, tzinfo=BERLIN).timestamp() - clock.seconds())
            yield until(n)
        clock.advance(30 * 60)                                  # 09:00: the window has closed
        yield task.deferLater(reactor, 0.3, lambda: None)
        assert len(factory.asked) == 2
        clock.advance(datetime.datetime(2026, 12, 14, 8, 0, tzinfo=BERLIN).timestamp() - clock.seconds())
        yield until(3)                                          # next Monday's opening
        assert [node for _, node in factory.asked] == ["branch.fabrikam.com"] * 3
    finally:
        service.stopService()
        yield port.stopListening()


def test_etrn_client_config_errors():
    base = '[[etrn_clients]]\nname = "ISP"\nserver = "mail.isp.example"\n'
    config = loads(base + 'domains = ["branch.fabrikam.com"]\n')
    assert config.etrn_clients[0].server == ("mail.isp.example", 25)
    for extra, message in (('domains = ["a b.test"]\n', "expected a domain"),
                           ('domains = []\n', "needs at least one domain"),
                           ('domains = ["#queue"]\n', "expected a domain"),
                           ('domains = ["x.test"]\ninterval = "10s"\n', "at least 60 seconds"),
                           ('domains = ["x.test"]\nsmart_host_auth_mechanism = "BasicAuth"\n', "needs authentication_credential")):
        with pytest.raises(ConfigError) as e:
            loads(base + extra, "site.toml")
        assert "site.toml:" in str(e.value) and message in str(e.value), (extra, str(e.value))


def test_exedge_asks_a_real_postfix_that_holds_our_mail(start_server, tmp_path):
    """
    Postfix as the provider: it holds mail for branch.fabrikam.com in its
    deferred queue (an etrn-only transport in defer_transports, the domain
    in fast_flush_domains) until our client's ETRN; then it delivers to us.
    """
    import smtplib
    import postfix
    if not postfix.available():
        if os.environ.get("CI") == "true":
            pytest.fail("postfix is not installed, or not root")
        pytest.skip("postfix is not installed, or not root")
    site = start_server(extra='[[accepted_domains]]\ndomain_name = "branch.fabrikam.com"\n'
                              '[[send_connectors]]\nname = "Branch mailboxes"\naddress_spaces = ["branch.fabrikam.com"]\n'
                              'drop_directory = "var/branch"\n')
    isp = postfix.PrivatePostfix(free_port(), {
        "relay_domains": "branch.fabrikam.com",
        "transport_maps": f"inline:{{branch.fabrikam.com=etrn-only:[127.0.0.1]:{site.port}}}",
        "defer_transports": "etrn-only",
        "fast_flush_domains": "$relay_domains",
        "smtpd_etrn_restrictions": "permit_mynetworks, reject",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
    }, master_extra="etrn-only unix - - n - - smtp\n")
    isp.start()
    try:
        with smtplib.SMTP("127.0.0.1", isp.port, timeout=10) as c:
            c.sendmail("alice@partner.test", ["bob@branch.fabrikam.com"], b"Subject: via the ISP\r\n\r\nheld\r\n")
        assert wait_until(lambda: "bob@branch.fabrikam.com" in isp.queue_listing()), isp.log[-3000:]
        config = tmp_path / "site.toml"
        config.write_text(site_config(isp.port).replace(', "@sales.fabrikam.com"', ""))
        r = subprocess.run([EXEDGE, "etrn", "ISP", "--config", str(config)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and r.stdout.startswith("ETRN branch.fabrikam.com: 250 "), r.stdout + r.stderr
        drop = site.path("var", "branch")
        assert wait_until(lambda: os.path.isdir(drop) and os.listdir(drop), 30), isp.log[-3000:]
        with open(os.path.join(drop, os.listdir(drop)[0]), "rb") as f:
            assert b"Subject: via the ISP" in f.read()
    finally:
        isp.stop()


def test_the_client_starts_tls_and_authenticates_before_it_asks(start_server, tmp_path):
    """
    A provider that lets only authenticated sites ETRN: the client starts
    TLS (validating the chain against a private CA) and authenticates with
    the smart-host keys of its [[etrn_clients]] entry; without them: 530.
    """
    from certs import CA
    from test_tls_auth import PASSWORD, add_user
    ca = CA(tmp_path)
    cert, key = ca.issue("isp", "edge01.example.com")
    users = tmp_path / "users.txt"
    add_user(users, "branch@fabrikam.com")
    isp = start_server(
        internet=f'auth_mechanisms = ["Tls", "BasicAuth", "BasicAuthRequireTLS"]\n'
                 f'permission_groups = ["AnonymousUsers", "ExchangeUsers"]\ncertificate_file = "{cert}"\n'
                 f'private_key_file = "{key}"\nauth_tarpit_interval = 0\ntarpit_interval = 0\n',
        extra=ETRN_SERVER.format(sink=free_port()).replace(
            'receive_connectors = ["From Internet"]', 'receive_connectors = ["From Internet"]\nrequire_authentication = true')
        + f'\n[directory]\ncredentials_file = "{users}"\n')
    secret = tmp_path / "isp.secret"
    secret.write_text(PASSWORD + "\n")
    config = tmp_path / "site.toml"
    tls = (f'require_tls = true\ntls_auth_level = "CertificateValidation"\ntls_ca_file = "{ca.cert_file}"\n'
           'smart_host_auth_mechanism = "BasicAuth"\n'
           f'authentication_credential = {{ username = "branch@fabrikam.com", password_file = "{secret}" }}\n')
    config.write_text(site_config(isp.port, extra=tls).replace(', "@sales.fabrikam.com"', ""))
    r = subprocess.run([EXEDGE, "etrn", "ISP", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "251 2.0.0 OK, no messages waiting" in r.stdout, r.stdout + r.stderr
    assert "authenticated as branch@fabrikam.com" in isp.log and PASSWORD not in isp.log
    config.write_text(site_config(isp.port, extra=f'tls_ca_file = "{ca.cert_file}"\n')
                      .replace(', "@sales.fabrikam.com"', ""))
    r = subprocess.run([EXEDGE, "etrn", "ISP", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "530 5.7.0 Authentication required" in r.stdout
