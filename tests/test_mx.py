"""MX routing against a real twisted.names server on loopback."""

import random

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.names import client

from exedge.send.mx import DNSCache, MXResolver, RoutingFailure, TransientDNSFailure
from exedge.testing import DNSZoneServer
from harness import free_port

ZONES = {"remote.test": {
    "remote.test": [("MX", 20, "mx3.remote.test"), ("MX", 10, "mx1.remote.test"), ("MX", 10, "mx2.remote.test")],
    "mx1.remote.test": [("A", "192.0.2.1")], "mx2.remote.test": [("A", "192.0.2.2"), ("AAAA", "2001:db8::2")],
    "mx3.remote.test": [("A", "192.0.2.3")],
    "nomx.remote.test": [("A", "192.0.2.9")],
    "null.remote.test": [("MX", 0, ".")],
    "loop.remote.test": [("MX", 10, "edge.remote.test")], "edge.remote.test": [("A", "127.0.0.1")],
    "self.remote.test": [("MX", 10, "edge01.example.com.remote.test")],
    "own.remote.test": [("MX", 10, "own-ip.remote.test")], "own-ip.remote.test": [("A", "198.51.100.7")],
}}


@pytest.fixture
def dns_server():
    server = DNSZoneServer(ZONES).start(reactor)
    yield server
    pytest_twisted.blockon(server.stop())


def mx(server, **kw):
    resolver = client.Resolver(servers=[("127.0.0.1", server.port)], timeout=(2,), reactor=reactor)
    return MXResolver(resolver, own_names=["edge01.example.com.remote.test"], own_addresses=["198.51.100.7"], **kw)


@pytest_twisted.inlineCallbacks
def test_mx_hosts_by_preference_with_every_address(dns_server):
    targets = yield mx(dns_server, rng=random.Random(1)).targets("remote.test")
    hosts = [h for h, _ in targets]
    assert set(hosts[:3]) == {"mx1.remote.test", "mx2.remote.test"} and hosts[3] == "mx3.remote.test"
    assert ("mx2.remote.test", "2001:db8::2") in targets and ("mx2.remote.test", "192.0.2.2") in targets


@pytest_twisted.inlineCallbacks
def test_equal_preferences_are_shuffled(dns_server):
    firsts = set()
    for seed in range(20):
        targets = yield mx(dns_server, rng=random.Random(seed)).targets("remote.test")
        firsts.add(targets[0][0])
    assert firsts == {"mx1.remote.test", "mx2.remote.test"}


@pytest_twisted.inlineCallbacks
def test_no_mx_falls_back_to_the_domains_address(dns_server):
    assert (yield mx(dns_server).targets("nomx.remote.test")) == [("nomx.remote.test", "192.0.2.9")]


@pytest.mark.parametrize("domain,status", [
    ("null.remote.test", "5.1.10"), ("missing.remote.test", "5.4.4"), ("loop.remote.test", "5.4.6"),
    ("self.remote.test", "5.4.6"), ("own.remote.test", "5.4.6"),
])
@pytest_twisted.inlineCallbacks
def test_permanent_routing_answers(dns_server, domain, status):
    with pytest.raises(RoutingFailure) as e:
        yield mx(dns_server).targets(domain)
    assert e.value.status == status


@pytest_twisted.inlineCallbacks
def test_loopback_allowed_when_configured_as_a_smart_host(dns_server):
    targets = yield mx(dns_server, allowed_addresses=["127.0.0.1"]).targets("loop.remote.test")
    assert targets == [("edge.remote.test", "127.0.0.1")]


@pytest_twisted.inlineCallbacks
def test_dns_timeout_is_transient():
    silent = free_port()    # nothing answers there
    resolver = client.Resolver(servers=[("127.0.0.1", silent)], timeout=(1,), reactor=reactor)
    with pytest.raises(TransientDNSFailure):
        yield MXResolver(resolver).targets("remote.test")


