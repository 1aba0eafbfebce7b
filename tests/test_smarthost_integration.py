"""
Relaying through smart hosts, end to end: smtplib -> exedge (twistd) ->
a recording sink on stock twisted.mail, each in its own process.
"""

import email
import email.policy
import os
import smtplib

import pytest

from harness import FROM_INTERNAL_ORG, FROM_INTERNET, LOCAL_DROP, free_port, server_config


def config(smart_hosts):
    """example.com's edge from the Internet, relaying partner.test through C{smart_hosts} (ports on 127.0.0.1)."""
    return server_config(
        accepted_domains=("example.com", {"domain_name": "partner.test", "domain_type": "InternalRelay"}),
        receive_connectors=(dict(FROM_INTERNET, tarpit_interval=0),),
        send_connectors=(LOCAL_DROP, {"name": "To Partner", "address_spaces": ["partner.test"],
                                      "dns_routing_enabled": False,
                                      "smart_hosts": [f"127.0.0.1:{p}" for p in smart_hosts]}))


def send(server, rcpts, subject="relay test"):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        return c.sendmail("alice@example.com", rcpts,
                          f"Subject: {subject}\r\nFrom: alice@example.com\r\n\r\nhello partner\r\n".encode())


def test_relays_through_the_second_smart_host_when_the_first_is_down(start_server, sinks):
    sink = sinks("sink")
    server = start_server(config([free_port(), sink.port]))
    assert send(server, ["bob@partner.test", "carol@partner.test"]) == {}
    got = server.wait_for(lambda: len(sink.files()) == 2 and sink.files(), what="two deliveries at the sink")
    assert {f.split(b"\r\n")[1] for f in got} == {b"X-Sink-Rcpt: <bob@partner.test>",
                                                    b"X-Sink-Rcpt: <carol@partner.test>"}
    assert all(b"Subject: relay test" in f and f.endswith(b"hello partner\r\n") for f in got)
    assert all(b'receive connector "From Internet"' in f for f in got)   # our Received header
    server.wait_for(lambda: not os.listdir(server.path("var", "spool", "queue")), what="an empty spool")


def test_4xx_greeting_fails_over_to_the_next_smart_host(start_server, sinks):
    busy, good = sinks("busy", "--greeting", "421"), sinks("good")
    server = start_server(config([busy.port, good.port]))
    send(server, ["bob@partner.test"])
    server.wait_for(good.files, what="delivery at the second smart host")
    assert busy.files() == []


def test_refused_recipient_gets_an_ndr_and_the_others_are_delivered(start_server, sinks):
    sink = sinks("sink", "--refuse", "bad@partner.test=550")
    server = start_server(config([sink.port]))
    send(server, ["good@partner.test", "bad@partner.test"], subject="budget")
    server.wait_for(sink.files, what="the good recipient's delivery")
    ndrs = server.wait_for(server.drop_files, what="an NDR back to the sender")
    data = open(ndrs[0], "rb").read()
    assert data.startswith(b"X-Sender: <>\r\nX-Receiver: <alice@example.com>\r\n")
    assert b"multipart/report; report-type=delivery-status" in data
    assert b"Subject: Undeliverable: budget" in data
    assert b"Final-Recipient: rfc822; bad@partner.test" in data and b"Action: failed" in data
    assert b"Status: 5." in data and b"Remote-MTA: dns; 127.0.0.1:" in data
    assert b"good@partner.test" not in data.split(b"message/delivery-status")[1].split(b"rfc822-headers")[0]
    assert [f.split(b"\r\n")[1] for f in sink.files()] == [b"X-Sink-Rcpt: <good@partner.test>"]
    server.wait_for(lambda: not os.listdir(server.path("var", "spool", "queue")), what="an empty spool")


def test_the_ndr_quotes_the_next_hops_reply_as_received(start_server, sinks):
    # the sink's reply to bad@ carries no enhanced status code (as
    # OpenSMTPD's do); the one to gone@ has two lines
    sink = sinks("sink", "--refuse", "bad@partner.test=550 No such user here",
                 "--refuse", r"gone@partner.test=550 5.1.1 The account does not exist\n5.1.1 Try the address again")
    server = start_server(config([sink.port]))
    send(server, ["good@partner.test", "bad@partner.test", "gone@partner.test"], subject="quoting")
    ndr = email.message_from_bytes(open(server.wait_for(server.drop_files, what="the NDR")[0], "rb").read(),
                                   policy=email.policy.default)
    report = [part for part in ndr.walk() if part.get_content_type() == "message/delivery-status"][0]
    blocks = {str(b["Final-Recipient"]): b for b in report.get_payload()[1:]}
    assert set(blocks) == {"rfc822; bad@partner.test", "rfc822; gone@partner.test"}
    bad, gone = blocks["rfc822; bad@partner.test"], blocks["rfc822; gone@partner.test"]
    assert bad["Diagnostic-Code"] == "smtp; 550 No such user here"    # nothing inserted
    assert bad["Status"] == "5.0.0"                                   # our default, from the 550
    assert gone["Diagnostic-Code"] == "smtp; 550-5.1.1 The account does not exist 550 5.1.1 Try the address again"
    assert gone["Status"] == "5.1.1"


