"""
DNS routing shares connections by host: mail for another domain whose MX is
the host an idle session is connected to goes over that session (Postfix's
connection cache by address), but only under the same TLS policy, and an
idle session at another host gives way when every slot is taken. A real
sink and a real DNS server on loopback.
"""

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
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

ZONES = {"shared.test": {
    "a.shared.test": [("MX", 10, "mx.shared.test")],
    "b.shared.test": [("MX", 10, "mx.shared.test")],
    "c.shared.test": [("MX", 10, "other.shared.test")],     # another name, the same address
    "mx.shared.test": [("A", "127.0.0.1")],
    "other.shared.test": [("A", "127.0.0.1")],
}}


@pytest.fixture
def peers():
    """(sink, dns): a recording sink and the zones' DNS server, stopped after the test."""
    sink = pytest_twisted.blockon(RecordingSink().start(reactor))
    dns = DNSZoneServer(ZONES).start(reactor)
    yield sink, dns
    pytest_twisted.blockon(defer.gatherResults([sink.stop(), dns.stop()]))


def stored(n: int, domain: str) -> Stored:
    return Stored(f"Q{n}", Envelope(sender="a@s.test", recipients=(Recipient(f"r{n}@{domain}.shared.test"),)))


def mx_agent(sink, dns, extra: str = "", config=None) -> RelayAgent:
    config = config or loads(f"""
[[send_connectors]]
name = "To Internet"
address_spaces = ["*"]
port = {sink.port}
{extra}
""")
    resolver = client.Resolver(servers=[("127.0.0.1", dns.port)], timeout=(2,), reactor=reactor)
    agent = RelayAgent(config.send_connectors[0], helo="edge01.example.com", run=lambda f: defer.maybeDeferred(f),
                       reactor=reactor, mx=MXResolver(resolver, allowed_addresses=["127.0.0.1"]),
                       client_certificate=tls.send_client_certificates(config).get("To Internet"))
    agent.idle_time = 5.0       # ample: the second delivery comes while the first session is idle
    return agent


@pytest_twisted.inlineCallbacks
def test_two_domains_with_the_same_mx_host_share_one_connection(peers):
    sink, dns = peers
    agent = mx_agent(sink, dns)
    first = yield agent.deliver(stored(1, "a"), [0]).addTimeout(10, reactor)
    second = yield agent.deliver(stored(2, "b"), [0]).addTimeout(10, reactor)
    assert [o.status for o in first + second] == ["delivered", "delivered"]
    assert second[0].remote == f"mx.shared.test:{sink.port}"
    assert [m.recipient for m in sink.messages] == ["r1@a.shared.test", "r2@b.shared.test"]
    assert sink.connections == 1
    # and back to the first domain, still on it
    third = yield agent.deliver(stored(3, "a"), [0]).addTimeout(10, reactor)
    assert third[0].status == "delivered" and sink.connections == 1


@pytest_twisted.inlineCallbacks
def test_another_mx_name_at_the_same_address_gets_its_own_connection(peers):
    # outcomes and DomainValidation name the host: the key is the name too
    sink, dns = peers
    agent = mx_agent(sink, dns)
    yield agent.deliver(stored(1, "a"), [0]).addTimeout(10, reactor)
    outcomes = yield agent.deliver(stored(2, "c"), [0]).addTimeout(10, reactor)
    assert outcomes[0].status == "delivered" and outcomes[0].remote == f"other.shared.test:{sink.port}"
    assert sink.connections == 2


@pytest_twisted.inlineCallbacks
def test_a_domain_secure_domain_never_rides_another_domains_session(tmp_path, peers):
    # b requires mutual TLS, which this sink cannot offer: over a's plain
    # session its mail would go out unprotected; on its own it waits
    sink, dns = peers
    ca = CA(tmp_path)
    cert, key = ca.issue("edge", "edge01.example.com", client=True)
    agent = mx_agent(sink, dns, extra=f"""
tls_send_domain_secure_list = ["b.shared.test"]
tls_certificate_file = "{cert}"
tls_private_key_file = "{key}"
tls_ca_file = "{ca.cert_file}"
""")
    first = yield agent.deliver(stored(1, "a"), [0]).addTimeout(10, reactor)
    assert first[0].status == "delivered"
    try:
        yield agent.deliver(stored(2, "b"), [0]).addTimeout(10, reactor)
        raise AssertionError("b's mail was sent without the TLS its domain requires")
    except NoTargetReachable as e:
        assert "does not offer STARTTLS" in str(e)
    assert [m.recipient for m in sink.messages] == ["r1@a.shared.test"] and sink.connections == 2


@pytest_twisted.inlineCallbacks
def test_an_idle_session_at_another_host_gives_way_when_every_slot_is_taken(peers):
    sink, dns = peers
    agent = mx_agent(sink, dns)
    agent.max_connections = 1
    yield agent.deliver(stored(1, "a"), [0]).addTimeout(10, reactor)     # its session now idles
    outcomes = yield agent.deliver(stored(2, "c"), [0]).addTimeout(10, reactor)
    assert outcomes[0].status == "delivered" and sink.connections == 2
    assert sink.commands.count("QUIT") >= 1       # a's session ended for it, not at its idle timeout
    assert agent._open == 1
