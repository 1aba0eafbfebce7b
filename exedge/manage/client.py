"""
The command line's side of the management endpoint: one HTTP request to
the running server, over its UNIX socket (or its TCP address with the
token, when the configuration has no socket).

Blocking on purpose: this runs in the `exedge` command, never in the
server. http.client is the standard library's client; only the socket it
talks over is ours.
"""

from __future__ import annotations

import http.client
import json
import socket
from urllib.parse import quote

from exedge.config import ConfigError
from exedge.config.loader import load_section


class NotRunning(Exception):
    """No server answers where the configuration says it listens."""


class EndpointError(Exception):
    """The server answered with an error (its JSON message and HTTP status)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class ManagementClient:
    """Talks to the server that the configuration file C{config_path} describes."""

    def __init__(self, config_path: str, timeout: float = 60.0):
        self.config_path = config_path
        try:
            self.settings = load_section(config_path, "management")
        except ConfigError as e:
            raise NotRunning(f"cannot find the server in {config_path}: "
                             + "; ".join(str(p) for p in e.problems)) from None
        self.timeout = timeout

    def where(self) -> str:
        m = self.settings
        return f"unix:{m.socket}" if m.socket else f"http://{m.listen[0]}:{m.listen[1]}/"

    def _connection(self):
        m = self.settings
        if m.socket:
            return _UnixConnection(m.socket, self.timeout), {}
        if m.listen is None:
            raise NotRunning(f"{self.config_path} has no management endpoint: set [management] socket")
        with open(m.token_file, encoding="ascii") as f:
            token = f.read().strip()
        return http.client.HTTPConnection(m.listen[0], m.listen[1], timeout=self.timeout), \
            {"Authorization": f"Bearer {token}"}

    def request(self, method: str, path: str, body: dict | None = None, *, raw: bool = False):
        """The answer's JSON (or bytes with C{raw}); L{EndpointError} or L{NotRunning} otherwise."""
        connection, headers = self._connection()
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NotRunning(f"no exedge server answers on {self.where()} "
                             f"(is it running with {self.config_path}, from this directory?): {e.strerror}") from None
        except OSError as e:
            raise NotRunning(f"cannot talk to the server on {self.where()}: {e}") from None
        finally:
            connection.close()
        if response.status >= 400:
            try:
                message = json.loads(data)["error"]
            except (ValueError, KeyError, TypeError):
                message = data.decode("utf-8", "replace")[:500]
            raise EndpointError(response.status, message)
        return data if raw else json.loads(data)

    # -- what the commands ask -------------------------------------------------

    def queues(self) -> list[dict]:
        return self.request("GET", "/api/queues")["queues"]

    def messages(self, queue: str | None = None) -> list[dict]:
        """The first 1,000 messages, oldest first (the server's default page)."""
        return self.message_page(queue)["messages"]

    def message_page(self, queue: str | None = None, limit: int | None = 1000) -> dict:
        """{"messages": [...], "total": n, "truncated": bool}: at most C{limit} (None: all), oldest first."""
        path = "/api/messages" if queue is None else f"/api/queues/{quote(queue, safe='')}/messages"
        return self.request("GET", f"{path}?limit={'unlimited' if limit is None else int(limit)}")

    def message(self, identity: str) -> dict:
        return self.request("GET", f"/api/messages/{quote(identity, safe='')}")

    def queue_action(self, queue: str, verb: str, body: dict | None = None) -> dict:
        return self.request("POST", f"/api/queues/{quote(queue, safe='')}/{verb}", body or {})

    def message_action(self, message: str, verb: str, body: dict | None = None) -> dict:
        return self.request("POST", f"/api/messages/{quote(message, safe='')}/{verb}", body or {})

    def export(self, message: str) -> bytes:
        return self.request("GET", f"/api/messages/{quote(message, safe='')}/eml", raw=True)

    def reload(self) -> dict:
        return self.request("POST", "/api/reload", {})

    def status(self) -> dict:
        return self.request("GET", "/api/status")


def queue_identity(text: str) -> str:
    """
    What an admin types for a queue: "3", "edge01\\3" (Exchange's
    Server\\Queue form) or "Unreachable"; the part after the last
    backslash is the queue's identity on this server.
    """
    return text.rsplit("\\", 1)[-1].strip()


def reload_after_edit(config_path: str) -> str:
    """For the configuration cmdlets: ask the running server to reload; a line to print."""
    try:
        report = ManagementClient(config_path).reload()
    except NotRunning as e:
        return f"the server is not running ({e}); the change applies when it starts"
    except EndpointError as e:
        return f"the server did not reload: {e}"
    if not report.get("reloaded"):
        return "the server refused the reload: " + "; ".join(report.get("problems", []))
    later = report.get("restart_needed_for") or []
    return "the running server reloaded its configuration" + (
        f" ({', '.join(later)} take effect at the next restart)" if later else "")


