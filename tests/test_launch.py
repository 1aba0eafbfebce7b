"""Starting exedge the way an admin does: twistd and its plugin."""

import os
import subprocess
import sys

from harness import TWISTD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_twistd_lists_the_exedge_plugin():
    out = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "exedge" in out


def test_twistd_requires_config():
    r = subprocess.run([TWISTD, "-n", "--pidfile=", "exedge"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "--config is required" in r.stdout + r.stderr


def test_bad_config_stops_start_with_file_line_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[receive_connectors]]\nname = "x"\nbindings = ["127.0.0.1:0"]\n'
                    'remote_ip_ranges = ["127.0.0.1"]\nmax_message_size = "lots"\n')
    r = subprocess.run([TWISTD, "-n", "--pidfile=", "exedge", "--config", str(path)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 1
    assert f"{path}:5: receive_connectors[0].max_message_size: invalid size 'lots'" in r.stderr


def test_port_in_use_stops_start(tmp_path):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "c.toml"
        path.write_text(f'[[receive_connectors]]\nname = "x"\nbindings = ["127.0.0.1:{port}"]\n'
                        f'remote_ip_ranges = ["127.0.0.1"]\n')
        r = subprocess.run([TWISTD, "-n", "--pidfile=", "exedge", "--config", str(path)],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode != 0
    assert "Address already in use" in r.stdout + r.stderr


def test_embedded_default_configuration_is_valid():
    exedge = os.path.join(os.path.dirname(sys.executable), "exedge")
    r = subprocess.run([exedge, "check-config", os.path.join(ROOT, "etc", "exedge.toml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout
    assert "warning" not in r.stdout


def test_protocol_log_shows_connector_and_rights(start_server):
    import smtplib
    server = start_server(internal='protocol_logging_level = "Verbose"')
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10, source_address=("127.0.0.2", 0)) as c:
        c.noop()
    server.wait_for(lambda: "From Internal Org" in server.log and ",<,noop" in server.log, what="log lines")
    assert "rights: MS Exchange\\Externally Secured Servers -> Submit, AcceptAnyRecipient" in server.log
    assert ",>,250 2.0.0 OK" in server.log
    assert "rights: NT AUTHORITY\\ANONYMOUS LOGON" in server.log   # the harness's own probe


def test_every_subpackage_is_listed_for_installation():
    # setup.cfg lists packages by hand (twisted/plugins has no __init__.py
    # on purpose); a package missing there is missing from a non-editable install
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    listed = set(cfg["options"]["packages"].split())
    found = {"exedge." + d for d in os.listdir(os.path.join(ROOT, "exedge"))
             if os.path.exists(os.path.join(ROOT, "exedge", d, "__init__.py"))}
    assert found <= listed, f"missing from setup.cfg: {sorted(found - listed)}"
