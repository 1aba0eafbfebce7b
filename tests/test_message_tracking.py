"""
The message tracking log end to end: a real server, a drop directory
(DELIVER), a smart host that takes one recipient and refuses another
(SEND, FAIL, then the NDR: DSN), a relayed domain no connector serves
(the Unreachable queue, said once in the twistd log); the files read
back with the csv module, and searched by `exedge Get-MessageTrackingLog`
run as a process.
"""

import csv
import glob
import json
import os
import smtplib
import subprocess
import sys

from harness import FROM_INTERNAL_ORG, FROM_INTERNET, LOCAL_DROP, server_config

EXEDGE = os.path.join(os.path.dirname(sys.executable), "exedge")
MESSAGE_ID = "<track-1@client.example.com>"


def tracking_rows(server):
    rows = []
    for path in sorted(glob.glob(server.path("var", "log", "MessageTracking", "MSGTRK*.LOG"))):
        with open(path, encoding="utf-8", newline="") as f:
            lines = f.read().split("\r\n")
        assert lines[2] == "#Log-type: Message Tracking Log"
        fields = lines[4][len("#Fields: "):].split(",")
        assert fields[:10] == ["date-time", "client-ip", "client-hostname", "server-ip", "server-hostname",
                               "source-context", "connector-id", "source", "event-id", "internal-message-id"]
        rows += [dict(zip(fields, r)) for r in csv.reader(x for x in lines if x and not x.startswith("#"))]
    return rows


