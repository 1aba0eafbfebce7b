"""
The configuration cmdlets through the real console script: every cmdlet
line of the seed documents (../shared/seeds), taken from the documents
themselves, run with `exedge ps` against a copy of etc/exedge.toml, and the
result loaded by `exedge check-config`; refused changes leave the file
byte for byte; the output formats.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXEDGE = os.path.join(os.path.dirname(sys.executable), "exedge")
SEEDS = os.path.join(ROOT, "..", "shared", "seeds")
PASSWORD = "s3cret pa$$word 'x'"

needs_seeds = pytest.mark.skipif(not os.path.isdir(SEEDS), reason="the seed documents are not beside the checkout")


def exedge(*args, cwd, stdin: str = ""):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([EXEDGE, *args], cwd=cwd, input=stdin, capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "etc" / "exedge.toml"
    path.parent.mkdir()
    shutil.copy(os.path.join(ROOT, "etc", "exedge.toml"), path)
    return path


def ps(config, *lines, stdin="", json_out=False):
    return exedge("ps", "--config", str(config), *(("--json",) if json_out else ()), *lines,
                  cwd=config.parent.parent, stdin=stdin)


def loaded(config) -> dict:
    with open(config, "rb") as f:
        return tomllib.load(f)


def named(cfg: dict, section: str, name: str) -> dict:
    hits = [t for t in cfg.get(section, []) if t.get("name") == name]
    assert len(hits) == 1, (section, name, cfg.get(section))
    return hits[0]


def comments(text: str) -> list[str]:
    return [line[line.index("#"):] for line in text.splitlines() if "#" in line]


# -- the seed documents' lines --------------------------------------------------------

CMDLET_LINE = re.compile(r"^\s*((?:New|Set|Get|Remove)-[A-Za-z]+\b.*|\$\w+\s*=\s*Get-Credential\s*)$")


def seed_lines(name: str) -> list[tuple[int, str]]:
    """(line number, text) of each cmdlet line of a seed document, in the document's order."""
    with open(os.path.join(SEEDS, name), encoding="utf-8") as f:
        return [(n, m.group(1).strip()) for n, text in enumerate(f, 1) if (m := CMDLET_LINE.match(text.rstrip()))]


def heading_line(name: str, heading: str) -> int:
    with open(os.path.join(SEEDS, name), encoding="utf-8") as f:
        return next(n for n, text in enumerate(f, 1) if text.strip() == heading)


EDGE_DOC = "exchange2013-edge-without-edgesync.txt"
SMART_DOC = "exchange-smart-host-send-connector.txt"

# The syntax line's placeholders, filled as the document's own example fills
# them (its name and smart host); the optional -SourceTransportServer part
# with the document's Mailbox servers, so that its handling is seen too.
FILL = {
    "<Name>": '"Smart host to Internet"',
    "<SmartHost1>[,<SmartHost2>...]": "192.168.3.2",
    "[-SourceTransportServer <fqdn1>,<fqdn2>...]": "-SourceTransportServer mbxserver01.contoso.com,mbxserver02.contoso.com",
}


# The scenarios as extracted below, kept in the repository so that CI runs
# them where the seed documents are not beside the checkout;
# test_the_kept_lines_are_the_documents_lines keeps the copy true.
KEPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seed_cmdlets.json")


def kept_scenarios() -> dict[str, list[str]]:
    with open(KEPT, encoding="utf-8") as f:
        return json.load(f)


def scenarios() -> dict[str, list[str]]:
    """Each procedure's lines in the document's order (a procedure runs on its own server: its own config)."""
    edge = seed_lines(EDGE_DOC)
    mailbox_from = heading_line(EDGE_DOC, "Mailbox server procedures")
    smart = seed_lines(SMART_DOC)
    syntax = [text for _, text in smart if "<" in text]
    assert len(syntax) == 1, syntax
    filled = syntax[0]
    for placeholder, value in FILL.items():
        filled = filled.replace(placeholder, value)
    return {
        "edge": [text for n, text in edge if n < mailbox_from],
        "mailbox": [text for n, text in edge if n > mailbox_from],
        "smart-host-syntax": [filled],
        "smart-host-example": [text for _, text in smart if "<" not in text],
    }


