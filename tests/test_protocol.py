"""
The ESMTP state machine on a StringTransport: bytes in, bytes out, no
sockets. The spool is real (a temporary directory) but runs its disk work
in the calling thread; the clock is a task.Clock.
"""

import os

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from exedge.config import loads
from exedge.receive import ConnectorTable, ServerContext, SMTPServer
from exedge.routing import Router
from exedge.testing import ManualRun, StringSession
from harness import config_text

PORT = 2525


class Session(StringSession):
    """exedge.testing's session on the contract configuration of the tests (config_text's knobs)."""

    def __init__(self, tmp_path, peer="127.0.0.1", run=None, pipeline=None, clock=None, **knobs):
        super().__init__(loads(config_text(PORT, **knobs)), str(tmp_path / "spool"), peer=peer, run=run,
                         pipeline=pipeline, clock=clock)


@pytest.fixture
def session(tmp_path):
    return Session(tmp_path)


def test_banner_names_connector_fqdn(tmp_path):
    s = Session(tmp_path)
    assert s.transport.value() == b"220 edge01.example.com exedge ESMTP service ready\r\n"


def test_ehlo_advertises_extensions_with_size(session):
    out = session.send(b"EHLO client.test\r\n")
    assert out == (
        b"250-edge01.example.com Hello [127.0.0.1]\r\n250-SIZE 37748736\r\n250-PIPELINING\r\n"
        b"250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n"
    )


@pytest.mark.parametrize("arg", [b"", b" ", b"bad..domain", b"-x.test", b"[999.1.1.1]", b"a b"])
def test_helo_requires_domain_or_literal(session, arg):
    assert session.codes(b"EHLO " + arg + b"\r\n") == ["501 5.5.4"]
    assert session.codes(b"HELO " + arg + b"\r\n") == ["501 5.5.4"]


@pytest.mark.parametrize("arg", [b"client.test", b"[127.0.0.1]", b"[IPv6:::1]", b"host_with_underscore.test"])
def test_helo_accepts_domains_and_literals(session, arg):
    assert session.codes(b"HELO " + arg + b"\r\n") == ["250"]


def test_full_transaction_is_spooled_before_250(session):
    assert session.codes(b"EHLO c.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n") == [
        "250", "250 2.1.0", "250 2.1.5", "354"]
    out = session.send(b"Subject: x\r\n\r\n..leading dot\r\nbody\r\n.\r\n").decode()
    assert out.startswith("250 2.6.0 <") and out.endswith("> Queued mail for delivery\r\n")
    [stored] = session.sink.messages
    assert stored.queue_id in out
    assert os.path.exists(stored.path)
    data = stored.read_data()
    assert data.startswith(b"Received: from c.test ([127.0.0.1])\r\n\tby edge01.example.com")
    assert b'receive connector "From Internet"' in data
    assert data.endswith(b"Subject: x\r\n\r\n.leading dot\r\nbody\r\n")
    env = stored.envelope
    assert env.sender == "a@sender.test"
    assert [r.address for r in env.recipients] == ["b@example.com"]
    assert env.receive_connector == "From Internet"


def test_no_250_until_spool_write_completes_and_pipelined_commands_wait(tmp_path):
    run = ManualRun()
    s = Session(tmp_path, run=run)
    s.send(b"EHLO c.test\r\n")
    out = s.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nhi\r\n.\r\nNOOP\r\nQUIT\r\n")
    # the commit is pending: nothing after the 354 is answered yet
    assert out.endswith(b"354 Start mail input; end with <CRLF>.<CRLF>\r\n")
    assert not s.sink.messages
    s.transport.clear()
    run.flush()
    replies = s.transport.value().decode().split("\r\n")
    assert replies[0].startswith("250 2.6.0 <")
    assert replies[1:] == ["250 2.0.0 OK", "221 2.0.0 edge01.example.com Service closing transmission channel", ""]
    assert len(s.sink.messages) == 1


