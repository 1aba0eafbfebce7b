"""
Tests for exedge.config, written from the specification: the contract file,
Exchange defaults, value spellings, errors with file/key/line, cross-key
rules, address spaces and the line locator.
"""

import ipaddress
import os
import textwrap

import attrs
import pytest

from exedge.config import ConfigError, Problem, load, loads
from exedge.config.locate import find_line, index_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRACT = os.path.join(ROOT, "etc", "exedge.toml")

MB = 1024 * 1024
KB = 1024


def dedent(text):
    return textwrap.dedent(text).lstrip("\n")


def receive(extra="", *, name="R", bindings='["127.0.0.1:2525"]',
            ranges='["10.0.0.0/8"]'):
    """A minimal valid [[receive_connectors]] table plus C{extra} lines."""
    text = f'[[receive_connectors]]\nname = "{name}"\n'
    if bindings is not None:
        text += f"bindings = {bindings}\n"
    if ranges is not None:
        text += f"remote_ip_ranges = {ranges}\n"
    return text + dedent(extra)


def send(extra="", *, name="S", spaces='["example.com"]', drop='"var/drop"'):
    text = f'[[send_connectors]]\nname = "{name}"\n'
    if spaces is not None:
        text += f"address_spaces = {spaces}\n"
    if drop is not None:
        text += f"drop_directory = {drop}\n"
    return text + dedent(extra)


def problems_of(text, source="test.toml"):
    with pytest.raises(ConfigError) as info:
        loads(text, source=source)
    assert isinstance(info.value.problems, list)
    assert all(isinstance(p, Problem) for p in info.value.problems)
    return info.value.problems


