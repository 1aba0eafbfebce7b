"""
exedge's ESMTP client against a real server on loopback: the recording
sink from exedge.testing, built on stock twisted.mail (independent code).
"""

import pytest
import pytest_twisted
from twisted.internet import endpoints, protocol, reactor, task
from twisted.internet.testing import StringTransport

from exedge.send.client import (
    OutboundMessage, OutboundRecipient, SMTPClient, dot_stuff,
)
from exedge.testing import RecordingSink


def message(*rcpts, data=b"Subject: t\r\n\r\nbody\r\n", sender="a@s.test", **kw):
    return OutboundMessage(sender, tuple(OutboundRecipient(r) for r in rcpts), data, **kw)


@pytest_twisted.inlineCallbacks
def run(sink_kwargs, messages, **client_kwargs):
    sink = yield RecordingSink(**sink_kwargs).start(reactor)
    try:
        client = SMTPClient(messages, helo="edge01.example.com", clock=reactor, **client_kwargs)
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", sink.port, timeout=5)
        yield endpoint.connect(protocol.Factory.forProtocol(lambda: client))
        result = yield client.result.addTimeout(10, reactor)
        yield task.deferLater(reactor, 0.05, lambda: None)   # let the sink see QUIT
    finally:
        yield sink.stop()
    return sink, result


def statuses(result):
    return [[(r.address, r.status.value, r.code) for r in m.recipients] for m in result.messages]


@pytest.mark.parametrize("pipelining", [True, False])
@pytest_twisted.inlineCallbacks
def test_delivers_several_messages_on_one_connection(pipelining):
    sink, result = yield run({"pipelining": pipelining},
                             [message("b@x.test", "c@x.test"), message("d@x.test")])
    assert result.error is None
    assert statuses(result) == [[("b@x.test", "delivered", 250), ("c@x.test", "delivered", 250)],
                                [("d@x.test", "delivered", 250)]]
    assert [(m.sender, m.recipient) for m in sink.messages] == [
        ("a@s.test", "b@x.test"), ("a@s.test", "c@x.test"), ("a@s.test", "d@x.test")]
    assert sink.messages[0].data == b"Subject: t\r\n\r\nbody\r\n"
    assert sink.connections == 1
    assert sink.commands[0] == "EHLO edge01.example.com" and sink.commands[-1] == "QUIT"


@pytest.mark.parametrize("pipelining", [True, False])
@pytest_twisted.inlineCallbacks
def test_per_recipient_results(pipelining):
    sink, result = yield run({"pipelining": pipelining, "rcpt_replies": {"bad@x.test": 550, "later@x.test": 450}},
                             [message("ok@x.test", "bad@x.test", "later@x.test")])
    assert statuses(result) == [[("bad@x.test", "failed", 550), ("later@x.test", "deferred", 450),
                                 ("ok@x.test", "delivered", 250)]]
    assert [m.recipient for m in sink.messages] == ["ok@x.test"]


@pytest_twisted.inlineCallbacks
def test_all_recipients_refused_means_no_data_and_the_next_message_still_goes():
    sink, result = yield run({"rcpt_replies": {"bad@x.test": 550}},
                             [message("bad@x.test"), message("ok@x.test")])
    assert statuses(result) == [[("bad@x.test", "failed", 550)], [("ok@x.test", "delivered", 250)]]
    assert [m.recipient for m in sink.messages] == ["ok@x.test"]


@pytest_twisted.inlineCallbacks
def test_size_pipelining_and_dsn_parameters_used_when_offered():
    big = message("b@x.test", data=b"x" * 2000 + b"\r\n")
    small = OutboundMessage("a@s.test", (OutboundRecipient("c@x.test", ("SUCCESS", "FAILURE"), "rfc822;c@x.test"),),
                            b"hi\r\n", ret="HDRS", envid="ID1")
    sink, result = yield run({"size": 1000}, [big, small])
    assert statuses(result) == [[("b@x.test", "failed", 552)], [("c@x.test", "delivered", 250)]]
    assert result.messages[0].recipients[0].enhanced == "5.3.4"
    assert "MAIL FROM:<a@s.test> SIZE=4 RET=HDRS ENVID=ID1" in sink.commands
    assert "RCPT TO:<c@x.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c@x.test" in sink.commands
    assert not any("b@x.test" in c for c in sink.commands)   # never sent: too big


@pytest_twisted.inlineCallbacks
def test_no_dsn_parameters_to_a_peer_without_dsn():
    msg = OutboundMessage("a@s.test", (OutboundRecipient("c@x.test", ("NEVER",)),), b"hi\r\n", ret="FULL")
    sink, result = yield run({"dsn": False}, [msg])
    assert statuses(result) == [[("c@x.test", "delivered", 250)]]
    assert "MAIL FROM:<a@s.test>" in sink.commands and "RCPT TO:<c@x.test>" in sink.commands


