"""
Start exedge for real: twistd in a subprocess, in its own working
directory, on loopback ports, stopped by its PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _override(block: str, knobs: str) -> str:
    """Add C{knobs} ("key = value" lines) to a connector block, replacing keys it sets."""
    keys = {line.split("=", 1)[0].strip() for line in knobs.splitlines() if "=" in line}
    kept = [line for line in block.splitlines() if line.split("=", 1)[0].strip() not in keys]
    return "\n".join(kept) + "\n" + knobs + "\n"


def config_text(port: int, *, internet: str = "", internal: str = "", extra: str = "",
                tarpit: str = "0", server: str = "") -> str:
    """
    The issue's contract configuration on C{port}, with test knobs:
    C{internet}/C{internal} are "key = value" lines for the two receive
    connectors (replacing keys already set), C{server} lines for [server],
    C{extra} is appended.
    """
    internet_block = _override(f"""name = "From Internet"
usage = "Internet"
bindings = ["127.0.0.1:{port}"]
remote_ip_ranges = ["0.0.0.0-255.255.255.255"]
fqdn = "edge01.example.com"
auth_mechanisms = ["Tls"]
permission_groups = ["AnonymousUsers"]
max_message_size = "36MB"
max_recipients_per_message = 200
tarpit_interval = "{tarpit}"
""", internet)
    internal_block = _override(f"""name = "From Internal Org"
usage = "Custom"
bindings = ["127.0.0.1:{port}"]
remote_ip_ranges = ["127.0.0.2", "127.0.0.3"]
auth_mechanisms = ["ExternalAuthoritative"]
permission_groups = ["ExchangeServers"]
tarpit_interval = "{tarpit}"
""", internal)
    return f"""
[server]
fqdn = "edge01.example.com"
spool_directory = "var/spool"
dns_servers = []
{server}

[[accepted_domains]]
domain_name = "example.com"
domain_type = "Authoritative"

[[receive_connectors]]
{internet_block}
[[receive_connectors]]
{internal_block}
[[send_connectors]]
name = "Local drop"
usage = "Custom"
address_spaces = ["example.com"]
drop_directory = "var/drop"
{extra}
"""


class Server:
    def __init__(self, workdir, config: str, port: int, *, code: str | None = None):
        """C{code}: another checkout of exedge to run instead of this one (bench/ compares commits)."""
        self.workdir = str(workdir)
        self.port = port
        self.env = None if code is None else dict(os.environ, PYTHONPATH=code)
        self.config_path = os.path.join(self.workdir, "exedge.toml")
        with open(self.config_path, "w") as f:
            f.write(config)
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.workdir, "twistd.log")

    def start(self, timeout: float = 20.0) -> "Server":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "exedge", "--config", self.config_path],
            cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exedge exited with {self.proc.returncode}:\n{self.log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.recv(512)
                    s.sendall(b"QUIT\r\n")
                return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"exedge did not listen on {self.port}:\n{self.log}")

    @property
    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def _end(self, sig) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def drop_files(self) -> list[str]:
        d = self.path("var", "drop")
        if not os.path.isdir(d):
            return []
        return sorted(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".eml"))

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}\n--- log ---\n{self.log[-4000:]}")
