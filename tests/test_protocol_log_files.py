"""
Protocol logs as files: a real server (twistd), real clients (smtplib, a
raw socket), a real next hop (exedge.testing's sink in a process); the
files read back with the csv module after the server stopped (stop
flushes them).
"""

import csv
import glob
import os
import smtplib
import socket

from harness import FROM_INTERNET, LOCAL_DROP, server_config

FIELDS = "date-time,connector-id,session-id,sequence-number,local-endpoint,remote-endpoint,event,data,context"


def read_log(directory, prefix):
    """(header lines, rows as dicts) of every file of the log, oldest first."""
    header, rows = [], []
    for path in sorted(glob.glob(os.path.join(directory, f"{prefix}*.LOG"))):
        assert os.path.basename(path).startswith(prefix) and path.endswith("-1.LOG")
        with open(path, encoding="utf-8", newline="") as f:
            lines = f.read().split("\r\n")
        header += [line for line in lines if line.startswith("#")]
        data = [line for line in lines if line and not line.startswith("#")]
        for row in csv.reader(data):
            assert len(row) == 9, row
            rows.append(dict(zip(FIELDS.split(","), row)))
    return header, rows


def sessions(rows):
    out = {}
    for row in rows:
        out.setdefault(row["session-id"], []).append(row)
    return out


def test_receive_protocol_log_files_of_a_verbose_connector(start_server):
    server = start_server(server_config(
        receive_connectors=(dict(FROM_INTERNET, tarpit_interval=0, protocol_logging_level="Verbose"),)))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.ehlo("client.example.net")
        c.sendmail("someone@example.net", ["alice@example.com"], b"Subject: hi\r\n\r\nhello\r\n")
    # hostile input: controls, commas, quotes and a line far past the limit
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b'NOOP a,"b"\x1b[2J\x07,c\r\n')
        f.readline()
        s.sendall(b"NOOP " + b"x" * 5000 + b"\r\n")
        f.readline()
        s.sendall(b"QUIT\r\n")
        f.readline()
    server.stop()
    header, rows = read_log(server.path("var", "log", "ProtocolLog", "SmtpReceive"), "RECV")
    assert header[:3] == ["#Software: exedge", "#Version: 0.1.0", "#Log-type: SMTP Receive Protocol Log"]
    assert header[3].startswith("#Date: 20") and header[3].endswith("Z")
    assert header[4] == f"#Fields: {FIELDS}"
    by_session = list(sessions(rows).values())
    assert len(by_session) == 3            # the harness's probe at start-up, then ours
    _, first, hostile = by_session
    for session in by_session:
        assert [int(r["sequence-number"]) for r in session] == list(range(len(session)))
        assert session[0]["event"] == "+" and session[-1]["event"] == "-"
        assert {r["connector-id"] for r in session} == {"From Internet"}
        assert session[0]["local-endpoint"] == f"127.0.0.1:{server.port}"
        assert session[0]["remote-endpoint"].startswith("127.0.0.1:")
    events = [(r["event"], r["data"]) for r in first]
    assert ("<", "ehlo client.example.net") in events                          # smtplib's spelling
    assert any(e == ">" and d.startswith("250-edge01.example.com") for e, d in events)
    assert any(e == "<" and d.startswith("mail FROM:<someone@example.net>") for e, d in events)
    assert any(e == ">" and d.startswith("250 2.6.0 <") for e, d in events)      # queued, with its id
    received = [r["data"] for r in hostile if r["event"] == "<"]
    assert received[0] == 'NOOP a,"b"\\x1b[2J\\x07,c'                            # intact, controls escaped
    assert (">", "500 5.5.2 Line too long") in [(r["event"], r["data"]) for r in hostile]
    assert all(len(r["data"]) <= 600 for r in hostile)            # no 5000-octet row


def test_no_files_for_a_connector_that_is_not_verbose(start_server):
    server = start_server(server_config(receive_connectors=(dict(FROM_INTERNET, tarpit_interval=0),)))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.sendmail("someone@example.net", ["alice@example.com"], b"Subject: hi\r\n\r\nhello\r\n")
    server.stop()
    assert not os.path.exists(server.path("var", "log", "ProtocolLog"))
    assert "rights:" in server.log          # the twistd lines stay as they were