@pytest_twisted.inlineCallbacks
def test_421_greeting_defers_everything():
    sink, result = yield run({"greeting_code": 421}, [message("b@x.test")])
    assert result.error_code == 421
    assert statuses(result) == [[("b@x.test", "deferred", 451)]]
    assert sink.messages == []


@pytest_twisted.inlineCallbacks
def test_connection_closed_in_the_middle_of_data_defers():
    sink, result = yield run({"close_after_lines": 3}, [message("b@x.test", data=b"l1\r\nl2\r\nl3\r\nl4\r\n")])
    assert statuses(result) == [[("b@x.test", "deferred", 451)]]
    assert "connection lost" in result.error


@pytest_twisted.inlineCallbacks
def test_messages_over_the_per_connection_limit_are_returned_untried():
    msgs = [message(f"r{i}@x.test") for i in range(3)]
    sink, result = yield run({}, msgs, max_messages=2)
    assert len(result.messages) == 2 and result.untried == [msgs[2]]
    assert len(sink.messages) == 2


@pytest_twisted.inlineCallbacks
def test_dot_lines_at_every_offset_arrive_byte_identical():
    # a "." line at every offset of a 70 KiB body: the stock client's chunk
    # boundary bug would end DATA early at 16 KiB
    lines, size = [], 0
    while size < 70 * 1024:
        lines.append(b"." * (1 + len(lines) % 3) + b"x" * (len(lines) % 77))
        size += len(lines[-1]) + 2
    body = b"Subject: dots\r\n\r\n" + b"\r\n".join(lines) + b"\r\n.\r\nMAIL FROM:<evil@evil.test>\r\n"
    sink, result = yield run({}, [message("b@x.test", data=body)])
    assert statuses(result) == [[("b@x.test", "delivered", 250)]]
    assert sink.messages[0].data == body
    assert not any("evil" in c for c in sink.commands)


def test_dot_stuffing_and_line_end_normalisation():
    assert dot_stuff(b".a\r\nb\r\n.\r\n..c") == b"..a\r\nb\r\n..\r\n...c\r\n.\r\n"
    assert dot_stuff(b"a\nb\r.c\r\n") == b"a\r\nb\r\n..c\r\n.\r\n"
    assert dot_stuff(b"") == b".\r\n"


def test_timeout_waiting_for_greeting_defers_on_the_clock():
    clock = task.Clock()
    client = SMTPClient([message("b@x.test")], helo="e.test", clock=clock)
    transport = StringTransport()
    client.makeConnection(transport)
    clock.advance(299)
    assert not client.result.called
    clock.advance(2)
    assert client.result.called and transport.disconnecting
    result = client.result.result
    assert "timeout" in result.error
    assert statuses(result) == [[("b@x.test", "deferred", 451)]]


@pytest.mark.parametrize("bad", [b"250 ok\rinjected\r\n", b"garbage\r\n", b"2" * 3000 + b"\r\n"])
def test_hostile_replies_end_the_session(bad):
    client = SMTPClient([message("b@x.test")], helo="e.test", clock=task.Clock())
    client.makeConnection(StringTransport())
    client.dataReceived(bad)
    result = client.result.result
    assert "protocol error" in result.error
    assert statuses(result) == [[("b@x.test", "deferred", 451)]]


def test_connector_inactivity_timeout_caps_the_rfc_waits():
    from exedge.send.client import Timeouts
    clock = task.Clock()
    client = SMTPClient([message("b@x.test")], helo="e.test", clock=clock, timeouts=Timeouts().capped(30))
    client.makeConnection(StringTransport())
    clock.advance(29)
    assert not client.result.called
    clock.advance(2)
    assert "timeout" in client.result.result.error


@pytest_twisted.inlineCallbacks
def test_body_8bitmime_declared_only_for_8bit_bodies():
    sink, result = yield run({}, [message("b@x.test", data=b"Subject: t\r\n\r\nplain\r\n"),
                                  message("c@x.test", data="Subject: t\r\n\r\nJörg\r\n".encode("utf-8"))])
    mails = [c for c in sink.commands if c.startswith("MAIL FROM")]
    assert "BODY=8BITMIME" not in mails[0] and "BODY=8BITMIME" in mails[1]


@pytest_twisted.inlineCallbacks
def test_552_to_rcpt_is_too_many_recipients_so_deferred():
    sink, result = yield run({"rcpt_replies": {"late@x.test": 552}}, [message("ok@x.test", "late@x.test")])
    assert sorted(statuses(result)[0]) == [("late@x.test", "deferred", 552), ("ok@x.test", "delivered", 250)]