@pytest.mark.parametrize("error, reply", [
    (OSError(5, "Input/output error"), "451 4.3.0"),
    (OSError(28, "No space left on device"), "452 4.3.1"),     # Postfix's Insufficient system storage
    (OSError(122, "Disk quota exceeded"), "452 4.3.1"),
])
def test_failed_spool_write_answers_451_or_452_when_full_and_keeps_session(tmp_path, error, reply):
    def failing(f):
        return defer.fail(error)

    s = Session(tmp_path, run=failing)
    s.send(b"EHLO c.test\r\n")
    assert s.codes(b"MAIL FROM:<a@s.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nhi\r\n.\r\nNOOP\r\n") == [
        "250 2.1.0", "250 2.1.5", "354", reply, "250 2.0.0"]
    assert not s.sink.messages


def test_mail_before_helo_is_bad_sequence(session):
    assert session.codes(b"MAIL FROM:<a@b.test>\r\n") == ["503 5.5.2"]


def test_sequence_errors(session):
    session.send(b"EHLO c.test\r\n")
    assert session.codes(b"RCPT TO:<b@example.com>\r\n") == ["503 5.5.1"]
    assert session.codes(b"DATA\r\n") == ["503 5.5.1"]
    assert session.codes(b"MAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\n") == ["250 2.1.0", "503 5.5.1"]
    assert session.codes(b"DATA\r\n") == ["554 5.5.1"]   # no valid recipients


def test_rset_clears_transaction_and_ehlo_resets_too(session):
    session.send(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n")
    assert session.codes(b"RSET\r\nRCPT TO:<b@example.com>\r\n") == ["250 2.0.0", "503 5.5.1"]
    session.send(b"MAIL FROM:<a@b.test>\r\n")
    assert session.codes(b"EHLO c.test\r\nRCPT TO:<b@example.com>\r\n") == ["250", "503 5.5.1"]


def test_noop_vrfy_help_quit(session):
    assert session.codes(b"NOOP\r\nVRFY bob\r\nHELP\r\n") == ["250 2.0.0", "252 2.1.5", "214 2.0.0"]
    assert session.codes(b"QUIT\r\n") == ["221 2.0.0"]
    assert session.transport.disconnecting


def test_null_sender_and_postmaster_without_domain(session):
    session.send(b"EHLO c.test\r\n")
    assert session.codes(b"MAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\n") == ["250 2.1.0", "250 2.1.5"]


@pytest.mark.parametrize("line,expected", [
    (b"MAIL FROM:a@b.test", "501 5.1.7"),              # no angle brackets
    (b"MAIL FROM:<a@@b.test>", "501 5.1.7"),
    (b"MAIL FROM:<a.@b.test>", "501 5.1.7"),
    (b"MAIL FROM:<" + b"a" * 65 + b"@b.test>", "501 5.1.7"),
    (b"MAIL FROM:<j\xc3\xb6rg@b.test>", "553 5.6.7"),  # non-ASCII without SMTPUTF8
    (b"MAIL TO:<a@b.test>", "501 5.5.4"),
    (b"MAIL FROM:<a@b.test> SIZE=abc", "501 5.5.4"),
    (b"MAIL FROM:<a@b.test> BODY=BINARYMIME", "501 5.5.4"),
    (b"MAIL FROM:<a@b.test> RET=MAYBE", "501 5.5.4"),
    (b"MAIL FROM:<a@b.test> ENVID=bad=id", "501 5.5.4"),
    (b"MAIL FROM:<a@b.test> SMTPUTF8", "555 5.5.4"),
    (b"MAIL FROM:<a@b.test> SIZE=1 SIZE=2", "501 5.5.4"),
])
def test_mail_syntax_errors(session, line, expected):
    session.send(b"EHLO c.test\r\n")
    assert session.codes(line + b"\r\n") == [expected]


def test_dsn_parameters_are_validated_and_stored(session):
    session.send(b"EHLO c.test\r\n")
    assert session.codes(
        b"MAIL FROM:<a@s.test> RET=HDRS ENVID=QQ+2B123 BODY=8BITMIME SIZE=100\r\n"
        b"RCPT TO:<b@example.com> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b+40example.com\r\n"
        b"RCPT TO:<c@example.com> NOTIFY=NEVER\r\n"
        b"DATA\r\nhi\r\n.\r\n") == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "354", "250 2.6.0"]
    env = session.sink.messages[0].envelope
    assert (env.ret, env.envid, env.body) == ("HDRS", "QQ+2B123", "8BITMIME")
    assert env.recipients[0].notify == ("SUCCESS", "DELAY")
    assert env.recipients[0].orcpt == "rfc822;b+40example.com"
    assert env.recipients[1].notify == ("NEVER",)


