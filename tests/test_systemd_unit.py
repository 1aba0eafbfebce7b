"""
etc/exedge.service: systemd's own checker accepts it, and the keys that
make it a safe unit for a port-25 server are there with the right values.
"""

import configparser
import os
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(ROOT, "etc", "exedge.service")
VENV_BIN = "/opt/exedge/.venv/bin"


def service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str                 # systemd's keys are case-sensitive
    with open(UNIT, encoding="utf-8") as f:
        parser.read_file(f)
    return parser


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_it_without_a_word(tmp_path):
    """
    With the install paths pointed at this machine's virtualenv (verify
    checks that the commands exist); verify exits 0 even for an unknown key
    or a bad value, which it reports on stderr: any output is a failure.
    """
    with open(UNIT, encoding="utf-8") as f:
        text = f.read()
    assert VENV_BIN in text
    copy = tmp_path / "exedge.service"
    copy.write_text(text.replace(VENV_BIN, os.path.dirname(sys.executable)))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == "", result.stdout + result.stderr


def test_the_keys_that_matter():
    unit = service()
    s = unit["Service"]
    start = shlex.split(s["ExecStart"])
    assert start[0] == f"{VENV_BIN}/twistd"
    assert start[1:] == ["-n", "--pidfile=", "exedge", "--config", "/etc/exedge/exedge.toml"]
    assert shlex.split(s["ExecStartPre"]) == [f"{VENV_BIN}/exedge", "check-config", "/etc/exedge/exedge.toml"]
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["WorkingDirectory"] == "/var/lib/exedge"
    assert (s["User"], s["Group"]) == ("exedge", "exedge")
    assert s["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert s["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert s["NoNewPrivileges"] == "yes"
    assert s["ProtectSystem"] == "strict"
    assert s["ReadWritePaths"].split() == ["/var/lib/exedge", "/var/log/exedge"]
    assert s["PrivateTmp"] == "yes" and s["ProtectHome"] == "yes"
    assert s["Restart"] == "on-failure"
    assert s["KillMode"] == "mixed"
    # long enough for a session at the default connection_timeout (5 minutes) to end
    assert int(s["TimeoutStopSec"]) > 300
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_twistd_accepts_the_command_line_it_runs():
    """The ExecStart words are twistd's and the plugin's options (--help stops before starting)."""
    start = shlex.split(service()["Service"]["ExecStart"])
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    result = subprocess.run([twistd, *start[1:4], "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout
