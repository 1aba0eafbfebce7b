"""
Reload (SIGHUP, `exedge reload`): a bad file changes nothing, a good one
is swapped in whole: new bindings listen, removed ones stop, held mail
that now has a route goes out, and sessions under way finish unharmed.
"""

import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading

from harness import FROM_INTERNAL_ORG, LOCAL_DROP, free_port, server_config

EXEDGE = os.path.join(os.path.dirname(sys.executable), "exedge")


def config(*, extra_receive=(), extra_send=()):
    # 50 test clients from one address: above Exchange's 20 per source (and 10 in DATA)
    return server_config(
        receive_connectors=(dict(FROM_INTERNAL_ORG, tarpit_interval=0, max_inbound_connection_per_source=100,
                                 max_inbound_data_sessions_per_source=100),
                            *extra_receive),
        send_connectors=(LOCAL_DROP, *extra_send))


def other_port_connector(name, port):
    return {"name": name, "usage": "Custom", "bindings": [f"127.0.0.1:{port}"], "remote_ip_ranges": ["127.0.0.1"],
            "auth_mechanisms": ["ExternalAuthoritative"], "permission_groups": ["ExchangeServers"],
            "tarpit_interval": 0}


TO_OTHER = {"name": "To Other", "address_spaces": ["other.test"], "drop_directory": "var/drop2"}


def send(port, rcpts, subject="reload"):
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
        return c.sendmail("alice@example.com", rcpts, f"Subject: {subject}\r\n\r\nhello\r\n".encode())


def rewrite(server, template):
    with open(server.config_path, "w") as f:
        f.write(template.format(port=server.port))


def listening(port) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def drop2(server):
    d = server.path("var", "drop2")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def exedge(server, *args):
    return subprocess.run([EXEDGE, *args, "--config", server.config_path], cwd=server.workdir,
                          capture_output=True, text=True, timeout=60)


def test_a_bad_file_changes_nothing_and_a_good_one_is_swapped_in(start_server):
    old_port, new_port = free_port(), free_port()
    server = start_server(config(extra_receive=[other_port_connector("Old", old_port)]))
    assert listening(old_port) and not listening(new_port)
    send(server.port, ["carol@other.test"])               # no route yet: held in Unreachable

    with open(server.config_path, "a") as f:
        f.write("\n[[send_connectors]]\nname = \"Broken\"\naddress_spaces = [\"bad..domain\"]\nbogus_key = 1\n")
    os.kill(server.proc.pid, signal.SIGHUP)
    server.wait_for(lambda: "still running on the configuration loaded before" in server.log,
                    what="the refused reload")
    assert "exedge.toml:" in server.log and "bogus_key" in server.log      # file:line and the key
    assert server.proc.poll() is None and listening(old_port)
    refused = exedge(server, "reload")
    assert refused.returncode == 1 and "bogus_key" in refused.stderr, refused
    send(server.port, ["bob@example.com"], "still serving")
    server.wait_for(server.drop_files, what="mail accepted after the refused reload")

    rewrite(server, config(extra_receive=[other_port_connector("New", new_port)], extra_send=[TO_OTHER]))
    os.kill(server.proc.pid, signal.SIGHUP)
    server.wait_for(lambda: drop2(server), what="the held message going out through the new connector")
    assert listening(new_port)
    server.wait_for(lambda: not listening(old_port), what="the removed binding to stop listening")
    send(new_port, ["dave@other.test"], "through the new binding")
    server.wait_for(lambda: len(drop2(server)) == 2, what="mail through the new binding")

    reloaded = exedge(server, "reload")
    assert reloaded.returncode == 0 and "reloaded" in reloaded.stdout, reloaded
    resubmitted = server.wait_for(lambda: json.loads(exedge(server, "Get-MessageTrackingLog", "-EventId", "RESUBMIT",
                                                            "--json").stdout), what="the RESUBMIT event")
    assert [r["Recipients"] for r in resubmitted] == [["carol@other.test"]]
    [held] = json.loads(exedge(server, "Get-MessageTrackingLog", "-EventId", "DELIVER", "-Recipients",
                               "carol@other.test", "--json").stdout)
    assert held["ConnectorId"] == "To Other"


def test_no_session_sees_an_error_while_the_configuration_changes(start_server):
    """50 connections sending while the file is reloaded again and again, a connector coming and going."""
    server = start_server(config())
    extra = free_port()
    with_extra = config(extra_receive=[other_port_connector("Extra", extra)], extra_send=[TO_OTHER])
    plain = config()
    errors, sent = [], []
    start = threading.Barrier(51)

    def client(n):
        start.wait()
        try:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as c:
                for i in range(4):
                    c.sendmail("alice@example.com", ["bob@example.com"],
                               f"Subject: load {n}-{i}\r\nMessage-ID: <{n}-{i}@load>\r\n\r\nhello\r\n".encode())
                    sent.append((n, i))
        except Exception as e:          # any error: the test fails and says which
            errors.append(f"client {n}: {e!r}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    start.wait()
    for turn in range(6):
        rewrite(server, with_extra if turn % 2 == 0 else plain)
        before = server.log.count("reload: ")
        os.kill(server.proc.pid, signal.SIGHUP)
        server.wait_for(lambda: server.log.count("reload: ") > before, what=f"reload {turn}")
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(sent) == 200
    files = server.wait_for(lambda: len(server.drop_files()) >= 200 and server.drop_files(), what="200 messages",
                            timeout=30)
    ids = []
    for path in files:
        with open(path, "rb") as f:
            ids += [line for line in f.read().split(b"\r\n") if line.startswith(b"Message-ID:")]
    assert len(ids) == 200 and len(set(ids)) == 200          # none lost, none twice
    assert "Traceback" not in server.log