def test_each_pipelined_reply_gets_its_own_rfc_wait():
    # MAIL, RCPT and DATA go in one write; once the RCPT reply is in, the
    # DATA reply is due within data_init (120 s), not another RCPT wait
    clock = task.Clock()
    transport = StringTransport()
    client = SMTPClient([message("b@x.test")], helo="e.test", clock=clock)
    client.makeConnection(transport)
    client.dataReceived(b"220 peer ready\r\n")
    client.dataReceived(b"250-peer\r\n250 PIPELINING\r\n")
    assert transport.value().endswith(b"MAIL FROM:<a@s.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n")
    client.dataReceived(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n")
    clock.advance(119)
    assert not client.result.called
    clock.advance(2)
    assert client.result.called and "timeout waiting for the DATA reply" in client.result.result.error


def test_required_tls_without_starttls_sends_no_mail():
    from twisted.internet import ssl
    transport = StringTransport()
    client = SMTPClient([message("b@x.test")], helo="e.test", clock=task.Clock(),
                        tls=ssl.CertificateOptions(), tls_required=True)
    client.makeConnection(transport)
    client.dataReceived(b"220 peer ready\r\n250-peer\r\n250 PIPELINING\r\n")
    result = client.result.result
    assert not result.started and "does not offer STARTTLS" in result.error
    assert b"MAIL" not in transport.value() and transport.value().endswith(b"QUIT\r\n")


def test_credentials_only_inside_tls_unless_plain_basic_auth_is_chosen():
    transport = StringTransport()
    client = SMTPClient([message("b@x.test")], helo="e.test", clock=task.Clock(),
                        credentials=("edge", "secret"))           # no TLS options: never inside TLS
    client.makeConnection(transport)
    client.dataReceived(b"220 peer ready\r\n250-peer\r\n250 AUTH PLAIN\r\n")
    assert b"AUTH" not in transport.value() and not client.result.result.started
    transport = StringTransport()
    client = SMTPClient([message("b@x.test")], helo="e.test", clock=task.Clock(),
                        credentials=("edge", "secret"), auth_requires_tls=False)
    client.makeConnection(transport)
    client.dataReceived(b"220 peer ready\r\n250-peer\r\n250 AUTH PLAIN\r\n")
    assert transport.value().endswith(b"AUTH PLAIN AGVkZ2UAc2VjcmV0\r\n")
    client.dataReceived(b"235 2.7.0 ok\r\n")
    assert transport.value().endswith(b"MAIL FROM:<a@s.test> AUTH=<>\r\n")   # RFC 4954 §5: nobody to vouch for


def test_auth_parameter_passed_on_only_over_an_authenticated_session():
    for credentials, expected in ((("edge", "secret"), b"MAIL FROM:<a@s.test> AUTH=app+2Bx@fabrikam.test\r\n"),
                                  (None, b"MAIL FROM:<a@s.test>\r\n")):
        transport = StringTransport()
        client = SMTPClient([message("b@x.test", auth="app+2Bx@fabrikam.test")], helo="e.test",
                            clock=task.Clock(), credentials=credentials, auth_requires_tls=False)
        client.makeConnection(transport)
        client.dataReceived(b"220 peer ready\r\n250-peer\r\n250 AUTH PLAIN\r\n")
        if credentials:
            client.dataReceived(b"235 2.7.0 ok\r\n")
        assert transport.value().endswith(expected)


@pytest_twisted.inlineCallbacks
def test_each_result_keeps_the_reply_exactly_as_received():
    # no enhanced code in the first (OpenSMTPD sends none): the status is our
    # default from the reply code, and the reply itself stays untouched
    sink, result = yield run({"rcpt_replies": {
        "bad@x.test": "550 No such user here",
        "gone@x.test": "550 5.1.1 The account does not exist\n5.1.1 Learn more at https://help.x.test/nouser"}},
        [message("bad@x.test", "gone@x.test", "ok@x.test")])
    by_address = {r.address: r for r in result.messages[0].recipients}
    bad, gone, ok = by_address["bad@x.test"], by_address["gone@x.test"], by_address["ok@x.test"]
    assert (bad.code, bad.enhanced, bad.text, bad.reply) == (550, "5.0.0", "No such user here", "550 No such user here")
    assert gone.enhanced == "5.1.1"
    assert gone.reply == "550-5.1.1 The account does not exist 550 5.1.1 Learn more at https://help.x.test/nouser"
    assert ok.status.value == "delivered" and ok.reply == "250 Delivery in progress"


@pytest_twisted.inlineCallbacks
def test_a_failed_starttls_handshake_is_reported_and_no_mail_goes_inside_it():
    from twisted.internet import ssl
    sink, result = yield run({"broken_starttls": "handshake"}, [message("b@x.test")],
                             tls=ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2))
    assert result.tls and result.tls_failed and not result.started
    assert statuses(result) == [[("b@x.test", "deferred", 451)]]
    assert sink.commands == ["EHLO edge01.example.com", "STARTTLS"]


@pytest_twisted.inlineCallbacks
def test_plain_text_after_the_starttls_220_is_never_read_as_a_reply_from_inside_tls():
    # "220 ready" and "250 injected" in one packet: the 250 came before TLS
    # began and must not pass for the answer to the EHLO sent inside it
    from twisted.internet import ssl
    sink, result = yield run({"broken_starttls": "injected"}, [message("b@x.test")],
                             tls=ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2))
    assert result.tls_failed and not result.started     # no MAIL was ever sent
    assert statuses(result) == [[("b@x.test", "deferred", 451)]]