def test_no_smart_host_reachable_keeps_the_message_queued(start_server):
    server = start_server(config([free_port()]))
    send(server, ["bob@partner.test"])
    server.wait_for(lambda: "transient failure" in server.log, what="a transient failure in the log")
    assert len(os.listdir(server.path("var", "spool", "queue"))) == 1
    assert server.drop_files() == []     # no NDR for a transient failure


def test_mx_routing_delivers_to_the_mx_host_and_null_mx_bounces(start_server, sinks, dns_zones):
    sink = sinks("mx-sink", host="127.0.0.9")
    dns_port = dns_zones({"remote.test": {
        "remote.test": [["MX", 20, "mx2.remote.test"], ["MX", 10, "mx1.remote.test"]],
        "mx1.remote.test": [["A", "127.0.0.9"]], "mx2.remote.test": [["A", "127.0.0.8"]],
        "null.remote.test": [["MX", 0, "."]],
    }})
    server = start_server(server_config(
        server={"dns_servers": [f"127.0.0.1:{dns_port}"]},
        receive_connectors=(FROM_INTERNAL_ORG,),
        send_connectors=(
            LOCAL_DROP,
            {"name": "To Internet", "address_spaces": ["*"], "port": sink.port},
            {"name": "Test sink allowance", "address_spaces": ["unused.invalid"], "smart_hosts": ["127.0.0.9"],
             "dns_routing_enabled": False, "enabled": False},
        )))
    send(server, ["bob@remote.test", "eve@null.remote.test"], subject="mx test")
    got = server.wait_for(sink.files, what="delivery to the preferred MX host")
    assert got[0].split(b"\r\n")[1] == b"X-Sink-Rcpt: <bob@remote.test>"
    ndr = open(server.wait_for(server.drop_files, what="the null-MX NDR")[0], "rb").read()
    assert b"Final-Recipient: rfc822; eve@null.remote.test" in ndr and b"Status: 5.1.10" in ndr
    assert b"bob@remote.test" not in ndr.split(b"message/delivery-status")[1].split(b"rfc822-headers")[0]


def test_smart_host_names_are_resolved_through_the_configured_dns_servers(start_server, sinks, dns_zones):
    # "relay.corp.test" exists only in our DNS server: a delivery proves the
    # name went through [server].dns_servers, not the system resolver
    sink = sinks("named-sink", host="127.0.0.9")
    dns_port = dns_zones({"corp.test": {"relay.corp.test": [["A", "127.0.0.9"]]}})
    server = start_server(server_config(
        server={"dns_servers": [f"127.0.0.1:{dns_port}"]},
        accepted_domains=(),
        receive_connectors=(FROM_INTERNAL_ORG,),
        send_connectors=({"name": "To Internal Org", "address_spaces": ["*"], "dns_routing_enabled": False,
                          "smart_hosts": [f"missing.corp.test:{sink.port}", f"relay.corp.test:{sink.port}"]},)))
    send(server, ["bob@partner.test"], subject="named smart host")
    got = server.wait_for(sink.files, what="delivery to the smart host found through our DNS server")
    assert b"X-Sink-Rcpt: <bob@partner.test>" in got[0]


@pytest.mark.parametrize("sink_offers_dsn", [False, True])
def test_notify_success_gets_a_relayed_notice_only_from_a_hop_without_dsn(start_server, sinks, sink_offers_dsn):
    sink = sinks("sink", *([] if sink_offers_dsn else ["--no-dsn"]))
    server = start_server(config([sink.port]))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.sendmail("alice@example.com", ["bob@partner.test"], b"Subject: dsn\r\n\r\nhi\r\n",
                   rcpt_options=["NOTIFY=SUCCESS,FAILURE"])
    server.wait_for(sink.files, what="the relay")
    server.wait_for(lambda: not os.listdir(server.path("var", "spool", "queue")), what="an empty spool")
    notices = server.drop_files()
    if sink_offers_dsn:
        assert notices == []          # the next hop took the DSN duty over with the parameters
    else:
        data = open(notices[0], "rb").read()
        assert b"X-Sender: <>" in data and b"Action: relayed" in data and b"Subject: Relayed: dsn" in data