def only_problem(text, source="test.toml"):
    problems = problems_of(text, source)
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def write(tmp_path, text, name="exedge.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------
# The contract file


@pytest.fixture(scope="module")
def contract():
    return load(CONTRACT)


def test_contract_server(contract):
    assert contract.server.fqdn == "edge01.example.com"
    assert contract.server.spool_directory == "var/spool"
    assert contract.server.dns_servers == ()
    assert contract.warnings == ()
    assert contract.source == CONTRACT


def test_contract_accepted_domain(contract):
    assert len(contract.accepted_domains) == 1
    domain = contract.accepted_domains[0]
    assert domain.domain_name == "example.com"
    assert domain.domain_type == "Authoritative"


def test_contract_from_internet(contract):
    assert len(contract.receive_connectors) == 2
    rc = contract.receive_connectors[0]
    assert rc.name == "From Internet"
    assert rc.usage == "Internet"
    assert [str(b) for b in rc.bindings] == ["127.0.0.1:2525"]
    assert (rc.bindings[0].host, rc.bindings[0].port) == ("127.0.0.1", 2525)
    assert len(rc.remote_ip_ranges) == 1
    rng = rc.remote_ip_ranges[0]
    assert rng.first == ipaddress.ip_address("0.0.0.0")
    assert rng.last == ipaddress.ip_address("255.255.255.255")
    assert rc.fqdn == "edge01.example.com"
    assert rc.auth_mechanisms == ("Tls",)
    assert rc.permission_groups == ("AnonymousUsers",)
    assert rc.max_message_size == 37748736
    assert rc.max_recipients_per_message == 200


def test_contract_from_internal_org(contract):
    rc = contract.receive_connectors[1]
    assert rc.name == "From Internal Org"
    assert rc.usage == "Custom"
    assert [str(b) for b in rc.bindings] == ["127.0.0.1:2525"]
    assert [(str(r.first), str(r.last)) for r in rc.remote_ip_ranges] == [
        ("127.0.0.2", "127.0.0.2"),
        ("127.0.0.3", "127.0.0.3"),
    ]
    assert rc.auth_mechanisms == ("ExternalAuthoritative",)
    assert rc.permission_groups == ("ExchangeServers",)


def test_contract_send_connector(contract):
    assert len(contract.send_connectors) == 1
    sc = contract.send_connectors[0]
    assert sc.name == "Local drop"
    assert sc.drop_directory == "var/drop"
    assert len(sc.address_spaces) == 1
    space = sc.address_spaces[0]
    assert (space.type, space.domain, space.cost) == ("SMTP", "example.com", 1)


def test_contract_is_frozen(contract):
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        contract.server.fqdn = "other.example.com"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        contract.receive_connectors[0].max_message_size = 1


# --------------------------------------------------------------------------
# Exchange Edge defaults


def test_receive_connector_defaults():
    rc = loads(receive(), source="test.toml").receive_connectors[0]
    assert rc.max_header_size == 262144
    assert rc.max_hop_count == 30
    assert rc.connection_timeout == 300
    assert rc.connection_inactivity_timeout == 60
    assert rc.max_inbound_connection == 5000
    assert rc.max_inbound_connection_per_source == 20
    assert rc.max_protocol_errors == 5
    assert rc.tarpit_interval == 5
    assert rc.enabled is True
    assert rc.max_message_size == 36 * MB == 37748736
    assert rc.max_recipients_per_message == 200


def test_empty_config_loads():
    cfg = loads("", source="test.toml")
    assert cfg.accepted_domains == ()
    assert cfg.receive_connectors == ()
    assert cfg.send_connectors == ()
    assert cfg.server.spool_directory == "var/spool"


def test_internet_usage_defaults_to_all_ranges():
    rc = loads(receive('usage = "Internet"\n', ranges=None)).receive_connectors[0]
    assert [(str(r.first), str(r.last)) for r in rc.remote_ip_ranges] == [
        ("0.0.0.0", "255.255.255.255")
    ]
    assert rc.permission_groups == ("AnonymousUsers",)
    assert rc.auth_mechanisms == ("Tls",)


def test_client_usage_defaults_to_all_ranges_and_serves_any_peer():
    """Exchange's Client preset, like Internet's, covers the whole address space."""
    from exedge.receive.connectors import ConnectorTable

    rc = loads(receive('usage = "Client"\n', ranges=None)).receive_connectors[0]
    assert [(str(r.first), str(r.last)) for r in rc.remote_ip_ranges] == [
        ("0.0.0.0", "255.255.255.255")
    ]
    assert rc.permission_groups == ("ExchangeUsers",)
    table = ConnectorTable([rc])
    for peer in ("0.0.0.0", "10.1.2.3", "127.0.0.1", "192.0.2.77", "203.0.113.9", "255.255.255.255",
                 "::ffff:198.51.100.4"):
        assert table.select("127.0.0.1", 2525, peer) is rc, peer


@pytest.mark.parametrize("usage", ["Custom", "Internal", "Partner"])
def test_usages_without_a_range_preset_require_remote_ip_ranges(tmp_path, usage):
    path = write(tmp_path, receive(f'usage = "{usage}"\n', ranges=None))
    with pytest.raises(ConfigError) as info:
        load(path)
    (p,) = info.value.problems
    assert p.key == "receive_connectors[0].remote_ip_ranges"
    assert p.message == f"is required for usage {usage}"
    assert p.line == 1   # the connector's own header line: the key is not there
    assert str(p) == f"{path}:1: receive_connectors[0].remote_ip_ranges: is required for usage {usage}"


# --------------------------------------------------------------------------
# Sizes and timespans


@pytest.mark.parametrize("raw, expected", [
    ('"36MB"', 36 * MB),
    ('"512KB"', 512 * KB),
    ('"35 MB"', 35 * MB),
    ('"36mb"', 36 * MB),
    ("100000", 100000),
    ('"1GB"', 1024 * MB),
])
def test_sizes(raw, expected):
    rc = loads(receive(f"max_message_size = {raw}\n")).receive_connectors[0]
    assert rc.max_message_size == expected


@pytest.mark.parametrize("raw", ['"36 XB"', '"big"', "-1", "true", '"MB"'])
def test_bad_sizes(raw):
    p = only_problem(receive(f"max_message_size = {raw}\n"))
    assert p.key == "receive_connectors[0].max_message_size"
    assert p.line == 5


def test_header_size_spelling():
    rc = loads(receive('max_header_size = "128KB"\n')).receive_connectors[0]
    assert rc.max_header_size == 128 * KB


@pytest.mark.parametrize("raw, seconds", [
    ("45", 45),
    ('"30s"', 30),
    ('"10m"', 600),
    ('"4h"', 4 * 3600),
    ('"2d"', 2 * 86400),
    ('"00:05:00"', 300),
    ('"1.00:00:00"', 86400),
    ('"01:30:15"', 3600 + 30 * 60 + 15),
])
def test_timespans(raw, seconds):
    # connection_timeout is the outer bound, so it can take every value here
    # as long as the inactivity timeout stays shorter.
    rc = loads(receive(f"connection_timeout = {raw}\nconnection_inactivity_timeout = 1\n"))
    assert rc.receive_connectors[0].connection_timeout == seconds


@pytest.mark.parametrize("raw", ['"5x"', '"00:61:00"', '"soon"', "-5", '"00:05"'])
def test_bad_timespans(raw):
    p = only_problem(receive(f"tarpit_interval = {raw}\n"))
    assert p.key == "receive_connectors[0].tarpit_interval"
    assert p.line == 5


# --------------------------------------------------------------------------
# Exchange spellings, case-insensitive and canonicalised


def test_spellings_are_canonicalised():
    text = receive('usage = "internet"\nauth_mechanisms = ["tls", "basicauth", "BASICAUTHREQUIRETLS"]\n'
                   'permission_groups = ["anonymoususers", "exchangeusers"]\n')
    text += '[[accepted_domains]]\ndomain_name = "Example.COM"\ndomain_type = "authoritative"\n'
    text += '[[accepted_domains]]\ndomain_name = "relay.example.net"\ndomain_type = "INTERNALRELAY"\n'
    cfg = loads(text)
    rc = cfg.receive_connectors[0]
    assert rc.usage == "Internet"
    assert rc.auth_mechanisms == ("Tls", "BasicAuth", "BasicAuthRequireTLS")
    assert rc.permission_groups == ("AnonymousUsers", "ExchangeUsers")
    assert cfg.accepted_domains[0].domain_type == "Authoritative"
    assert cfg.accepted_domains[0].domain_name == "example.com"
    assert cfg.accepted_domains[1].domain_type == "InternalRelay"


def test_unknown_spelling_is_an_error():
    p = only_problem(receive('usage = "Intranet"\n'))
    assert p.key == "receive_connectors[0].usage"
    assert p.line == 5
    assert "Intranet" in p.message


def test_unknown_auth_mechanism_is_an_error():
    p = only_problem(receive('auth_mechanisms = ["Tls", "Kerberos"]\n'))
    assert p.key == "receive_connectors[0].auth_mechanisms"


# --------------------------------------------------------------------------
# remote_ip_ranges


@pytest.mark.parametrize("raw, first, last", [
    ("192.0.2.7", "192.0.2.7", "192.0.2.7"),
    ("192.0.2.10-192.0.2.20", "192.0.2.10", "192.0.2.20"),
    ("192.0.2.0/24", "192.0.2.0", "192.0.2.255"),
    ("::1", "::1", "::1"),
    ("2001:db8::/32", "2001:db8::", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"),
    ("2001:db8::1-2001:db8::ff", "2001:db8::1", "2001:db8::ff"),
])
def test_remote_ip_ranges(raw, first, last):
    rc = loads(receive(ranges=f'["{raw}"]')).receive_connectors[0]
    (rng,) = rc.remote_ip_ranges
    assert rng.first == ipaddress.ip_address(first)
    assert rng.last == ipaddress.ip_address(last)
    assert ipaddress.ip_address(first) in rng
    assert ipaddress.ip_address(last) in rng


def test_ip_range_membership():
    rc = loads(receive(ranges='["10.1.0.0/16", "::1"]')).receive_connectors[0]
    v4, v6 = rc.remote_ip_ranges
    assert ipaddress.ip_address("10.1.200.3") in v4
    assert ipaddress.ip_address("10.2.0.1") not in v4
    assert ipaddress.ip_address("::1") in v6
    assert ipaddress.ip_address("::2") not in v6
    assert ipaddress.ip_address("0.0.0.1") not in v6


@pytest.mark.parametrize("raw", ["300.1.1.1", "10.0.0.9-10.0.0.1", "10.0.0.1-::1", "nowhere", "10.0.0.0/33"])
def test_bad_remote_ip_ranges(raw):
    p = only_problem(receive(ranges=f'["{raw}"]'))
    assert p.key == "receive_connectors[0].remote_ip_ranges"
    assert p.line == 4


# --------------------------------------------------------------------------
# Errors: file, key and line


def test_bad_size_names_file_key_and_line(tmp_path):
    text = dedent("""
        [server]
        fqdn = "edge.example.com"

        [[receive_connectors]]
        name = "A"
        bindings = ["127.0.0.1:2525"]
        remote_ip_ranges = ["10.0.0.0/8"]
        max_message_size = "lots"
    """)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    (p,) = info.value.problems
    assert f"{path}:8:" in str(p)
    assert "receive_connectors[0].max_message_size" in str(p)
    assert p.line == 8
    assert p.source == path
    assert p.key == "receive_connectors[0].max_message_size"
    assert str(p) in str(info.value)


def test_error_in_second_connector_gets_its_own_line(tmp_path):
    text = receive(name="A") + "\n" + receive('max_hop_count = 0\n', name="B",
                                              bindings='["127.0.0.1:2526"]')
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    (p,) = info.value.problems
    assert p.key == "receive_connectors[1].max_hop_count"
    assert p.line == 10
    assert str(p).startswith(f"{path}:10: receive_connectors[1].max_hop_count")


def test_unknown_key_is_an_error_with_line():
    text = dedent("""
        [server]
        fqdn = "edge.example.com"
        spool_dir = "var/spool"
    """)
    p = only_problem(text)
    assert p.key == "server.spool_dir"
    assert p.line == 3
    assert str(p).startswith("test.toml:3: server.spool_dir")


def test_unknown_key_in_connector():
    p = only_problem(receive('max_msg_size = "10MB"\n'))
    assert p.key == "receive_connectors[0].max_msg_size"
    assert p.line == 5


def test_unknown_section_is_an_error():
    text = dedent("""
        [server]
        fqdn = "edge.example.com"

        [transport]
        x = 1
    """)
    p = only_problem(text)
    assert p.key == "transport"
    assert p.line == 4
    assert "transport" in str(p)


def test_unknown_array_section_is_an_error():
    p = only_problem(receive() + '[[send_connector]]\nname = "typo"\n')
    assert p.key == "send_connector"
    assert p.line == 5


def test_all_problems_reported_at_once(tmp_path):
    text = dedent("""
        [server]
        fqdn = "edge.example.com"
        bogus = 1

        [[receive_connectors]]
        name = "A"
        bindings = ["127.0.0.1:99999"]
        remote_ip_ranges = ["10.0.0.0/8"]
        max_message_size = "huge"

        [[send_connectors]]
        name = "S"
        address_spaces = ["example.com;0"]
        drop_directory = "var/drop"
    """)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    got = sorted((p.line, p.key) for p in info.value.problems)
    assert got == [
        (3, "server.bogus"),
        (7, "receive_connectors[0].bindings"),
        (9, "receive_connectors[0].max_message_size"),
        (13, "send_connectors[0].address_spaces"),
    ]
    for p in info.value.problems:
        assert str(p).startswith(f"{path}:{p.line}: {p.key}: ")


def test_toml_syntax_error_reports_line(tmp_path):
    text = '[server]\nfqdn = "edge.example.com"\nspool_directory = = "x"\n'
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    (p,) = info.value.problems
    assert p.line == 3
    assert str(p).startswith(f"{path}:3:")


def test_toml_syntax_error_unterminated_string():
    p = only_problem('[server]\n\nfqdn = "edge.example.com\n')
    assert p.line == 3


def test_missing_bindings_is_an_error():
    p = only_problem(receive(bindings=None))
    assert p.key == "receive_connectors[0].bindings"
    assert "required" in p.message
    assert p.line == 1  # the connector's own header line


def test_missing_address_spaces_is_an_error():
    p = only_problem(send(spaces=None))
    assert p.key == "send_connectors[0].address_spaces"
    assert "required" in p.message


def test_missing_remote_ranges_for_custom_usage_is_an_error():
    p = only_problem(receive(ranges=None))
    assert p.key == "receive_connectors[0].remote_ip_ranges"


def test_missing_file(tmp_path):
    path = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError) as info:
        load(path)
    (p,) = info.value.problems
    assert path in str(p)


def test_section_written_as_table_instead_of_array():
    p = only_problem('[receive_connectors]\nname = "x"\n')
    assert p.key == "receive_connectors"
    assert p.line == 1


# --------------------------------------------------------------------------
# Cross-key rules


def test_auth_none_cannot_be_combined():
    p = only_problem(receive('auth_mechanisms = ["None", "Tls"]\n'))
    assert p.key == "receive_connectors[0].auth_mechanisms"
    assert p.line == 5


def test_auth_none_alone_is_fine():
    rc = loads(receive('auth_mechanisms = ["None"]\n')).receive_connectors[0]
    assert rc.auth_mechanisms == ("None",)


@pytest.mark.parametrize("mechs", [
    '["BasicAuthRequireTLS"]',
    '["BasicAuthRequireTLS", "Tls"]',
    '["BasicAuthRequireTLS", "BasicAuth"]',
])
def test_basic_auth_require_tls_needs_basic_auth_and_tls(mechs):
    p = only_problem(receive(f"auth_mechanisms = {mechs}\n"))
    assert p.key == "receive_connectors[0].auth_mechanisms"


def test_basic_auth_require_tls_complete_is_fine():
    rc = loads(receive('auth_mechanisms = ["Tls", "BasicAuth", "BasicAuthRequireTLS"]\n'))
    assert rc.receive_connectors[0].auth_mechanisms == ("Tls", "BasicAuth", "BasicAuthRequireTLS")


def test_external_authoritative_requires_exchange_servers():
    p = only_problem(receive('auth_mechanisms = ["ExternalAuthoritative"]\n'
                             'permission_groups = ["AnonymousUsers"]\n'))
    assert p.key == "receive_connectors[0].permission_groups"
    assert p.line == 6


def test_external_authoritative_with_exchange_servers_is_fine():
    cfg = loads(receive('auth_mechanisms = ["ExternalAuthoritative"]\n'
                        'permission_groups = ["ExchangeServers"]\n', ranges='["10.9.8.7"]'))
    assert cfg.warnings == ()


def test_duplicate_receive_connector_names(tmp_path):
    text = receive(name="Same") + receive(name="Same", bindings='["127.0.0.1:2600"]')
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    (p,) = info.value.problems
    assert p.key == "receive_connectors[1].name"
    assert p.line == 6
    assert "Same" in p.message


def test_duplicate_send_connector_names():
    p = only_problem(send(name="Out") + send(name="Out", spaces='["*"]', drop='"var/drop2"'))
    assert p.key == "send_connectors[1].name"


def test_distinct_names_are_fine():
    cfg = loads(receive(name="A") + receive(name="B", bindings='["127.0.0.1:2600"]'))
    assert [rc.name for rc in cfg.receive_connectors] == ["A", "B"]


def test_same_binding_and_same_range_is_an_error():
    text = receive(name="A") + receive(name="B")
    p = only_problem(text)
    assert p.key == "receive_connectors[1].remote_ip_ranges"
    assert p.line == 8


def test_same_range_written_differently_is_still_the_same():
    text = receive(name="A", ranges='["10.0.0.0/8"]') + receive(
        name="B", ranges='["10.0.0.0-10.255.255.255"]')
    p = only_problem(text)
    assert p.key == "receive_connectors[1].remote_ip_ranges"


def test_same_binding_different_ranges_is_fine():
    cfg = loads(receive(name="A", ranges='["10.0.0.0/8"]') +
                receive(name="B", ranges='["10.0.0.5"]'))
    assert len(cfg.receive_connectors) == 2


def test_same_range_different_binding_is_fine():
    cfg = loads(receive(name="A") + receive(name="B", bindings='["127.0.0.1:2600"]'))
    assert len(cfg.receive_connectors) == 2


@pytest.mark.parametrize("inactivity, total", [('"10m"', '"5m"'), ('"5m"', '"5m"'), ("600", '"00:05:00"')])
def test_inactivity_timeout_must_be_shorter(inactivity, total):
    p = only_problem(receive(f"connection_inactivity_timeout = {inactivity}\n"
                             f"connection_timeout = {total}\n"))
    assert p.key == "receive_connectors[0].connection_inactivity_timeout"
    assert p.line == 5


def test_inactivity_default_vs_short_connection_timeout():
    # connection_timeout 30s with the default 1 min inactivity timeout
    p = only_problem(receive('connection_timeout = "30s"\n'))
    assert p.key == "receive_connectors[0].connection_inactivity_timeout"


def test_several_cross_key_problems_reported_together():
    text = receive('auth_mechanisms = ["None", "Tls"]\n', name="X") + receive(
        'connection_inactivity_timeout = "1h"\n', name="X", bindings='["127.0.0.1:2600"]')
    keys = sorted(p.key for p in problems_of(text))
    assert keys == [
        "receive_connectors[0].auth_mechanisms",
        "receive_connectors[1].connection_inactivity_timeout",
        "receive_connectors[1].name",
    ]


def test_per_key_and_cross_key_problems_reported_together():
    text = (receive('max_message_size = "huge"\n', name="A")
            + receive(name="Dup", bindings='["127.0.0.1:2600"]')
            + receive(name="Dup", bindings='["127.0.0.1:2700"]'))
    keys = sorted(p.key for p in problems_of(text))
    assert keys == [
        "receive_connectors[0].max_message_size",
        "receive_connectors[2].name",
    ]


@pytest.mark.parametrize("wide", ["0.0.0.0-255.255.255.255", "0.0.0.0/0", "::/0"])
def test_open_relay_is_a_warning_not_an_error(tmp_path, wide):
    text = receive('auth_mechanisms = ["ExternalAuthoritative"]\n'
                   'permission_groups = ["ExchangeServers"]\n',
                   ranges=f'["{wide}"]')
    path = write(tmp_path, text)
    cfg = load(path)
    (w,) = cfg.warnings
    assert w.key == "receive_connectors[0].remote_ip_ranges"
    assert w.line == 4
    assert str(w).startswith(f"{path}:4: receive_connectors[0].remote_ip_ranges")
    assert "relay" in w.message.lower()
    assert cfg.receive_connectors[0].auth_mechanisms == ("ExternalAuthoritative",)


def test_wide_range_without_external_authoritative_is_not_a_warning():
    cfg = loads(receive(ranges='["0.0.0.0-255.255.255.255"]'))
    assert cfg.warnings == ()


# --------------------------------------------------------------------------
# Address spaces


@pytest.mark.parametrize("raw, kind, domain, cost", [
    ("SMTP:*.contoso.com;5", "SMTP", "*.contoso.com", 5),
    ("smtp:contoso.com;7", "SMTP", "contoso.com", 7),
    ("contoso.com;1", "SMTP", "contoso.com", 1),
    ("*", "SMTP", "*", 1),
    ("*;100", "SMTP", "*", 100),
    ("contoso.com", "SMTP", "contoso.com", 1),
    ("Contoso.COM", "SMTP", "contoso.com", 1),
])
def test_address_spaces(raw, kind, domain, cost):
    sc = loads(send(spaces=f'["{raw}"]')).send_connectors[0]
    (space,) = sc.address_spaces
    assert (space.type, space.domain, space.cost) == (kind, domain, cost)


@pytest.mark.parametrize("raw", ["contoso.com;0", "contoso.com;101", "SMTP:*.contoso.com;-1",
                                 "contoso.com;cheap", "X400:c=US;1", "not a domain"])
def test_bad_address_spaces(raw):
    p = only_problem(send(spaces=f'["{raw}"]'))
    assert p.key == "send_connectors[0].address_spaces"
    assert p.line == 3


def test_send_connector_without_drop_directory_or_smart_hosts_routes_by_dns():
    conn = loads(send(drop=None)).send_connectors[0]
    assert conn.drop_directory is None and conn.smart_hosts == () and conn.dns_routing_enabled is None
    p = only_problem(send(drop=None) + "dns_routing_enabled = false\n")
    assert p.key == "send_connectors[0].smart_hosts" and "needs smart_hosts" in p.message


def test_smart_hosts_parse_and_exclude_drop_directory_and_dns_routing():
    cfg = loads(send(drop=None) + 'smart_hosts = ["mbx01.example.com", "127.0.0.1:2627", "[::1]:26", "192.0.2.1"]\n'
                'dns_routing_enabled = false\nport = 587\n')
    conn = cfg.send_connectors[0]
    assert conn.smart_hosts == (("mbx01.example.com", 0), ("127.0.0.1", 2627), ("::1", 26), ("192.0.2.1", 0))
    assert (conn.port, conn.smtp_max_messages_per_connection, conn.connection_inactivity_timeout) == (587, 20, 600.0)
    assert only_problem(send() + 'smart_hosts = ["a.test"]\n').key == "send_connectors[0].smart_hosts"
    assert only_problem(send(drop=None) + 'smart_hosts = ["a.test"]\ndns_routing_enabled = true\n').key == \
        "send_connectors[0].dns_routing_enabled"
    assert only_problem(send(drop=None) + 'smart_hosts = ["bad host"]\n').key == "send_connectors[0].smart_hosts"


# --------------------------------------------------------------------------
# locate.index_lines


def test_index_lines_simple_tables():
    text = dedent("""
        # comment
        [server]
        fqdn = "x"

        [[accepted_domains]]
        domain_name = "a.example"
        [[accepted_domains]]
        domain_name = "b.example"
        [[receive_connectors]]
        name = "R"
    """)
    idx = index_lines(text)
    assert idx[("server",)] == 2
    assert idx[("server", "fqdn")] == 3
    assert idx[("accepted_domains", 0)] == 5
    assert idx[("accepted_domains", 0, "domain_name")] == 6
    assert idx[("accepted_domains", 1)] == 7
    assert idx[("accepted_domains", 1, "domain_name")] == 8
    # counted per array: receive_connectors starts again at 0
    assert idx[("receive_connectors", 0)] == 9
    assert idx[("receive_connectors", 0, "name")] == 10
    assert ("receive_connectors", 1) not in idx


def test_index_lines_multiline_array():
    text = dedent("""
        [[receive_connectors]]
        name = "A"
        remote_ip_ranges = [
            "10.0.0.0/8",   # office [old]
            "192.0.2.1",
            # name = "not a key"
        ]
        max_message_size = "10MB"
        [[receive_connectors]]
        bindings = [
          "127.0.0.1:25",
          "127.0.0.1:587" ]
        name = "B"
    """)
    idx = index_lines(text)
    assert idx[("receive_connectors", 0, "remote_ip_ranges")] == 3
    assert idx[("receive_connectors", 0, "max_message_size")] == 8
    assert ("receive_connectors", 0, "name") in idx and idx[("receive_connectors", 0, "name")] == 2
    assert idx[("receive_connectors", 1)] == 9
    assert idx[("receive_connectors", 1, "bindings")] == 10
    assert idx[("receive_connectors", 1, "name")] == 13


def test_index_lines_strings_with_brackets_and_hashes():
    text = dedent("""
        [[receive_connectors]]
        banner = "220 [edge] # not a comment ["
        comment = 'literal [ with ] # and ['
        name = "x\\"[y"
        bindings = ["127.0.0.1:25"] # trailing [ comment
        max_hop_count = 10
        [server]
        fqdn = "x"
    """)
    idx = index_lines(text)
    assert idx[("receive_connectors", 0, "banner")] == 2
    assert idx[("receive_connectors", 0, "comment")] == 3
    assert idx[("receive_connectors", 0, "name")] == 4
    assert idx[("receive_connectors", 0, "bindings")] == 5
    assert idx[("receive_connectors", 0, "max_hop_count")] == 6
    assert idx[("server",)] == 7
    assert idx[("server", "fqdn")] == 8


def test_index_lines_multiline_strings():
    text = dedent('''
        [[receive_connectors]]
        banner = """
        [not_a_table]
        name = "not a key" ]
        """
        comment = \'\'\'
        [[also_not]]
        \'\'\'
        name = "real"
    ''')
    idx = index_lines(text)
    assert idx[("receive_connectors", 0, "banner")] == 2
    assert idx[("receive_connectors", 0, "comment")] == 6
    assert idx[("receive_connectors", 0, "name")] == 9
    assert ("not_a_table",) not in idx
    assert ("also_not", 0) not in idx


def test_index_lines_inline_tables():
    text = dedent("""
        [server]
        fqdn = "x"
        extra = { a = "[", b = [1, 2], c = { d = "]" } }
        spool_directory = "var/spool"
        [[send_connectors]]
        name = "S"
    """)
    idx = index_lines(text)
    assert idx[("server", "extra")] == 3
    assert idx[("server", "spool_directory")] == 4
    assert idx[("send_connectors", 0, "name")] == 6
    # a key inside an inline table is placed at the inline table's line
    assert find_line(idx, ("server", "extra", "a")) == 3


def test_index_lines_dotted_and_quoted_keys_and_spaced_headers():
    text = dedent("""
        server.fqdn = "x"
        "server".spool_directory = "y"
        [[ receive_connectors ]]   # first
        "name" = "A"
        [[receive_connectors]]
        name = "B"
    """)
    idx = index_lines(text)
    assert idx[("server", "fqdn")] == 1
    assert idx[("server", "spool_directory")] == 2
    assert idx[("receive_connectors", 0)] == 3
    assert idx[("receive_connectors", 0, "name")] == 4
    assert idx[("receive_connectors", 1, "name")] == 6


def test_index_lines_subtable_of_array_element():
    text = dedent("""
        [[receive_connectors]]
        name = "A"
        [[receive_connectors]]
        name = "B"
        [receive_connectors.extra]
        key = 1
    """)
    idx = index_lines(text)
    assert idx[("receive_connectors", 1, "extra")] == 5
    assert idx[("receive_connectors", 1, "extra", "key")] == 6


def test_find_line_falls_back_to_ancestor():
    idx = {("receive_connectors", 0): 4, ("receive_connectors", 0, "name"): 5}
    assert find_line(idx, ("receive_connectors", 0, "name")) == 5
    assert find_line(idx, ("receive_connectors", 0, "bindings")) == 4
    assert find_line(idx, ("send_connectors", 0, "name")) is None


def test_error_line_after_multiline_array_in_file(tmp_path):
    text = dedent("""
        [[receive_connectors]]
        name = "A"
        bindings = [
            "127.0.0.1:2525",   # [main]
            "127.0.0.1:2526",
        ]
        remote_ip_ranges = [
            "10.0.0.0/8",
            "2001:db8::/32",
        ]
        banner = "220 edge [ready] # go"
        max_recipients_per_message = 0
    """)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    (p,) = info.value.problems
    assert p.key == "receive_connectors[0].max_recipients_per_message"
    assert p.line == 12
    assert str(p).startswith(f"{path}:12: ")


def test_two_send_connectors_cannot_share_a_drop_directory():
    text = (
        '[[send_connectors]]\nname = "a"\naddress_spaces = ["a.test"]\ndrop_directory = "var/drop"\n'
        '[[send_connectors]]\nname = "b"\naddress_spaces = ["b.test"]\ndrop_directory = "var/./drop/"\n'
    )
    with pytest.raises(ConfigError) as e:
        loads(text, source="t.toml")
    [p] = e.value.problems
    assert p.line == 8 and p.key == "send_connectors[1].drop_directory"
    assert "already the drop directory of send_connectors[0]" in p.message


@pytest.mark.parametrize("line,key", [
    ('max_message_size = "' + "9" * 400 + 'MB"', "max_message_size"),
    ("connection_inactivity_timeout = nan", "connection_inactivity_timeout"),
    ("connection_timeout = inf", "connection_timeout"),
    ("tarpit_interval = inf", "tarpit_interval"),
    ('tarpit_interval = "11m"', "tarpit_interval"),
    ("max_hop_count = 1e3", "max_hop_count"),
])
def test_absurd_values_are_problems_not_tracebacks(line, key):
    text = ('[[receive_connectors]]\nname = "x"\nbindings = ["127.0.0.1:25"]\n'
            f'remote_ip_ranges = ["127.0.0.1"]\n{line}\n')
    with pytest.raises(ConfigError) as e:
        loads(text, source="t.toml")
    assert [p.key for p in e.value.problems] == [f"receive_connectors[0].{key}"]
    assert e.value.problems[0].line == 5


def test_queue_table_has_exchange_edge_defaults_and_accepts_overrides():
    cfg = loads("")
    q = cfg.queue
    assert (q.queue_glitch_retry_count, q.queue_glitch_retry_interval) == (4, 60.0)
    assert q.outbound_connection_failure_retry_interval == 1800.0 and q.message_retry_interval == 900.0
    assert q.message_expiration_timeout == 2 * 86400.0
    cfg = loads('[queue]\nmessage_expiration_timeout = "5d"\nqueue_glitch_retry_count = 0\n')
    assert cfg.queue.message_expiration_timeout == 5 * 86400.0 and cfg.queue.queue_glitch_retry_count == 0
    with pytest.raises(ConfigError) as e:
        loads('[queue]\nmessage_expiration = "5d"\n', source="t.toml")
    assert e.value.problems[0].key == "queue.message_expiration" and e.value.problems[0].line == 2


def test_send_connector_tls_and_auth_rules_name_the_key():
    import pytest as _pytest
    from exedge.config import ConfigError, loads as _loads
    base = '''[[send_connectors]]
name = "x"
address_spaces = ["*"]
smart_hosts = ["mbx01.example.com"]
dns_routing_enabled = false
'''

    def problems(extra):
        with _pytest.raises(ConfigError) as e:
            _loads(base + extra)
        return "\n".join(str(p) for p in e.value.problems)

    assert "<config>:6: send_connectors[0].tls_auth_level: needs require_tls = true" in problems(
        'tls_auth_level = "DomainValidation"\n')
    assert "<config>:6: send_connectors[0].smart_host_auth_mechanism: " \
           "BasicAuthRequireTLS needs authentication_credential = { username" in problems('smart_host_auth_mechanism = "BasicAuthRequireTLS"\n')
    inline = problems('smart_host_auth_mechanism = "BasicAuth"\n'
                      'authentication_credential = { username = "u", password = "inline" }\n')
    assert "<config>:7: send_connectors[0].authentication_credential: expected { username" in inline
    assert "no inline password" in inline


def test_the_config_room_imports_no_other_room_of_exedge():
    """The config room is the lowest floor: everyone reads its models, it reads nobody."""
    import ast
    import pathlib

    import exedge.config
    room = pathlib.Path(exedge.config.__file__).parent
    for path in room.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert not name.startswith("exedge.") or name.startswith("exedge.config"), (path.name, name)


def test_importing_and_loading_the_config_asks_no_resolver_unless_fqdn_is_left_out():
    """
    ServerConfig.fqdn defaults to this host's FQDN, looked up when a
    configuration without one is loaded, never when the module is imported
    (every process that imports exedge would otherwise ask DNS).
    """
    import subprocess
    import sys
    script = """
import socket
asked = []
socket.getfqdn = lambda *a: asked.append(a) or "looked.up.example"
from exedge.config import loads
from harness import config_text
assert asked == [], "imported: " + repr(asked)
config = loads(config_text(2525))
assert asked == [] and config.server.fqdn == "edge01.example.com", asked
config = loads(config_text(2525).replace('fqdn = "edge01.example.com"', '', 1))
assert len(asked) == 1 and config.server.fqdn == "looked.up.example", asked
"""
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=here, timeout=60)
    assert r.returncode == 0, r.stderr