# What the Edge server's default receive connector is called before step 3
# renames it (the document's starting point): made from our default file by
# the cmdlets themselves.
EDGE_SETUP = ['Remove-ReceiveConnector "From Internal Org"',
              'Set-ReceiveConnector "From Internet" -Name "Default internal Receive connector Edge01"']


@needs_seeds
def test_every_seed_cmdlet_line_is_in_a_scenario():
    every = []
    for name in sorted(os.listdir(SEEDS)):
        if name.endswith(".txt"):
            every += [text for _, text in seed_lines(name)]
    covered = [line for lines in scenarios().values() for line in lines]
    syntax = [line for line in every if "<" in line]
    assert sorted(covered) == sorted([line for line in every if "<" not in line] +
                                     [scenarios()["smart-host-syntax"][0]] * len(syntax))
    assert len(every) == 12 and "<" not in scenarios()["smart-host-syntax"][0]


@needs_seeds
def test_the_kept_lines_are_the_documents_lines():
    assert kept_scenarios() == scenarios()


def _run_scenario(config, lines):
    """The lines as one script (arguments), the credential on standard input for each Get-Credential."""
    stdin = "".join(f"mailuser@contoso.com\n{PASSWORD}\n" for line in lines if "Get-Credential" in line)
    result = ps(config, *lines, stdin=stdin)
    assert result.returncode == 0, result.stdout + result.stderr
    check = exedge("check-config", str(config), cwd=config.parent.parent)
    assert check.returncode == 0, check.stdout + check.stderr
    return result


def _password_file(config, connector: dict) -> str:
    ref = connector["authentication_credential"]
    assert ref["username"] == "mailuser@contoso.com"
    path = ref["password_file"]
    full = os.path.join(config.parent.parent, path)
    assert os.path.dirname(os.path.abspath(full)) == str(config.parent / "secrets")
    assert stat.S_IMODE(os.stat(full).st_mode) == 0o600
    with open(full, encoding="utf-8") as f:
        assert f.read() == PASSWORD + "\n"
    return path


def test_edge_server_procedure(config):
    original = config.read_text()
    setup = ps(config, *EDGE_SETUP)
    assert setup.returncode == 0, setup.stderr
    result = _run_scenario(config, kept_scenarios()["edge"])
    text = config.read_text()
    cfg = loaded(config)

    internet = named(cfg, "send_connectors", "To Internet")
    assert internet == {"name": "To Internet", "address_spaces": ["*"], "usage": "Internet",
                        "dns_routing_enabled": True}
    org = named(cfg, "send_connectors", "To Internal Org")
    assert org["usage"] == "Internal" and org["address_spaces"] == ["*.contoso.com"]
    assert org["dns_routing_enabled"] is False
    assert org["smart_hosts"] == ["mbxserver01.contoso.com", "mbxserver02.contoso.com"]
    assert org["smart_host_auth_mechanism"] == "BasicAuthRequireTLS"
    _password_file(config, org)
    assert PASSWORD not in text and "s3cret" not in text

    renamed = named(cfg, "receive_connectors", "From Internet")
    assert renamed["bindings"] == ["10.1.1.1:25"] and renamed["usage"] == "Internet"
    internal = named(cfg, "receive_connectors", "From Internal Org")
    assert internal["usage"] == "Internal" and internal["bindings"] == ["10.1.1.2:25"]
    assert internal["remote_ip_ranges"] == ["192.168.5.10", "192.168.5.20"]
    assert internal["auth_mechanisms"] == ["Tls", "BasicAuth", "BasicAuthRequireTLS"]   # exedge's spelling
    assert "warning: -AuthMechanism ExchangeServer left out" in result.stderr
    assert "Kerberos" in result.stderr

    # every comment of the file is still there, but the removed connector's
    kept = [c for c in comments(original) if c != "# same binding: chosen by the peer's address"]
    assert comments(text) == kept

    # the verification lines print what Exchange prints
    assert ("Name                   : To Internal Org\n"
            "Usage                  : Internal\n"
            "AddressSpaces          : {SMTP:*.contoso.com;1}\n"
            "SourceTransportServers : {edge01.example.com}\n"
            "DNSRoutingEnabled      : False\n"
            "SmartHosts             : {mbxserver01.contoso.com, mbxserver02.contoso.com}\n"
            "SmartHostAuthMechanism : BasicAuthRequireTLS\n") in result.stdout
    assert "DNSRoutingEnabled      : True\n" in result.stdout           # To Internet
    assert ("Name           : From Internal Org\n"
            "Usage          : Internal\n"
            "AuthMechanism  : {Tls, BasicAuth, BasicAuthRequireTLS}\n"
            "Bindings       : {10.1.1.2:25}\n"
            "RemoteIPRanges : {192.168.5.10, 192.168.5.20}\n") in result.stdout


