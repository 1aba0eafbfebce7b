"""
The scenario the management tests share: a server with mail held in
Unreachable and mail in Retry (a smart host that is down), the command
line's client and command, and a TCP endpoint with a token.
"""

import contextlib
import os
import smtplib
import subprocess
import sys

from harness import FROM_INTERNAL_ORG, LOCAL_DROP, free_port, server_config

from exedge.manage.client import ManagementClient

EXEDGE = os.path.join(os.path.dirname(sys.executable), "exedge")


def config(dead_port: int, extra: str = "") -> str:
    """example.com dropped; partner.test through a smart host on C{dead_port}; the rest unreachable."""
    return server_config(
        accepted_domains=("example.com", {"domain_name": "partner.test", "domain_type": "InternalRelay"}),
        receive_connectors=(dict(FROM_INTERNAL_ORG, tarpit_interval=0),),
        send_connectors=(LOCAL_DROP, {"name": "To Partner", "address_spaces": ["partner.test"],
                                      "dns_routing_enabled": False, "smart_hosts": [f"127.0.0.1:{dead_port}"]}),
        extra=extra)


def send(server, rcpt, subject):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.sendmail("alice@example.com", [rcpt],
                   f"Subject: {subject}\r\nFrom: alice@example.com\r\n\r\nhello\r\n".encode())


@contextlib.contextmanager
def client_of(server):
    """The command line's client, from the server's working directory (the socket path is relative to it)."""
    old = os.getcwd()
    os.chdir(server.workdir)
    try:
        yield ManagementClient(server.config_path)
    finally:
        os.chdir(old)


def exedge(server, *args):
    return subprocess.run([EXEDGE, *args, "--config", server.config_path], cwd=server.workdir,
                          capture_output=True, text=True, timeout=60)


def queues_by_hop(client):
    return {q["connector"]: q for q in client.queues()}


def held_and_retrying(server, client):
    """One message waiting in Unreachable, one in the partner's queue in Retry."""
    send(server, "carol@other.test", "nobody routes me")
    send(server, "bob@partner.test", "the smart host is down")

    def ready():
        q = queues_by_hop(client)
        return "Unreachable" in q and q.get("To Partner", {}).get("status") == "Retry" and q

    return server.wait_for(ready, what="a held and a retrying queue")


TOKEN = "s3cret-token-for-the-tests-0123456789"


def tcp_server_in(start_server, tmp_path):
    """A server (L{config}) whose endpoint also listens on TCP with L{TOKEN}: (server, base URL)."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = free_port()
    extra = f'\n[management]\nlisten = "127.0.0.1:{port}"\ntoken_file = "{token_file}"\n'
    server = start_server(config(free_port(), extra))
    return server, f"http://127.0.0.1:{port}"
