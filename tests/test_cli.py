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


# -- exedge user ---------------------------------------------------------------

def user(*args, stdin=None, cwd=ROOT):
    """exedge user ... with no terminal: C{stdin} text on a pipe, or nothing at all (end of file)."""
    return subprocess.run([EXEDGE, "user", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          input=stdin, stdin=subprocess.DEVNULL if stdin is None else None)


def groups_of(path, name):
    for line in open(path, encoding="utf-8"):
        if line.startswith(name + ":"):
            return line.rstrip("\n").split(":")[2]
    raise AssertionError(f"no {name} in {path}")


def test_user_add_again_keeps_groups_unless_told(tmp_path):
    from exedge.auth.credentials import verify_password

    users = str(tmp_path / "users")
    name = "edge02@fabrikam.com"
    added = user("add", name, "--file", users, "--group", "ExchangeServers", "--group", "Partners", stdin="pw-1\n")
    assert added.returncode == 0, added.stderr
    assert groups_of(users, name) == "ExchangeServers,Partners"
    # a new password only: the server keeps its rights
    again = user("add", name, "--file", users, stdin="pw-2\n")
    assert again.returncode == 0, again.stderr
    assert groups_of(users, name) == "ExchangeServers,Partners"
    stored = next(line.split(":")[1] for line in open(users, encoding="utf-8") if line.startswith(name + ":"))
    assert verify_password("pw-2", stored) and not verify_password("pw-1", stored)
    # --group replaces the list; --no-groups clears it
    assert user("add", name, "--file", users, "--group", "Partners", stdin="pw-3\n").returncode == 0
    assert groups_of(users, name) == "Partners"
    assert user("add", name, "--file", users, "--no-groups", stdin="pw-4\n").returncode == 0
    assert groups_of(users, name) == ""
    both = user("add", name, "--file", users, "--no-groups", "--group", "Partners", stdin="pw-5\n")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_user_add_help_says_what_group_does():
    result = user("--help")
    assert "replaces an existing user's groups" in " ".join(result.stdout.split())
    assert "--no-groups" in result.stdout


def test_user_add_without_terminal_or_stdin_fails_with_a_message(tmp_path):
    users = tmp_path / "users"
    result = user("add", "someone@fabrikam.com", "--file", str(users))      # stdin at end of file
    assert result.returncode == 1
    assert "no terminal to ask for the password and nothing on standard input" in result.stderr
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr
    assert not users.exists()
    empty = user("add", "someone@fabrikam.com", "--file", str(users), stdin="\n")
    assert empty.returncode == 1 and "empty password" in empty.stderr and not users.exists()


def test_user_add_reads_one_line_from_a_pipe(tmp_path):
    users = tmp_path / "users"
    result = user("add", "someone@fabrikam.com", "--file", str(users), stdin="s3cret\nnot read\n")
    assert result.returncode == 0, result.stderr
    assert "saved" in result.stdout
    assert oct(users.stat().st_mode & 0o777) == "0o600"


def test_user_without_credentials_file_says_which_key_to_add(tmp_path):
    config = tmp_path / "exedge.toml"
    config.write_text('[server]\nfqdn = "edge01.example.com"\n')
    result = user("add", "someone@fabrikam.com", "--config", str(config), stdin="pw\n")
    assert result.returncode == 2
    assert f'add credentials_file = "..." under [directory] in {config}' in result.stderr
    assert "Traceback" not in result.stderr
    listed = user("list", "--config", str(config))
    assert listed.returncode == 2 and "under [directory]" in listed.stderr