def test_mailbox_server_procedure_as_a_script_on_stdin(config):
    """The same lines as a script on standard input: Get-Credential reads the two lines after its own."""
    lines = kept_scenarios()["mailbox"]
    script = "# the Mailbox server's send connector\n\n"
    for line in lines:
        script += line + "\n"
        if "Get-Credential" in line:
            script += f"mailuser@contoso.com\n{PASSWORD}\n"
    result = ps(config, stdin=script)
    assert result.returncode == 0, result.stderr
    assert exedge("check-config", str(config), cwd=config.parent.parent).returncode == 0
    edge = named(loaded(config), "send_connectors", "To Edge")
    assert edge["address_spaces"] == ["*"] and edge["smart_hosts"] == ["edge01.contoso.com"]
    assert edge["usage"] == "Internal" and edge["dns_routing_enabled"] is False
    assert "source_transport_servers" not in edge
    _password_file(config, edge)
    assert "warning: -SourceTransportServers left out: exedge is a single server" in result.stderr
    assert "SourceTransportServers : {edge01.example.com}" in result.stdout
    assert PASSWORD not in result.stdout + result.stderr + config.read_text()


@pytest.mark.parametrize("scenario", ["smart-host-syntax", "smart-host-example"])
def test_smart_host_procedure(config, scenario):
    original = config.read_text()
    result = _run_scenario(config, kept_scenarios()[scenario])
    connector = named(loaded(config), "send_connectors", "Smart host to Internet")
    assert connector == {"name": "Smart host to Internet", "address_spaces": ["*"], "usage": "Custom",
                         "dns_routing_enabled": False, "smart_hosts": ["192.168.3.2"],
                         **({"smart_host_auth_mechanism": "None"} if scenario.endswith("example") else {})}
    assert comments(config.read_text()) == comments(original)
    assert config.read_text().startswith(original)     # appended; nothing else touched
    assert ("-SourceTransportServers left out" in result.stderr) == scenario.endswith("syntax")


# -- refusals: the file stays byte for byte -----------------------------------------

@pytest.mark.parametrize("line, expected", [
    ('Set-ReceiveConnector "From Internet" -Bindings notaport', "receive_connectors[0].bindings: invalid binding 'notaport'"),
    ('New-SendConnector -Name "local drop" -AddressSpaces a.example', "send_connectors[1].name: duplicate connector name"),
    ('New-SendConnector -Name X -AddressSpaces "bad domain!"', "send_connectors[1].address_spaces: invalid address space"),
    ('New-SendConnector -Name X -AddressSpaces * -DNSRoutingEnabled $false', "dns_routing_enabled = false needs smart_hosts"),
    ('Set-SendConnector "Local drop" -MaxMessageSize lots', "send_connectors[0].max_message_size"),
    ('Set-ReceiveConnector "From Internet" -AuthMechanism ExternalAuthoritative', "requires the ExchangeServers permission group"),
])
def test_a_change_that_would_not_load_is_refused(config, line, expected):
    before = config.read_bytes()
    result = ps(config, line)
    assert result.returncode == 1
    assert expected in result.stderr, result.stderr
    assert "the change was refused" in result.stderr and "Traceback" not in result.stderr
    assert config.read_bytes() == before
    assert sorted(os.listdir(config.parent)) == ["exedge.toml"]        # no temporary file left


