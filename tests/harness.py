"""
Start exedge for real: twistd in a subprocess, in its own working
directory, on loopback ports, stopped by its PID.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping
from types import MappingProxyType

BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")


def read_log(path: str) -> str:
    """A process's log so far, or "" before it wrote one: what a failing test prints."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- configurations -------------------------------------------------------------
#
# A configuration is built from Python values (tables as mappings of key ->
# str or path, int, float, bool, list/tuple, or mapping for an inline table) and
# rendered to TOML here, so that a test states what differs from the common
# case and nothing else, and no quoting or brace escaping is done by hand.

PORT = "{port}"                    # the placeholder start_server() fills in
LOOPBACK = f"127.0.0.1:{PORT}"     # the binding of the server under test

# [server] as every test server has it, unless a test says otherwise
SERVER = MappingProxyType({"fqdn": "edge01.example.com", "spool_directory": "var/spool"})

# anonymous mail from any address, on the test port (the Internet usage's defaults)
FROM_INTERNET = MappingProxyType({
    "name": "From Internet",
    "usage": "Internet",
    "bindings": (LOOPBACK,),
})

# the test client on 127.0.0.1, externally secured: it may relay anywhere
FROM_INTERNAL_ORG = MappingProxyType({
    "name": "From Internal Org",
    "bindings": (LOOPBACK,),
    "remote_ip_ranges": ("127.0.0.1",),
    "auth_mechanisms": ("ExternalAuthoritative",),
    "permission_groups": ("ExchangeServers",),
})

# example.com's mail into var/drop, where Server.drop_files() looks
LOCAL_DROP = MappingProxyType({
    "name": "Local drop",
    "address_spaces": ("example.com",),
    "drop_directory": "var/drop",
})

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_string(text: str) -> str:
    escaped = "".join(
        "\\\\" if c == "\\" else '\\"' if c == '"' else
        f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c
        for c in text)
    return f'"{escaped}"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def toml_value(value) -> str:
    """
    C{value} as a TOML value: strings (and paths) quoted, lists and tuples
    as arrays, mappings as inline tables.
    """
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML value for {value!r}")


def toml_table(header: str, values: Mapping) -> str:
    """One table, C{header} as written ("[directory]", "[[receive_connectors]]"), then its keys."""
    return header + "\n" + "".join(f"{_toml_key(k)} = {toml_value(v)}\n" for k, v in values.items()) + "\n"


def _document(*, server=None, accepted_domains=(), receive_connectors=(), send_connectors=(), directory=None,
              pipeline=()) -> str:
    parts = [toml_table("[server]", {**SERVER, **(server or {})})]
    parts += [toml_table("[[accepted_domains]]", {"domain_name": d} if isinstance(d, str) else d)
              for d in accepted_domains]
    parts += [toml_table("[[receive_connectors]]", c) for c in receive_connectors]
    parts += [toml_table("[[send_connectors]]", c) for c in send_connectors]
    if directory is not None:
        parts.append(toml_table("[directory]", directory))
    parts += [toml_table("[[pipeline]]", stage) for stage in pipeline]
    return "\n" + "".join(parts)


# Back pressure's free-space defaults (Medium below 1 GB) would turn a test
# machine with little free disk into one that refuses anonymous mail:
# every test server gets low thresholds unless its test sets [back_pressure].
QUIET_BACK_PRESSURE = '\n[back_pressure]\nmin_free_space_medium = "64MB"\nmin_free_space_high = "32MB"\n'


def _quiet_back_pressure(text: str) -> str:
    return text if "[back_pressure]" in text else text + QUIET_BACK_PRESSURE


def server_config(*, server: Mapping | None = None, accepted_domains=("example.com",), receive_connectors=(),
                  send_connectors=(LOCAL_DROP,), directory: Mapping | None = None, pipeline=(),
                  extra: str = "") -> str:
    """
    A whole configuration for C{start_server(config)}: [server] is L{SERVER}
    updated with C{server}; C{accepted_domains} are domain names or tables;
    the connectors, C{directory} and the C{pipeline} stages are tables
    (mappings); C{extra} is TOML text, appended.

    The result is a C{str.format} template whose only field is L{PORT}
    (as in L{LOOPBACK}): every other brace, an inline table's or one in
    C{extra}, comes out doubled.
    """
    text = _quiet_back_pressure(_document(server=server, accepted_domains=accepted_domains,
                                          receive_connectors=receive_connectors, send_connectors=send_connectors,
                                          directory=directory, pipeline=pipeline) + extra)
    return text.replace("{", "{{").replace("}", "}}").replace("{{port}}", PORT)


def config_text(port: int, *, internet: str = "", internal: str = "", extra: str = "",
                tarpit: str = "0", server: str = "") -> str:
    """
    The issue's contract configuration on C{port} (TOML text, not a
    template), with test knobs: C{internet}/C{internal} are "key = value"
    lines for the two receive connectors (replacing keys already set),
    C{server} lines for [server], C{extra} is appended.
    """
    bindings = [f"127.0.0.1:{port}"]
    return _document(
        server={"dns_servers": [], **tomllib.loads(server)},
        accepted_domains=[{"domain_name": "example.com", "domain_type": "Authoritative"}],
        receive_connectors=[
            {**FROM_INTERNET, "bindings": bindings, "remote_ip_ranges": ["0.0.0.0-255.255.255.255"],
             "fqdn": "edge01.example.com", "auth_mechanisms": ["Tls"], "permission_groups": ["AnonymousUsers"],
             "max_message_size": "36MB", "max_recipients_per_message": 200, "tarpit_interval": str(tarpit),
             **tomllib.loads(internet)},
            {**FROM_INTERNAL_ORG, "usage": "Custom", "bindings": bindings,
             "remote_ip_ranges": ["127.0.0.2", "127.0.0.3"], "tarpit_interval": str(tarpit),
             **tomllib.loads(internal)},
        ],
        send_connectors=[{**LOCAL_DROP, "usage": "Custom"}],
    ) + _quiet_back_pressure(extra) + "\n"


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
        return read_log(self.log_path)

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


class Sink:
    """The project's recording sink (exedge.testing) in its own process, on a free port."""

    def __init__(self, tmp_path, name, *args, host="127.0.0.1", port=None):
        self.port = port or free_port(host)
        self.out = str(tmp_path / name)
        self.proc = subprocess.Popen([sys.executable, "-m", "exedge.testing", "--port", str(self.port),
                                      "--host", host, "--out", self.out, *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection((host, self.port), timeout=0.5).close()
                return
            except OSError:
                assert self.proc.poll() is None, "the sink died"
                time.sleep(0.05)
        raise RuntimeError("the sink did not start")

    def files(self):
        if not os.path.isdir(self.out):
            return []
        return [open(os.path.join(self.out, n), "rb").read() for n in sorted(os.listdir(self.out))
                if n.endswith(".eml")]

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