@pytest_twisted.inlineCallbacks
def test_ourselves_as_a_backup_mx_drops_only_the_less_preferred_hosts():
    server = DNSZoneServer({"backup.test": {
        "backup.test": [("MX", 10, "primary.backup.test"), ("MX", 20, "edge.backup.test"),
                        ("MX", 30, "tertiary.backup.test")],
        "primary.backup.test": [("A", "192.0.2.10")], "edge.backup.test": [("A", "198.51.100.7")],
        "tertiary.backup.test": [("A", "192.0.2.30")],
    }}).start(reactor)
    try:
        targets = yield mx(server).targets("backup.test")
    finally:
        yield server.stop()
    assert targets == [("primary.backup.test", "192.0.2.10")]


@pytest_twisted.inlineCallbacks
def test_sharing_the_best_preference_with_ourselves_is_always_a_loop():
    server = DNSZoneServer({"tie.test": {
        "tie.test": [("MX", 10, "edge.tie.test"), ("MX", 10, "other.tie.test")],
        "edge.tie.test": [("A", "198.51.100.7")], "other.tie.test": [("A", "192.0.2.5")],
    }}).start(reactor)
    try:
        for seed in range(10):
            with pytest.raises(RoutingFailure) as e:
                yield mx(server, rng=random.Random(seed)).targets("tie.test")
            assert e.value.status == "5.4.6"
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_answers_are_kept_for_their_ttl_and_no_longer():
    """A second domain whose MX hosts were just looked up asks the DNS nothing; past the TTL it asks again."""
    server = DNSZoneServer(ZONES).start(reactor)
    clock = task.Clock()
    cache = DNSCache(client.Resolver(servers=[("127.0.0.1", server.port)], timeout=(1,), reactor=reactor), clock)
    resolver = MXResolver(cache, rng=random.Random(1))
    try:
        first = yield resolver.targets("remote.test")
    finally:
        yield server.stop()
    # nothing answers now: only what was kept can
    assert (yield resolver.targets("remote.test")) == first
    clock.advance(61)       # the zone's records say 60 s
    with pytest.raises(TransientDNSFailure):
        yield resolver.targets("remote.test")


@pytest_twisted.inlineCallbacks
def test_the_cache_keeps_at_most_max_entries():
    server = DNSZoneServer(ZONES).start(reactor)
    cache = DNSCache(client.Resolver(servers=[("127.0.0.1", server.port)], timeout=(1,), reactor=reactor),
                     task.Clock())
    cache.max_entries = 2
    try:
        for host in ("mx1.remote.test", "mx2.remote.test", "mx3.remote.test"):
            yield cache.lookupAddress(host)
    finally:
        yield server.stop()
    answers, _, _ = yield cache.lookupAddress("MX3.remote.test.")     # names compare as DNS compares them
    assert [a.payload.dottedQuad() for a in answers] == ["192.0.2.3"]
    with pytest.raises(defer.TimeoutError):
        yield cache.lookupAddress("mx1.remote.test")      # the oldest went


@pytest_twisted.inlineCallbacks
def test_a_domain_that_does_not_exist_is_kept_for_its_negative_ttl():
    """RFC 2308: NXDOMAIN is kept for the SOA's minimum (60 s here); a run of mail to it asks the DNS once."""
    from twisted.names import error as dns_error
    server = DNSZoneServer(ZONES).start(reactor)
    clock = task.Clock()
    cache = DNSCache(client.Resolver(servers=[("127.0.0.1", server.port)], timeout=(1,), reactor=reactor), clock)
    try:
        with pytest.raises(dns_error.DNSNameError):
            yield cache.lookupMailExchange("nowhere.remote.test")
    finally:
        yield server.stop()
    # nothing answers now: the NXDOMAIN kept says it again, and MX routing fails the domain at once
    with pytest.raises(RoutingFailure) as e:
        yield MXResolver(cache).targets("nowhere.remote.test")
    assert e.value.status == "5.4.4"
    clock.advance(61)
    with pytest.raises(defer.TimeoutError):
        yield cache.lookupMailExchange("nowhere.remote.test")