def test_a_refused_credential_change_takes_its_password_file_back(config):
    before = config.read_bytes()
    result = ps(config, "$c = Get-Credential",
                "New-SendConnector -Name Relay -AddressSpaces * -DNSRoutingEnabled $false -SmartHosts mx.example.net "
                "-SmartHostAuthMechanism BasicAuth -IgnoreSTARTTLS $true -RequireTLS $true -AuthenticationCredential $c",
                stdin=f"u\n{PASSWORD}\n")
    assert result.returncode == 1 and "ignore_start_tls: cannot be combined with require_tls" in result.stderr
    assert config.read_bytes() == before
    assert os.listdir(config.parent / "secrets") == []


def test_unknown_parameter_and_unknown_cmdlet(config):
    result = ps(config, "New-SendConnector -Name X -Bogus 1")
    assert result.returncode == 1
    assert "unknown parameter -Bogus; valid parameters: -Name, -Usage, -AddressSpaces" in result.stderr
    assert "-DNSRoutingEnabled" in result.stderr and "-SmartHostAuthMechanism" in result.stderr
    result = ps(config, "New-AcceptedDomain Contoso -DomainType Authoritative")
    assert result.returncode == 1 and "missing mandatory parameter(s) -DomainName" in result.stderr
    result = ps(config, "Get-Nothing")
    assert result.returncode == 1
    assert "unknown cmdlet 'Get-Nothing'; known cmdlets: Export-Message, Get-AcceptedDomain, Get-Credential" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_script_stops_at_its_first_failing_line(config):
    before = config.read_bytes()
    result = ps(config, stdin="Get-SendConnector\n\n# fine so far\nSet-X 'unbalanced\nRemove-SendConnector 'Local drop'\n")
    assert result.returncode == 1
    assert "line 4: column 7: unbalanced single quote" in result.stderr
    assert config.read_bytes() == before


def test_get_credential_without_input_fails_plainly(config):
    result = ps(config, "$c = Get-Credential", stdin="")
    assert result.returncode == 1
    assert "Get-Credential: no user name" in result.stderr and "Traceback" not in result.stderr
    result = ps(config, "$c = Get-Credential", stdin="onlyuser\n")
    assert result.returncode == 1 and "no password for 'onlyuser'" in result.stderr


# -- the other verbs and the outputs --------------------------------------------------

