"""
Opportunistic STARTTLS towards a next hop whose TLS is broken: when TLS is
not required for the hop, the same host is tried again at once in plain
text (Postfix at level "may", Exim's tls_tempfail_tryclear, OpenSMTPD);
when it is required (require_tls, a tls_auth_level, a domain-secure
partner, BasicAuthRequireTLS), the attempt stays a transient failure.
The next hop is the recording sink on loopback offering a STARTTLS that
breaks; the log is read through Twisted's global log publisher.
"""

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.names import client

from certs import CA
from exedge import tls
from exedge.config import loads
from exedge.queue.envelope import Envelope, Recipient
from exedge.send import RelayAgent
from exedge.send.mx import MXResolver
from exedge.send.relay import NoTargetReachable
from exedge.testing import DNSZoneServer, RecordingSink
from test_relay_agent import Stored


@pytest.fixture
def log_lines():
    lines = []

    def observe(event):
        text = formatEvent(event)
        if text:
            lines.append(text)

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def message() -> Stored:
    return Stored("Q1", Envelope(sender="a@s.test", recipients=(Recipient("bob@partner.test"),)))


def smart_host_agent(port: int, extra: str = "", changes=None, **kw) -> RelayAgent:
    connector = loads(f"""
[[send_connectors]]
name = "To partner"
address_spaces = ["partner.test"]
dns_routing_enabled = false
smart_hosts = ["127.0.0.1:{port}"]
{extra}
""").send_connectors[0]
    connector = attrs.evolve(connector, **(changes or {}))
    return RelayAgent(connector, helo="edge01.example.com", run=lambda f: defer.maybeDeferred(f),
                      reactor=reactor, **kw)


def fell_back(log_lines) -> list[str]:
    return [line for line in log_lines if "falling back to plain text" in line]


@pytest.mark.parametrize("broken", ["handshake", "injected"])
@pytest_twisted.inlineCallbacks
def test_opportunistic_tls_falls_back_to_plain_text_within_the_same_attempt(log_lines, broken):
    # "injected": the 220 comes with a plain-text reply in the same packet;
    # read as if it came inside TLS, it would pass for the EHLO reply
    sink = yield RecordingSink(broken_starttls=broken).start(reactor)
    try:
        outcomes = yield smart_host_agent(sink.port).deliver(message(), [0]).addTimeout(10, reactor)
        assert [o.status for o in outcomes] == ["delivered"]
        assert [m.recipient for m in sink.messages] == ["bob@partner.test"]      # delivered once
        assert sink.connections == 2 and sink.commands.count("STARTTLS") == 1    # TLS, then plain text
        assert not any(c.startswith("MAIL") for c in sink.commands[:sink.commands.index("STARTTLS")])
        [line] = fell_back(log_lines)
        assert f"127.0.0.1:{sink.port}: STARTTLS failed" in line
    finally:
        yield sink.stop()


@pytest_twisted.inlineCallbacks
def test_basic_auth_that_may_go_in_plain_text_falls_back_too(log_lines):
    # BasicAuth (not ...RequireTLS) sends credentials without TLS by choice;
    # the sink offers no AUTH, so the session stops before mail, in plain text
    sink = yield RecordingSink(broken_starttls="handshake").start(reactor)
    try:
        agent = smart_host_agent(sink.port, 'smart_host_auth_mechanism = "BasicAuth"\n'
                                            'authentication_credential = { username = "edge", password_file = "x" }',
                                 credentials=("edge", "secret"))
        with pytest.raises(NoTargetReachable, match="offers no AUTH"):
            yield agent.deliver(message(), [0]).addTimeout(10, reactor)
        assert sink.connections == 2 and len(fell_back(log_lines)) == 1
    finally:
        yield sink.stop()