@pytest.mark.parametrize("param", [b"NOTIFY=NEVER,SUCCESS", b"NOTIFY=SOMETIMES", b"NOTIFY=", b"ORCPT=b@x.test",
                                   b"ORCPT=rfc822;", b"NOTIFY=DELAY,DELAY"])
def test_bad_rcpt_dsn_parameters(session, param):
    session.send(b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\n")
    assert session.codes(b"RCPT TO:<b@example.com> " + param + b"\r\n") == ["501 5.5.4"]


def test_esmtp_parameters_need_ehlo(session):
    session.send(b"HELO c.test\r\n")
    assert session.codes(b"MAIL FROM:<a@s.test> SIZE=10\r\n") == ["555 5.5.4"]


def test_declared_size_over_limit_refused_at_mail(session):
    session.send(b"EHLO c.test\r\n")
    assert session.codes(b"MAIL FROM:<a@s.test> SIZE=37748737\r\n") == ["552 5.3.4"]
    assert session.codes(b"MAIL FROM:<a@s.test> SIZE=37748736\r\n") == ["250 2.1.0"]


def test_undeclared_oversize_refused_after_dot_and_nothing_spooled(tmp_path):
    s = Session(tmp_path, internet='max_message_size = "64KB"')
    s.send(b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    line = b"x" * 998 + b"\r\n"
    for _ in range(70):
        assert s.send(line) == b""
    assert s.codes(b".\r\nNOOP\r\n") == ["552 5.3.4", "250 2.0.0"]
    assert not s.sink.messages
    assert os.listdir(s.spool.incoming_dir) == [] and os.listdir(s.spool.queue_dir) == []


def test_externally_secured_peer_bypasses_size_limit(tmp_path):
    s = Session(tmp_path, peer="127.0.0.2", internal='max_message_size = "64KB"')
    s.send(b"EHLO c.test\r\n")
    assert s.codes(b"MAIL FROM:<a@s.test> SIZE=100000\r\n") == ["250 2.1.0"]
    s.send(b"RCPT TO:<b@example.com>\r\nDATA\r\n")
    assert s.codes(b"x" * 900 + b"\r\n") == []
    assert s.codes((b"y" * 998 + b"\r\n") * 100 + b".\r\n") == ["250 2.6.0"]


def test_recipient_limit_gives_452(tmp_path):
    s = Session(tmp_path, internet="max_recipients_per_message = 100")
    s.send(b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\n")
    codes = s.codes(b"".join(b"RCPT TO:<u%d@example.com>\r\n" % i for i in range(101)))
    assert codes == ["250 2.1.5"] * 100 + ["452 4.5.3"]


def test_data_line_too_long_rejected_after_dot_and_rest_not_run_as_commands(session):
    session.send(b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    body = b"a" * 20000 + b"\r\nMAIL FROM:<evil@evil.test>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n"
    assert session.send(body) == b""
    assert session.codes(b".\r\nNOOP\r\n") == ["554 5.6.0", "250 2.0.0"]
    assert not session.sink.messages


@pytest.mark.parametrize("sequence", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r"])
def test_bare_cr_lf_never_ends_data_and_message_is_refused(session, sequence):
    session.send(b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    smuggled = b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<x@example.com>\r\nDATA\r\nevil\r\n"
    assert session.codes(b"line1" + sequence + smuggled) == []
    assert session.codes(b".\r\n") == ["554 5.6.0"]
    assert not session.sink.messages


def test_hop_count_exceeded(session):
    session.send(b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    headers = b"".join(b"Received: from h%d.test\r\n" % i for i in range(31))
    assert session.codes(headers + b"\r\nbody\r\n.\r\n") == ["554 5.4.6"]


def test_thirty_hops_are_fine(session):
    session.send(b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    headers = b"".join(b"Received: from h%d.test\r\n" % i for i in range(30))
    assert session.codes(headers + b"\r\nReceived: in the body\r\n.\r\n") == ["250 2.6.0"]


def test_header_size_limit(tmp_path):
    s = Session(tmp_path, internet='max_header_size = "1KB"')
    s.send(b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    assert s.codes(b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 60) for i in range(20)) + b"\r\nb\r\n.\r\n") == [
        "552 5.3.4"]


def test_command_line_limit_and_resync(session):
    out = session.codes(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n")
    assert out == ["500 5.5.2", "250 2.0.0"]


def test_unterminated_huge_line_is_discarded_without_buffering(session):
    assert session.codes(b"MAIL FROM:<" + b"x" * 100000) == ["500 5.5.2"]
    assert len(session.proto._buffer) < 1024
    assert session.codes(b"y" * 5000) == []          # still the same line: no second reply
    assert session.codes(b"MAIL FROM:<evil@evil.test>\r\nNOOP\r\n") == ["250 2.0.0"]


@pytest.mark.parametrize("line", [b"NOOP\x00", b"MAIL FROM:<a@b.test>\rRSET", b"NOOP\nNOOP"])
def test_cr_lf_nul_inside_commands_refused(session, line):
    assert session.codes(line + b"\r\n") == ["500 5.5.2"]


def test_protocol_error_limit_closes_with_421(session):
    out = session.send(b"BOGUS\r\n" * 4)
    assert out.count(b"500 5.5.1") == 4 and not session.transport.disconnecting
    out = session.send(b"BOGUS\r\nNOOP\r\n")
    assert out.endswith(b"421 4.7.0 Too many errors on this connection, closing transmission channel\r\n")
    assert b"250" not in out
    assert session.transport.disconnecting


def test_tarpit_delays_errors_for_anonymous_peers_in_order(tmp_path):
    s = Session(tmp_path, tarpit="5")
    assert s.send(b"BOGUS\r\nNOOP\r\n") == b""
    s.clock.advance(4.9)
    assert s.transport.value() == b""
    s.clock.advance(0.2)
    assert s.transport.value() == b"500 5.5.1 Command unrecognized\r\n250 2.0.0 OK\r\n"


def test_no_tarpit_for_externally_secured_peer(tmp_path):
    s = Session(tmp_path, peer="127.0.0.2", tarpit="5")
    assert s.codes(b"BOGUS\r\n") == ["500 5.5.1"]


def test_inactivity_timeout(session):
    session.clock.advance(59)
    session.send(b"NOOP\r\n")
    session.clock.advance(59)
    assert not session.transport.disconnecting
    session.transport.clear()
    session.clock.advance(2)
    assert session.transport.value().startswith(b"421 4.4.2 ")
    assert session.transport.disconnecting


def test_total_connection_timeout_even_when_busy(session):
    for _ in range(9):
        session.clock.advance(30)
        assert session.codes(b"NOOP\r\n") == ["250 2.0.0"]
    session.transport.clear()
    session.clock.advance(30)
    assert session.transport.value().startswith(b"421 4.4.2 ")
    assert session.transport.disconnecting


def test_anonymous_relay_refused_and_accepted_domain_allowed(session):
    session.send(b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\n")
    assert session.codes(b"RCPT TO:<x@evil.test>\r\nRCPT TO:<Bob@EXAMPLE.COM>\r\n") == ["550 5.7.54", "250 2.1.5"]


@pytest.mark.parametrize("rcpt", [
    b"<user%evil.test@example.com>", b"<evil.test!user@example.com>", b'<"user@evil.test"@example.com>',
    b"<@example.com:user@evil.test>", b"<@example.com,@x.test:user@example.com>", b"<user@[127.0.0.1]>",
    b"<user@sub.example.com>", b"<user@evil.test>",
])
def test_relay_tricks_refused(session, rcpt):
    session.send(b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\n")
    assert session.codes(b"RCPT TO:" + rcpt + b"\r\n") == ["550 5.7.54"]


def test_trailing_dot_domain_refused(session):
    session.send(b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\n")
    assert session.codes(b"RCPT TO:<user@example.com.>\r\n") == ["501 5.1.3"]


def test_externally_secured_peer_may_relay(tmp_path):
    s = Session(tmp_path, peer="127.0.0.3")
    s.send(b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\n")
    assert s.codes(b"RCPT TO:<x@evil.test>\r\nRCPT TO:<y@[192.0.2.1]>\r\n") == ["250 2.1.5", "250 2.1.5"]


def test_unknown_peer_refused_554(tmp_path):
    config = config_text(PORT).replace('remote_ip_ranges = ["0.0.0.0-255.255.255.255"]',
                                       'remote_ip_ranges = ["10.0.0.0/8"]')
    cfg = loads(config)
    table = ConnectorTable(cfg.receive_connectors)
    assert table.select("127.0.0.1", PORT, "127.0.0.1") is None
    ctx = ServerContext(server=cfg.server, connectors=table, router=Router((), ()), cleanup=None,
                        clock=task.Clock())
    transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", PORT),
                                peerAddress=IPv4Address("TCP", "127.0.0.1", 5))
    SMTPServer(ctx).makeConnection(transport)
    assert transport.value().startswith(b"554 5.7.1 ")
    assert transport.disconnecting


def test_disconnect_mid_data_discards_partial_message(tmp_path):
    s = Session(tmp_path)
    s.send(b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    s.send(b"x" * 998 + b"\r\n")
    s.proto.connectionLost(None)
    assert os.listdir(s.spool.incoming_dir) == []
    assert not s.sink.messages


def test_pending_answer_pauses_socket_only_when_client_keeps_talking(tmp_path):
    run = ManualRun()
    s = Session(tmp_path, run=run)
    s.send(b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nhi\r\n.\r\n")
    assert s.proto.paused and s.transport.producerState == "producing"
    s.send(b"NOOP\r\n" * 20000)              # 120 KB while the 250 is pending
    assert s.transport.producerState == "paused"
    s.transport.clear()
    run.flush()
    out = s.transport.value()
    assert out.startswith(b"250 2.6.0 ") and out.count(b"250 2.0.0 OK") == 20000
    assert s.transport.producerState == "producing"


def test_cr_at_chunk_end_after_overlong_line_does_not_swallow_next_command(session):
    session.send(b"EHLO c.test\r\n")
    assert session.codes(b"X" * 600 + b"\r") == ["500 5.5.2"]
    assert session.codes(b"\nMAIL FROM:<a@s.test>\r\nRCPT TO:<b@example.com>\r\n") == ["250 2.1.0", "250 2.1.5"]


def test_client_that_does_not_read_replies_stops_being_read(session):
    producer = session.transport.producer
    assert producer is not None and session.transport.streaming
    producer.pauseProducing()                  # the transport's write buffer is full
    assert session.transport.producerState == "paused"
    assert session.send(b"EHLO a.test\r\n" * 1000) == b""   # nothing processed, nothing written
    producer.resumeProducing()
    assert session.transport.producerState == "producing"
    assert session.transport.value().count(b"250 8BITMIME\r\n") == 1000


def test_idle_timer_waits_for_our_own_slow_queue_write(tmp_path):
    run = ManualRun()
    s = Session(tmp_path, run=run)
    s.send(b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nhi\r\n.\r\n")
    s.transport.clear()
    s.clock.advance(61)                        # the disk is slow, not the client
    assert s.transport.value() == b"" and not s.transport.disconnecting
    run.flush()
    assert s.transport.value().startswith(b"250 2.6.0 ")
    s.clock.advance(61)
    assert b"421 4.4.2" in s.transport.value() and s.transport.disconnecting


def test_session_time_limit_during_queue_write_sends_the_answer_first(tmp_path):
    run = ManualRun()
    s = Session(tmp_path, run=run)
    for _ in range(5):
        s.clock.advance(59.8)                  # 299 s of a busy session
        assert s.codes(b"NOOP\r\n") == ["250 2.0.0"]
    s.send(b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nhi\r\n.\r\n")
    s.transport.clear()
    s.clock.advance(2)
    assert s.transport.value() == b""
    run.flush()
    replies = s.transport.value().split(b"\r\n")
    assert replies[0].startswith(b"250 2.6.0 ") and replies[1].startswith(b"421 4.4.2 ")
    assert s.transport.disconnecting


def test_queue_sink_failure_after_commit_still_acknowledges(tmp_path):
    s = Session(tmp_path)

    def broken(message):
        raise RuntimeError("routing bug")

    s.sink.submit = broken
    s.send(b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<b@example.com>\r\n")
    assert s.codes(b"DATA\r\nhi\r\n.\r\nNOOP\r\n") == ["354", "250 2.6.0", "250 2.0.0"]
    assert len(os.listdir(s.spool.queue_dir)) == 1   # durable: recovered at the next start


def test_slow_disk_stops_reading_message_data_until_spills_are_written(tmp_path):
    run = ManualRun()
    s = Session(tmp_path, run=run, peer="127.0.0.2")   # no size limit in the way
    s.send(b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    line = b"z" * 998 + b"\r\n"
    block = line * 1000                                   # ~1 MB per write
    s.send(b"Subject: big\r\n\r\n")
    for _ in range(5):
        assert s.transport.producerState == "producing"
        s.send(block)
    assert s.transport.producerState == "paused"          # > 4 MiB waits for the disk
    run.flush()                                           # the spills reach the file
    assert s.transport.producerState == "producing"
    assert s.codes(b".\r\n") == []                        # the commit waits for its thread too
    run.flush()
    assert s.transport.value().startswith(b"250 2.6.0 ")
    assert s.sink.messages[0].data_length > 5 * 1000 * 1000


def auth_session(tmp_path, **knobs):
    from exedge.auth.credentials import CredentialsFile, FileChecker, portal_for
    users = tmp_path / "users.txt"
    CredentialsFile(str(users)).add("smtpgateway@fabrikam.com", "pw-1")
    s = Session(tmp_path, internet='auth_mechanisms = ["BasicAuth"]\n'
                                   'permission_groups = ["AnonymousUsers", "ExchangeUsers"]\n' + knobs.pop("internet", ""),
                **knobs)
    s.context.portal = portal_for(FileChecker(str(users), lambda f: defer.maybeDeferred(f)))
    s.send(b"EHLO client.test\r\n")
    return s


def plain(user: bytes, password: bytes) -> bytes:
    import base64
    return b"AUTH PLAIN " + base64.b64encode(b"\0" + user + b"\0" + password) + b"\r\n"


def test_failed_auth_is_answered_after_the_auth_tarpit_on_the_clock(tmp_path):
    s = auth_session(tmp_path, internet='auth_tarpit_interval = "5"\nmax_logon_failures = 2\n')
    assert s.send(plain(b"smtpgateway@fabrikam.com", b"wrong")) == b""
    s.clock.advance(4.9)
    assert s.transport.value() == b""
    s.clock.advance(0.2)
    assert s.transport.value().startswith(b"535 5.7.8")
    assert s.send(b"NOOP\r\n").startswith(b"250")            # the session goes on
    s.send(plain(b"smtpgateway@fabrikam.com", b"wrong again"))
    s.clock.advance(5)
    assert s.transport.value().startswith(b"421 4.7.0") and s.transport.disconnecting


def test_success_is_not_tarpitted_and_mail_parameter_auth_is_accepted(tmp_path):
    s = auth_session(tmp_path, internet='auth_tarpit_interval = "5"\n')
    assert s.codes(plain(b"SMTPGATEWAY@fabrikam.com", b"pw-1")) == ["235 2.7.0"]
    assert s.codes(b"MAIL FROM:<alice@example.com> AUTH=<>\r\n") == ["250 2.1.0"]
    assert s.codes(b"RCPT TO:<bob@partner.test>\r\n") == ["250 2.1.5"]     # relay as ExchangeUsers


def test_auth_not_offered_without_basic_auth_and_ehlo_lists_it_when_offered(tmp_path):
    s = auth_session(tmp_path)
    assert s.send(b"EHLO client.test\r\n").endswith(b"250 AUTH PLAIN LOGIN\r\n")
    (tmp_path / "x").mkdir()
    plain_session = Session(tmp_path / "x")
    plain_session.send(b"EHLO client.test\r\n")
    assert plain_session.codes(plain(b"a", b"b")) == ["502 5.5.1"]


@pytest.mark.parametrize("peer,expected", [("127.0.0.2", "app+40fabrikam.test"), ("127.0.0.1", None)])
def test_mail_auth_parameter_kept_only_from_trusted_sessions(tmp_path, peer, expected):
    s = Session(tmp_path, peer=peer)
    s.send(b"EHLO client.test\r\n")
    assert s.codes(b"MAIL FROM:<app@partner.test> AUTH=app+40fabrikam.test\r\n") == ["250 2.1.0"]
    assert s.proto.txn.auth == expected
    assert s.codes(b"RSET\r\n") == ["250 2.0.0"]
    assert s.codes(b"MAIL FROM:<app@partner.test> AUTH=bad=xtext\r\n") == ["501 5.5.4"]


def test_mail_auth_parameter_of_an_authenticated_user_is_that_user(tmp_path):
    s = auth_session(tmp_path)
    assert s.codes(plain(b"smtpgateway@fabrikam.com", b"pw-1")) == ["235 2.7.0"]
    assert s.codes(b"MAIL FROM:<alice@example.com> AUTH=<>\r\n") == ["250 2.1.0"]
    assert s.proto.txn.auth == "smtpgateway@fabrikam.com"


def test_session_ids_are_16_hex_digits_and_never_repeat():
    from exedge.receive.protocol import new_session_id
    ids = [new_session_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 16 and int(i, 16) >= 0 and i == i.upper() for i in ids)


def test_envelope_size_is_the_octets_stored_and_sent(session):
    """
    Defect: Envelope.size was the client's octets while its comment (and
    routing against a send connector's max_message_size) meant the message
    as stored and sent, our Received field included.
    """
    session.send(b"EHLO client.test\r\nMAIL FROM:<a@partner.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    assert session.codes(b"Subject: size\r\n\r\nbody\r\n.\r\n") == ["250 2.6.0"]
    [stored] = session.sink.messages
    data = stored.read_data()
    assert data.startswith(b"Received: ") and stored.envelope.size == len(data) == stored.data_length


def test_a_clients_braces_reach_the_log_as_they_are():
    """The hot lines are their own format (exedge.logs.literal): a client's "{...}" is text, never a field."""
    from twisted.logger import formatEvent, globalLogPublisher

    from exedge.logs import ProtocolLog
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        ProtocolLog("From Internet", "S1", True, "127.0.0.1:25", "127.0.0.1:4000").received(b"HELO {evil} {0} {} {")
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if e.get("log_namespace") == "exedge.protocol"]
    assert formatEvent(event) == "From Internet,S1,127.0.0.1:25,127.0.0.1:4000,<,HELO {evil} {0} {} {"
    assert event["data"] == "HELO {evil} {0} {} {"