def test_set_get_remove_round_trip_and_accepted_domains(config):
    lines = [
        'New-AcceptedDomain -Name Contoso -DomainName *.contoso.com -DomainType InternalRelay',
        'Set-SendConnector "Local drop" -Name "Drop" -MaxMessageSize 10MB -Comment "kept locally"',
        'Set-ReceiveConnector "EDGE01\\From Internet" -Banner $null -MaxInboundConnectionPerSource unlimited '
        '-ConnectionTimeout 00:10:00 -ProtocolLoggingLevel verbose',
        'Remove-ReceiveConnector "From Internal Org" -Confirm:$false',
    ]
    result = ps(config, *lines)
    assert result.returncode == 0, result.stderr
    cfg = loaded(config)
    assert cfg["accepted_domains"][1] == {"name": "Contoso", "domain_name": "*.contoso.com", "domain_type": "InternalRelay"}
    drop = named(cfg, "send_connectors", "Drop")
    assert drop["max_message_size"] == "10MB" and drop["comment"] == "kept locally"
    rc = named(cfg, "receive_connectors", "From Internet")
    assert rc["max_inbound_connection_per_source"] == "unlimited" and rc["connection_timeout"] == "00:10:00"
    assert rc["protocol_logging_level"] == "Verbose"            # the loader's spelling
    assert [c["name"] for c in cfg["receive_connectors"]] == ["From Internet"]

    listing = ps(config, "Get-AcceptedDomain")
    assert listing.stdout.splitlines()[:4] == [
        "Name        DomainName    DomainType",
        "----        ----------    ----------",
        "example.com example.com   Authoritative",
        "Contoso     *.contoso.com InternalRelay",
    ]
    table = ps(config, "Get-SendConnector Drop | Format-Table Name,MaxMessageSize,ConnectionInactivityTimeout")
    assert table.stdout == ("Name MaxMessageSize           ConnectionInactivityTimeout\n"
                            "---- --------------           ---------------------------\n"
                            "Drop 10 MB (10,485,760 bytes) 00:10:00\n")
    data = json.loads(ps(config, "Get-ReceiveConnector", json_out=True).stdout)
    assert data[0]["Identity"] == "EDGE01\\From Internet" and data[0]["MaxInboundConnectionPerSource"] == "Unlimited"
    assert data[0]["ConnectionTimeout"] == 600.0 and data[0]["MaxMessageSize"] == 36 * 1024**2
    assert data[0]["Bindings"] == ["127.0.0.1:2525"] and data[0]["ProtocolLoggingLevel"] == "Verbose"
    picked = json.loads(ps(config, "Get-SendConnector | fl Name,DSNRoutingEnabled", json_out=True).stdout)
    assert picked == [{"Name": "Drop", "DNSRoutingEnabled": False}]
    missing = ps(config, "Get-SendConnector | fl Name,Nope")
    assert missing.returncode == 1 and "no property 'Nope'; the properties are: Identity, Name" in missing.stderr


def test_whatif_validates_and_writes_nothing(config):
    before = config.read_bytes()
    result = ps(config, "New-SendConnector -Name X -AddressSpaces * -WhatIf")
    assert result.returncode == 0 and "What if: added send connector 'X'" in result.stderr
    assert config.read_bytes() == before


def test_file_mode_is_kept(config):
    os.chmod(config, 0o640)
    assert ps(config, 'Set-SendConnector "Local drop" -Enabled $false').returncode == 0
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o640
    assert named(loaded(config), "send_connectors", "Local drop")["enabled"] is False


def test_cmdlet_straight_from_the_shell(config):
    cwd = config.parent.parent
    result = exedge("New-SendConnector", "-Name", "To Internet", "-AddressSpaces", "*", "-Usage", "Internet",
                    "-DNSRoutingEnabled", "$true", "--config", str(config), cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2].split() == ["To", "Internet", "{SMTP:*;1}", "True"]
    result = exedge("--json", "get-sendconnector", "To Internet", "--config", str(config), cwd=cwd)
    assert json.loads(result.stdout)[0]["DNSRoutingEnabled"] is True
    result = exedge("Get-SendConnector", "-Nope", "--config", str(config), cwd=cwd)
    assert result.returncode == 1 and "unknown parameter -Nope" in result.stderr
    # the other sub-commands are still theirs
    assert exedge("check-config", str(config), cwd=cwd).returncode == 0


def test_a_connector_name_never_becomes_a_path(config):
    result = ps(config, "$c = Get-Credential",
                "New-SendConnector -Name '../../../tmp/x/..' -AddressSpaces * -DNSRoutingEnabled $false "
                "-SmartHosts mx.example.net -SmartHostAuthMechanism BasicAuth -AuthenticationCredential $c",
                stdin=f"u\n{PASSWORD}\n")
    assert result.returncode == 0, result.stderr
    ref = named(loaded(config), "send_connectors", "../../../tmp/x/..")["authentication_credential"]
    assert ref["password_file"] == os.path.join(str(config.parent), "secrets", "tmp-x.password")
    assert os.listdir(config.parent / "secrets") == ["tmp-x.password"]