def test_send_protocol_log_files_of_a_verbose_send_connector(start_server, sinks):
    sink = sinks("partner")
    server = start_server(server_config(
        accepted_domains=("example.com", {"domain_name": "partner.test", "domain_type": "InternalRelay"}),
        receive_connectors=(dict(FROM_INTERNET, tarpit_interval=0),),
        send_connectors=(LOCAL_DROP, {"name": "To Partner", "address_spaces": ["partner.test"],
                                      "dns_routing_enabled": False, "protocol_logging_level": "Verbose",
                                      "smart_hosts": [f"127.0.0.1:{sink.port}"]})))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.sendmail("alice@example.com", ["bob@partner.test"], b"Subject: out\r\n\r\nhello partner\r\n")
    server.wait_for(sink.files, what="the sink to receive the message")
    server.stop()
    header, rows = read_log(server.path("var", "log", "ProtocolLog", "SmtpSend"), "SEND")
    assert header[2] == "#Log-type: SMTP Send Protocol Log"
    (session,) = sessions(rows).values()
    assert [int(r["sequence-number"]) for r in session] == list(range(len(session)))
    assert session[0]["event"] == "+" and session[-1]["event"] == "-"
    assert session[0]["remote-endpoint"] == f"127.0.0.1:{sink.port}"
    assert {r["connector-id"] for r in session} == {"To Partner"}
    events = [(r["event"], r["data"]) for r in session]
    assert events[1][0] == "<" and events[1][1].startswith("220")                # the greeting
    assert (">", "EHLO edge01.example.com") in events
    assert any(e == "<" and d.startswith("250") for e, d in events)
    assert (">", "MAIL FROM:<alice@example.com> BODY=8BITMIME") in events or \
        any(e == ">" and d.startswith("MAIL FROM:<alice@example.com>") for e, d in events)
    assert any(e == ">" and d.startswith("RCPT TO:<bob@partner.test>") for e, d in events)
    # the receive side of this server is not Verbose: no receive files
    assert not os.path.exists(server.path("var", "log", "ProtocolLog", "SmtpReceive"))


class Rows:
    """A protocol log file's stand-in that keeps its rows (the unit below has no server)."""

    def __init__(self):
        self.rows = []

    def write(self, values):
        self.rows.append(tuple(values))


def test_the_send_protocol_log_never_shows_credentials():
    from twisted.internet import task
    from twisted.internet.testing import StringTransport

    from exedge.logs import ProtocolLog
    from exedge.send.client import OutboundMessage, OutboundRecipient, SMTPClient

    for offer, replies in ((b"250 AUTH PLAIN\r\n", [b"235 2.7.0 ok\r\n"]),
                           (b"250 AUTH LOGIN\r\n", [b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n",
                                                    b"235 2.7.0 ok\r\n"])):
        rows = Rows()
        transport = StringTransport()
        client = SMTPClient([OutboundMessage("a@s.test", (OutboundRecipient("b@x.test"),), b"\r\n")],
                            helo="e.test", clock=task.Clock(), credentials=("edge", "secret"),
                            auth_requires_tls=False,
                            protocol_log=lambda local, remote: ProtocolLog("To X", "S1", True, local, remote, rows))
        client.makeConnection(transport)
        client.dataReceived(b"220 peer ready\r\n250-peer\r\n" + offer)
        for reply in replies:
            client.dataReceived(reply)
        sent = transport.value()
        assert b"MAIL FROM:<a@s.test>" in sent                 # the session got past AUTH
        data = [r[6] for r in rows.rows]
        assert [r[2] for r in rows.rows] == list(range(len(rows.rows)))
        for secret in ("secret", "c2VjcmV0", "AGVkZ2UAc2VjcmV0", "ZWRnZQ=="):
            assert not any(secret in d for d in data), data
        assert any(d.startswith("AUTH ") for d in data)