REQUIRED = {
    "require_tls": ("require_tls = true", None, None),
    "tls_auth_level": ('require_tls = true\ntls_auth_level = "CertificateValidation"', None, None),
    # the loader insists on require_tls with a level; the send side does not count on it
    "tls_auth_level alone": ('require_tls = true\ntls_auth_level = "EncryptionOnly"', {"require_tls": False}, None),
    "BasicAuthRequireTLS": ('smart_host_auth_mechanism = "BasicAuthRequireTLS"\n'
                            'authentication_credential = { username = "edge", password_file = "x" }',
                            None, ("edge", "secret")),
}


@pytest.mark.parametrize("case", sorted(REQUIRED))
@pytest_twisted.inlineCallbacks
def test_required_tls_never_falls_back(log_lines, case):
    extra, changes, credentials = REQUIRED[case]
    sink = yield RecordingSink(broken_starttls="handshake").start(reactor)
    try:
        agent = smart_host_agent(sink.port, extra, changes, credentials=credentials)
        with pytest.raises(NoTargetReachable, match="connection lost"):
            yield agent.deliver(message(), [0]).addTimeout(10, reactor)   # transient: the queue retries
        assert sink.connections == 1 and sink.messages == []
        assert fell_back(log_lines) == []
    finally:
        yield sink.stop()


@pytest_twisted.inlineCallbacks
def test_a_domain_secure_partner_never_gets_plain_text(log_lines, tmp_path):
    sink = yield RecordingSink(broken_starttls="handshake").start(reactor)
    dns = DNSZoneServer({"partner.test": {"partner.test": [("MX", 10, "mail.partner.test")],
                                          "mail.partner.test": [("A", "127.0.0.1")]}}).start(reactor)
    try:
        ca = CA(tmp_path)
        cert, key = ca.issue("edge", "edge01.example.com", client=True)
        config = loads(f"""
[[send_connectors]]
name = "To partners"
address_spaces = ["partner.test"]
port = {sink.port}
tls_send_domain_secure_list = ["partner.test"]
tls_certificate_file = "{cert}"
tls_private_key_file = "{key}"
tls_ca_file = "{ca.cert_file}"
""")
        resolver = client.Resolver(servers=[("127.0.0.1", dns.port)], timeout=(2,), reactor=reactor)
        agent = RelayAgent(config.send_connectors[0], helo="edge01.example.com",
                           run=lambda f: defer.maybeDeferred(f), reactor=reactor,
                           mx=MXResolver(resolver, allowed_addresses=["127.0.0.1"]),
                           client_certificate=tls.send_client_certificates(config)["To partners"])
        with pytest.raises(NoTargetReachable, match="connection lost"):
            yield agent.deliver(message(), [0]).addTimeout(10, reactor)
        assert sink.connections == 1 and sink.messages == []
        assert fell_back(log_lines) == []
    finally:
        yield sink.stop()
        yield dns.stop()


@pytest.mark.parametrize("code", [454, 554])
@pytest_twisted.inlineCallbacks
def test_starttls_refused_goes_on_in_plain_text_on_the_same_connection(log_lines, code):
    sink = yield RecordingSink(broken_starttls=code).start(reactor)
    try:
        outcomes = yield smart_host_agent(sink.port).deliver(message(), [0]).addTimeout(10, reactor)
        assert [o.status for o in outcomes] == ["delivered"] and sink.connections == 1
        assert sink.commands[:2] == ["EHLO edge01.example.com", "STARTTLS"]
        assert sink.commands[2].startswith("MAIL FROM:<a@s.test>")      # no second EHLO: nothing changed
        assert any(f"127.0.0.1:{sink.port}: STARTTLS refused ({code} " in line and "plain text" in line
                   for line in log_lines)
    finally:
        yield sink.stop()


@pytest_twisted.inlineCallbacks
def test_starttls_refused_with_tls_required_sends_nothing(log_lines):
    sink = yield RecordingSink(broken_starttls=454).start(reactor)
    try:
        with pytest.raises(NoTargetReachable, match="STARTTLS refused: 454"):
            yield smart_host_agent(sink.port, "require_tls = true").deliver(message(), [0]).addTimeout(10, reactor)
        assert sink.connections == 1 and not any(c.startswith("MAIL") for c in sink.commands)
    finally:
        yield sink.stop()
