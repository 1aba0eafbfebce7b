"""
Tests for `exedge check-config`, run through the real console script.
"""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXEDGE = os.path.join(os.path.dirname(sys.executable), "exedge")


def run(*args, cwd=ROOT):
    return subprocess.run(
        [EXEDGE, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
    )


def test_check_contract_file_ok():
    result = run("check-config", "etc/exedge.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
    assert "etc/exedge.toml" in result.stdout
    assert "warning" not in result.stdout.lower()
    assert result.stderr == ""


def test_check_file_with_problems(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(textwrap.dedent("""\
        [server]
        fqdn = "edge.example.com"
        spool_dir = "var/spool"

        [[receive_connectors]]
        name = "A"
        bindings = ["127.0.0.1:2525"]
        remote_ip_ranges = ["10.0.0.0/8"]
        max_message_size = "lots"
    """))
    result = run("check-config", str(path))
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert f"{path}:3: server.spool_dir" in out
    assert f"{path}:9: receive_connectors[0].max_message_size" in out
    assert "OK" not in out


def test_check_file_with_cross_key_problem(tmp_path):
    path = tmp_path / "dup.toml"
    connector = ('[[receive_connectors]]\nname = "Same"\n'
                 'bindings = ["127.0.0.1:{port}"]\nremote_ip_ranges = ["10.0.0.0/8"]\n')
    path.write_text(connector.format(port=2525) + connector.format(port=2526))
    result = run("check-config", str(path))
    assert result.returncode == 1
    assert f"{path}:6: receive_connectors[1].name" in result.stdout + result.stderr


def test_check_file_with_syntax_error(tmp_path):
    path = tmp_path / "syntax.toml"
    path.write_text('[server]\nfqdn = "edge.example.com"\nspool_directory = = 1\n')
    result = run("check-config", str(path))
    assert result.returncode == 1
    assert f"{path}:3:" in result.stdout + result.stderr


def test_check_file_with_warning_only_is_ok(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text(
        '[[receive_connectors]]\nname = "Relay"\nbindings = ["127.0.0.1:2525"]\n'
        'remote_ip_ranges = ["0.0.0.0-255.255.255.255"]\n'
        'auth_mechanisms = ["ExternalAuthoritative"]\npermission_groups = ["ExchangeServers"]\n'
    )
    result = run("check-config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" in result.stdout.lower()
    assert f"{path}:4: receive_connectors[0].remote_ip_ranges" in result.stdout
    assert "OK" in result.stdout


def test_defaults_lists_keys():
    result = run("check-config", "--defaults")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for section in ("[server]", "[[accepted_domains]]", "[[receive_connectors]]", "[[send_connectors]]"):
        assert section in out
    assert "max_hop_count = 30" in out
    assert "max_inbound_connection_per_source = 20" in out
    assert 'max_message_size = "36MB"' in out
    assert 'max_header_size = "256KB"' in out
    assert 'connection_timeout = "5m"' in out
    assert 'spool_directory = "var/spool"' in out


def test_defaults_does_not_need_a_file(tmp_path):
    result = run("check-config", "--defaults", cwd=str(tmp_path))
    assert result.returncode == 0
    assert "max_hop_count" in result.stdout


def test_nonexistent_file(tmp_path):
    path = tmp_path / "missing.toml"
    result = run("check-config", str(path))
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert str(path) in out
    assert "cannot read" in out.lower() or "no such file" in out.lower()
    assert "Traceback" not in out


def test_password_files_that_cannot_be_read_are_named_with_their_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(textwrap.dedent(f'''\
        [directory]
        servers = ["ldaps://dc1.fabrikam.test"]
        base_dn = "DC=fabrikam,DC=test"
        bind_mode = "Search"
        service_account = {{ username = "svc", password_file = "{tmp_path}/missing.secret" }}
        '''))
    result = run("check-config", str(path))
    assert result.returncode == 1
    assert f"{path}:5: directory.service_account: cannot read password_file {tmp_path}/missing.secret" \
        in result.stdout
