"""Connector choice, permission groups to rights, and send-connector routing."""

import pytest

from exedge.auth.permissions import Principal, Right, session_permissions
from exedge.config import loads
from exedge.receive import ConnectorTable
from exedge.routing import UNREACHABLE, NextHop, Router


def table(*connectors: str) -> ConnectorTable:
    text = "".join(f"[[receive_connectors]]\n{c}\n" for c in connectors)
    return ConnectorTable(loads(text).receive_connectors)


def rc(name, bindings, ranges, extra=""):
    return f'name = "{name}"\nbindings = {bindings}\nremote_ip_ranges = {ranges}\n{extra}'


def test_most_specific_range_wins_regardless_of_order():
    t = table(
        rc("all", '["127.0.0.1:25"]', '["0.0.0.0-255.255.255.255"]'),
        rc("host", '["127.0.0.1:25"]', '["127.0.0.7"]'),
        rc("net", '["127.0.0.1:25"]', '["127.0.0.0/24"]'),
    )
    assert t.select("127.0.0.1", 25, "127.0.0.7").name == "host"
    assert t.select("127.0.0.1", 25, "127.0.0.8").name == "net"
    assert t.select("127.0.0.1", 25, "127.0.1.8").name == "all"


def test_binding_decides_and_wildcard_binding_covers_addresses():
    t = table(
        rc("wild", '["0.0.0.0:25"]', '["0.0.0.0-255.255.255.255"]'),
        rc("exact", '["127.0.0.1:25"]', '["0.0.0.0-255.255.255.255"]'),
        rc("other port", '["127.0.0.1:587"]', '["127.0.0.0/8"]'),
    )
    assert t.select("127.0.0.1", 25, "127.0.0.9").name == "exact"   # same range: exact binding wins
    assert t.select("127.0.0.2", 25, "127.0.0.9").name == "wild"
    assert t.select("127.0.0.1", 587, "127.0.0.9").name == "other port"
    assert t.select("127.0.0.1", 2525, "127.0.0.9") is None
    # the wildcard socket covers 127.0.0.1:25, so only one socket per port is opened
    assert [str(b) for b in t.listen_bindings()] == ["0.0.0.0:25", "127.0.0.1:587"]


def test_a_socket_gets_the_largest_backlog_of_the_connectors_it_serves():
    """Exact bindings a wildcard socket covers count too; a disabled connector does not."""
    t = table(
        rc("wild", '["0.0.0.0:25"]', '["0.0.0.0-255.255.255.255"]', "listen_backlog = 200"),
        rc("exact", '["127.0.0.1:25"]', '["10.0.0.0/8"]', "listen_backlog = 1000"),
        rc("off", '["0.0.0.0:25"]', '["127.0.0.0/8"]', "listen_backlog = 4000\nenabled = false"),
        rc("v6", '["[::]:25"]', '["::/0"]', "listen_backlog = 3000"),
        rc("other port", '["127.0.0.1:587"]', '["127.0.0.0/8"]'),
    )
    assert {str(b): t.listen_backlog(b) for b in t.listen_bindings()} == {
        "0.0.0.0:25": 1000, "[::]:25": 3000, "127.0.0.1:587": 4096,
    }


def test_ipv6_and_mapped_addresses():
    t = table(rc("v6", '["[::1]:25"]', '["::1", "2001:db8::/32"]'), rc("v4", '["127.0.0.1:25"]', '["127.0.0.1"]'))
    assert t.select("::1", 25, "::1").name == "v6"
    assert t.select("::1", 25, "2001:db8::5").name == "v6"
    assert t.select("::ffff:127.0.0.1", 25, "::ffff:127.0.0.1").name == "v4"
    assert t.select("::1", 25, "2001:db9::5") is None


def test_disabled_connectors_are_ignored():
    t = table(rc("off", '["127.0.0.1:25"]', '["127.0.0.1"]', "enabled = false"),
              rc("on", '["127.0.0.1:25"]', '["127.0.0.0/8"]'))
    assert t.select("127.0.0.1", 25, "127.0.0.1").name == "on"


def test_connection_caps_per_connector_and_source():
    t = table(rc("c", '["127.0.0.1:25"]', '["127.0.0.0/8"]',
                 "max_inbound_connection = 3\nmax_inbound_connection_per_source = 2"))
    c = t.connectors[0]
    assert t.admit(c, "127.0.0.5") and t.admit(c, "127.0.0.5")
    assert not t.admit(c, "127.0.0.5")
    assert t.admit(c, "127.0.0.6")
    assert not t.admit(c, "127.0.0.7")        # connector total
    t.release(c, "127.0.0.5")
    assert t.admit(c, "127.0.0.7")