def get_tracking(server, *args):
    """exedge Get-MessageTrackingLog in the server's directory (its --config names the log's path)."""
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([EXEDGE, "Get-MessageTrackingLog", *args, "--config", "exedge.toml", "--json"],
                       cwd=server.workdir, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def config(sink_port):
    return server_config(
        accepted_domains=("example.com", {"domain_name": "partner.test", "domain_type": "InternalRelay"}),
        receive_connectors=(dict(FROM_INTERNET, tarpit_interval=0),),
        send_connectors=(LOCAL_DROP, {"name": "To Partner", "address_spaces": ["partner.test"],
                                      "dns_routing_enabled": False,
                                      "smart_hosts": [f"127.0.0.1:{sink_port}"]}))


def test_a_message_life_in_the_tracking_log_and_its_search(start_server, sinks):
    sink = sinks("partner", "--refuse", "nobody@partner.test=550")
    server = start_server(config(sink.port))
    body = (f"Message-ID: {MESSAGE_ID}\r\nSubject: quarterly, \"numbers\"\r\nFrom: carol@example.com\r\n\r\n"
            "hello\r\n").encode()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.sendmail("carol@example.com", ["alice@example.com", "bob@partner.test", "nobody@partner.test"], body)
    # alice's copy, then the NDR to carol, both in the drop directory
    server.wait_for(lambda: len(server.drop_files()) >= 2 and sink.files(), what="deliveries and the NDR")
    server.stop()                      # the log is flushed at stop
    rows = tracking_rows(server)
    received = [r for r in rows if r["event-id"] == "RECEIVE" and r["source"] == "SMTP"]
    assert len(received) == 1
    qid = received[0]["internal-message-id"]
    mine = {r["event-id"]: r for r in rows if r["internal-message-id"] == qid}
    assert set(mine) == {"RECEIVE", "DELIVER", "SEND", "FAIL", "DSN"}, rows
    r = mine["RECEIVE"]
    assert r["message-id"] == MESSAGE_ID and r["sender-address"] == "carol@example.com"
    assert r["recipient-address"] == "alice@example.com;bob@partner.test;nobody@partner.test"
    assert r["recipient-count"] == "3" and int(r["total-bytes"]) > len(body)
    assert r["message-subject"] == 'quarterly, "numbers"'
    assert r["client-ip"] == "127.0.0.1" and r["connector-id"] == "From Internet"
    assert mine["DELIVER"]["recipient-address"] == "alice@example.com"
    assert mine["DELIVER"]["connector-id"] == "Local drop"
    assert mine["SEND"]["recipient-address"] == "bob@partner.test"
    assert mine["SEND"]["server-hostname"] == f"127.0.0.1:{sink.port}"
    assert mine["FAIL"]["recipient-address"] == "nobody@partner.test"
    assert mine["FAIL"]["recipient-status"].startswith("550")
    assert mine["DSN"]["message-id"] == MESSAGE_ID
    ndr_id = mine["DSN"]["reference"]
    ndr = {r["event-id"] for r in rows if r["internal-message-id"] == ndr_id}
    assert ndr == {"RECEIVE", "DELIVER"}            # the report's own life: made here, dropped for carol
    # the twistd log ties the session to the queue id at the default level
    assert f"{qid}: received in session " in server.log
    assert "from <carol@example.com>, 3 recipient(s)" in server.log and f"message-id {MESSAGE_ID}" in server.log

    # Get-MessageTrackingLog, as a process, in the admins' words
    by_sender = get_tracking(server, "-Sender", "carol@example.com")
    assert {r["EventId"] for r in by_sender} == {"RECEIVE", "DELIVER", "SEND", "FAIL", "DSN"}
    by_id = get_tracking(server, "-MessageId", MESSAGE_ID.strip("<>"))
    assert {r["InternalMessageId"] for r in by_id} == {qid}
    failed = get_tracking(server, "-EventId", "fail")
    assert [r["Recipients"] for r in failed] == [["nobody@partner.test"]]
    by_rcpt = get_tracking(server, "-Recipients", "bob@partner.test", "-EventId", "SEND")
    assert [r["InternalMessageId"] for r in by_rcpt] == [qid]
    assert get_tracking(server, "-Sender", "carol@example.com", "-Start", "2000-01-01 00:00",
                        "-End", "2000-01-02") == []
    # the table, and a bad parameter named with the valid ones
    r = subprocess.run([EXEDGE, "get-messagetrackinglog", "-EventId", "FAIL", "--config", "exedge.toml"],
                       cwd=server.workdir, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "nobody@partner.test" in r.stdout and "EventId" in r.stdout.splitlines()[0]
    r = subprocess.run([EXEDGE, "ps", "Get-MessageTrackingLog -EventId FAIL | Format-List InternalMessageId,Recipients",
                        "--config", "exedge.toml"], cwd=server.workdir, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and f"InternalMessageId : {qid}" in r.stdout and "nobody@partner.test" in r.stdout
    r = subprocess.run([EXEDGE, "Get-MessageTrackingLog", "-Sendr", "x@y", "--config", "exedge.toml"],
                       cwd=server.workdir, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Sendr" in r.stderr and "Sender" in r.stderr and "Traceback" not in r.stderr


def test_unreachable_mail_is_explained_once_in_the_twistd_log(start_server):
    server = start_server(server_config(
        accepted_domains=("example.com",),
        receive_connectors=(dict(FROM_INTERNAL_ORG, tarpit_interval=0),), send_connectors=(LOCAL_DROP,)))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.sendmail("carol@example.com", ["x@nowhere.test", "y@nowhere.test", "alice@example.com"],
                   b"Subject: lost\r\n\r\nhello\r\n")
    server.wait_for(server.drop_files, what="the local copy")
    server.wait_for(lambda: "no send connector serves" in server.log, what="the Unreachable line")
    server.stop()
    lines = [line for line in server.log.splitlines() if "no send connector serves" in line]
    assert len(lines) == 1
    assert "Unreachable" in lines[0] and "nowhere.test" in lines[0] and "x@nowhere.test" in lines[0]


def test_tracking_can_be_turned_off(start_server):
    server = start_server(server_config(receive_connectors=(dict(FROM_INTERNET, tarpit_interval=0),),
                                        extra="[logs]\nmessage_tracking_log_enabled = false\n"))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.sendmail("carol@example.net", ["alice@example.com"], b"Subject: hi\r\n\r\nhello\r\n")
    server.wait_for(server.drop_files, what="delivery")
    server.stop()
    assert not os.path.exists(server.path("var", "log", "MessageTracking"))