def test_anonymous_rights():
    p = session_permissions(["AnonymousUsers"], ["Tls"])
    assert p.principals == (Principal.Anonymous,)
    assert Right.Submit in p and Right.AcceptAnySender in p and Right.AcceptAuthoritativeDomainSender in p
    assert Right.AcceptAnyRecipient not in p and Right.BypassAntiSpam not in p
    assert Right.BypassMessageSizeLimit not in p


def test_externally_secured_rights_match_exchange():
    p = session_permissions(["ExchangeServers"], ["ExternalAuthoritative"])
    assert p.principals == (Principal.ExternallySecuredServers,)
    expected = {"Submit", "AcceptAnyRecipient", "AcceptAnySender", "AcceptAuthoritativeDomainSender",
                "AcceptAuthenticationFlag", "BypassAntiSpam", "BypassMessageSizeLimit", "AcceptExch50",
                "AcceptRoutingHeaders"}
    assert set(p.rights.names()) == expected      # no organization or forest headers


@pytest.mark.parametrize("groups,mechanisms", [
    (["ExchangeServers"], ["Tls"]),              # servers must prove who they are (AUTH, later)
    (["ExchangeUsers"], ["Tls", "BasicAuth"]),   # users must authenticate
    (["Partners"], ["Tls"]),                     # partners need domain-secure TLS
    ([], ["Tls"]),
])
def test_groups_that_need_proof_give_anonymous_peers_nothing(groups, mechanisms):
    p = session_permissions(groups, mechanisms)
    assert p.rights == Right.NONE and "no rights" in p.explain()


def test_authenticated_principals_add_their_rights():
    p = session_permissions(["AnonymousUsers", "ExchangeUsers"], ["Tls", "BasicAuth"],
                            authenticated_as=[Principal.AuthenticatedUsers])
    assert p.principals == (Principal.AuthenticatedUsers,)
    assert Right.AcceptAnyRecipient in p and Right.BypassAntiSpam in p


ROUTES = """
[[accepted_domains]]
domain_name = "contoso.com"
[[accepted_domains]]
domain_name = "*.fabrikam.com"
domain_type = "InternalRelay"
[[accepted_domains]]
domain_name = "mail.fabrikam.com"
domain_type = "ExternalRelay"

[[send_connectors]]
name = "any"
address_spaces = ["*;10"]
drop_directory = "d/any"
[[send_connectors]]
name = "wild"
address_spaces = ["SMTP:*.contoso.com;5"]
drop_directory = "d/wild"
[[send_connectors]]
name = "exact"
address_spaces = ["contoso.com;50"]
drop_directory = "d/exact"
[[send_connectors]]
name = "cheap wild"
address_spaces = ["*.contoso.com;1"]
drop_directory = "d/cheap"
max_message_size = "1MB"
[[send_connectors]]
name = "off"
address_spaces = ["off.test"]
drop_directory = "d/off"
enabled = false
"""


def router():
    cfg = loads(ROUTES)
    return Router(cfg.accepted_domains, cfg.send_connectors)


def test_accepted_domains_exact_beats_wildcard():
    r = router()
    assert r.accepted_domain("CONTOSO.com").domain_type == "Authoritative"
    assert r.accepted_domain("fabrikam.com").domain_type == "InternalRelay"
    assert r.accepted_domain("a.b.fabrikam.com").domain_type == "InternalRelay"
    assert r.accepted_domain("mail.fabrikam.com").domain_type == "ExternalRelay"
    assert r.accepted_domain("sub.contoso.com") is None
    assert r.is_authoritative("contoso.com") and not r.is_authoritative("fabrikam.com")


def test_most_specific_address_space_then_cost_then_size():
    r = router()
    assert r.next_hop("contoso.com") == NextHop("exact", "")          # exact beats cheaper wildcards
    assert r.next_hop("sub.contoso.com") == NextHop("cheap wild", "")  # same specificity: lowest cost
    assert r.next_hop("sub.contoso.com", size=2 * 1024**2) == NextHop("wild", "")  # too big for cheap wild
    assert r.next_hop("elsewhere.test") == NextHop("any", "")
    assert r.next_hop("off.test") == NextHop("any", "")                 # disabled connectors skipped


def test_no_connector_means_unreachable():
    cfg = loads('[[send_connectors]]\nname = "x"\naddress_spaces = ["contoso.com"]\ndrop_directory = "d"\n')
    r = Router(cfg.accepted_domains, cfg.send_connectors)
    assert r.next_hop("fabrikam.com") is UNREACHABLE
    assert r.group_by_hop([(0, "a@contoso.com"), (1, "b@fabrikam.com"), (2, "c@contoso.com")], 10) == {
        NextHop("x", ""): [0, 2], UNREACHABLE: [1]}
