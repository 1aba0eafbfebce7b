"""
Sessions in DATA at once, per receive connector and per source
(C{max_inbound_data_sessions}, C{max_inbound_data_sessions_per_source}),
and the memory one message in flight may hold.

The limits with real clients against the real server (smtplib on
loopback; sources 127.0.0.1, .4 and .5 all reach "From Internet"); every
way a data phase ends giving its slot back on a StringSession with a fake
clock, where the counts can be read from the connector table.
"""

from __future__ import annotations

import smtplib
import socket
import struct
import tracemalloc

import pytest

from twisted.internet import defer, task

from exedge.config import ConfigError, loads
from exedge.pipeline import Entry, Pipeline, Stage
from exedge.queue import Spool
from exedge.queue.incoming import SPILL_THRESHOLD
from exedge.testing import StringSession
from harness import config_text

REFUSED = (451, "4.3.2")
MESSAGE = b"From: a@sender.test\r\nTo: bob@example.com\r\nSubject: s\r\n\r\nhello\r\n"


def in_data(server, source: str = "127.0.0.1") -> smtplib.SMTP:
    """A session from C{source} that has had its 354: now sending message data."""
    c = smtplib.SMTP("127.0.0.1", server.port, timeout=10, source_address=(source, 0))
    c.ehlo("client.test")
    assert c.mail("a@sender.test")[0] == 250
    assert c.rcpt("bob@example.com")[0] == 250
    assert c.docmd("DATA")[0] == 354
    return c


def data_refused(server, source: str = "127.0.0.1") -> smtplib.SMTP:
    """A session from C{source} whose DATA is refused: too many at once."""
    c = smtplib.SMTP("127.0.0.1", server.port, timeout=10, source_address=(source, 0))
    c.ehlo("client.test")
    assert c.mail("a@sender.test")[0] == 250
    assert c.rcpt("bob@example.com")[0] == 250
    assert_refused(c)
    return c


def assert_refused(c: smtplib.SMTP) -> None:
    code, text = c.docmd("DATA")
    assert (code, text.split(b" ", 1)[0].decode()) == REFUSED, (code, text)
    assert b"Too many messages arriving at once" in text


def finish(c: smtplib.SMTP) -> None:
    """The message's data and its final dot: queued."""
    c.send(MESSAGE + b".\r\n")
    assert c.getreply()[0] == 250
    c.quit()


def test_data_sessions_per_source_are_capped(start_server):
    server = start_server(internet="max_inbound_data_sessions_per_source = 2")
    first, second = in_data(server), in_data(server)
    third = data_refused(server)
    try:
        assert "max_inbound_data_sessions_per_source reached: DATA refused" in server.log
        # per source: another address is not counted with these
        other = in_data(server, "127.0.0.4")
        finish(other)
        # the transaction stayed: once a slot is free the same session's DATA is taken
        finish(first)
        assert third.docmd("DATA")[0] == 354
        # RSET after a refusal, and a new transaction: still two in DATA (second, third)
        fourth = data_refused(server)
        assert fourth.rset()[0] == 250
        assert fourth.mail("a@sender.test")[0] == 250
        assert fourth.rcpt("bob@example.com")[0] == 250
        assert_refused(fourth)
        finish(second)
        assert fourth.docmd("DATA")[0] == 354
        finish(third)
        finish(fourth)
    finally:
        for c in (first, second, third):
            c.close()
    server.wait_for(lambda: len(server.drop_files()) == 5, what="five messages dropped")


def test_data_sessions_per_connector_are_capped_and_freed_by_a_disconnect(start_server):
    server = start_server(internet="max_inbound_data_sessions = 2\nmax_inbound_data_sessions_per_source = \"unlimited\"")
    first = in_data(server, "127.0.0.1")
    second = in_data(server, "127.0.0.4")
    waiting = data_refused(server, "127.0.0.5")
    try:
        assert "max_inbound_data_sessions reached: DATA refused" in server.log
        # the client closes its side mid-DATA (FIN): the message is dropped and its slot freed
        first.sock.shutdown(socket.SHUT_WR)
        server.wait_for(lambda: "client closed its side in the middle of the message data" in server.log,
                        what="the half-closed session's message discarded")
        assert waiting.docmd("DATA")[0] == 354
        # the freed slot went to the waiting session: the connector is full again
        third = before_data(server, "127.0.0.1")
        assert_refused(third)
        third.close()
        # the connection reset mid-DATA (RST): the slot is freed too
        lines = server.log.count(",-,")
        second.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        second.close()
        server.wait_for(lambda: server.log.count(",-,") > lines, what="the reset session's end")
        finish(in_data(server, "127.0.0.4"))
        finish(waiting)
    finally:
        for c in (first, second, waiting):
            c.close()


def before_data(server, source: str) -> smtplib.SMTP:
    """MAIL and RCPT done from C{source}; DATA not sent yet."""
    c = smtplib.SMTP("127.0.0.1", server.port, timeout=10, source_address=(source, 0))
    c.ehlo("client.test")
    assert c.mail("a@sender.test")[0] == 250
    assert c.rcpt("bob@example.com")[0] == 250
    return c


# -- every end of a data phase gives the slot back (StringSession, fake clock) ---------------

LIMITS = "max_inbound_data_sessions = 1\nmax_inbound_data_sessions_per_source = 1\nconnection_inactivity_timeout = 60"


@pytest.fixture
def session(tmp_path):
    config = loads(config_text(2525, internet=LIMITS))
    return StringSession(config, str(tmp_path / "spool"))


def start(s: StringSession) -> list[str]:
    return s.codes(b"EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")


def counted(s: StringSession) -> int:
    return s.context.connectors.in_data(s.proto.connector)


def test_final_dot_frees_the_slot(session):
    assert start(session)[-1] == "354"
    assert counted(session) == 1
    assert session.codes(MESSAGE + b".\r\n") == ["250 2.6.0"]
    assert counted(session) == 0
    # the next transaction on the same session may take it
    assert session.codes(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")[-1] == "354"


def test_a_refused_message_frees_the_slot_too(session):
    assert start(session)[-1] == "354"
    assert session.codes(b"bare\nLF\r\n.\r\n") == ["554 5.6.0"]
    assert counted(session) == 0


def test_second_session_refused_until_the_first_ends(session):
    assert start(session)[-1] == "354"
    first = session.proto
    session.reconnect()
    assert start(session)[-1] == "451 4.3.2"
    assert counted(session) == 1
    first.connectionLost()            # the first connection is gone mid-DATA
    assert counted(session) == 0
    assert session.codes(b"DATA\r\n") == ["354"]


def test_end_of_input_mid_data_frees_the_slot(session):
    assert start(session)[-1] == "354"
    session.send(b"Subject: half\r\n")
    session.proto.readConnectionLost()
    assert counted(session) == 0
    session.proto.connectionLost()
    assert counted(session) == 0      # released once, not twice


def test_data_timeout_frees_the_slot(session):
    assert start(session)[-1] == "354"
    session.send(b"Subject: slow\r\n")
    session.transport.clear()
    session.clock.advance(61)
    assert session.transport.value().startswith(b"421 4.4.2")
    assert counted(session) == 0      # at the timeout, not only once the connection is gone
    session.proto.connectionLost()
    assert counted(session) == 0


def test_refused_data_keeps_the_transaction(session):
    assert start(session)[-1] == "354"
    first = session.proto
    session.reconnect()
    assert start(session)[-1] == "451 4.3.2"
    assert session.proto.txn is not None and session.proto.txn.recipients
    assert session.proto.draft is None
    first.connectionLost()
    assert session.codes(b"DATA\r\n" + MESSAGE + b".\r\n") == ["354", "250 2.6.0"]
    assert len(session.sink.messages) == 1


class LateOnData(Stage):
    """A stage whose on_data answers when the test says (C{answer})."""

    name = "late"

    def __init__(self):
        self.answer = defer.Deferred()

    def on_data(self, session):
        return self.answer


def test_a_stage_answering_after_the_session_ended_takes_no_slot(tmp_path):
    clock = task.Clock()
    stage = LateOnData()
    s = StringSession(loads(config_text(2525, internet=LIMITS)), str(tmp_path / "spool"), clock=clock,
                      pipeline=Pipeline([Entry(stage, 0, None, 30.0)], clock))
    assert start(s)[-1:] == ["250 2.1.5"]       # DATA waits for the stage
    s.proto.connectionLost()
    stage.answer.callback(None)                 # "go on", to a session that is gone
    assert counted(s) == 0
    assert s.proto.draft is None


# -- memory held by a message in flight ------------------------------------------------------


def test_slowly_arriving_large_message_holds_at_most_the_threshold(session):
    """
    A message larger than the spill threshold, arriving in small pieces:
    the message in memory never holds more than the threshold (and the
    reader's own buffers, a line and the header section, stay small).
    """
    assert start(session)[-1] == "354"
    session.send(b"Subject: big\r\n\r\n")
    incoming = session.proto.draft.incoming
    line = b"x" * 60 + b"\r\n"
    piece = 7                      # pieces that cut lines anywhere
    stream = line * ((SPILL_THRESHOLD * 3) // len(line))
    highest = 0
    for at in range(0, len(stream), piece * 64):
        for cut in range(at, min(at + piece * 64, len(stream)), piece):
            session.proto.dataReceived(stream[cut:cut + piece])
        highest = max(highest, incoming.in_memory)
    assert highest < SPILL_THRESHOLD
    assert incoming.spilled
    assert session.codes(b".\r\n") == ["250 2.6.0"]


def test_many_tiny_writes_cost_no_more_than_their_bytes(tmp_path):
    """
    The in-memory part of a message is one buffer, not a list of the
    pieces written: a client sending empty lines one at a time makes the
    data reader write 2-byte blocks, and a Python object per block would
    cost twenty times the bytes held (megabytes per session).
    """
    spool = Spool(str(tmp_path / "spool"), lambda f: defer.maybeDeferred(f))
    spool.prepare()
    incoming = spool.begin()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range((SPILL_THRESHOLD - 1024) // 2):
            incoming.write(bytes((13, 10)))     # a new object each time, as the data reader makes them
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert incoming.in_memory == SPILL_THRESHOLD - 1024
    assert held < SPILL_THRESHOLD * 1.5, held
    incoming.abort()



# -- the keys ----------------------------------------------------------------------------------


def test_data_session_limits_parse_with_defaults_and_unlimited():
    base = '[[receive_connectors]]\nname = "R"\nbindings = ["127.0.0.1:2525"]\nremote_ip_ranges = ["10.0.0.0/8"]\n'
    rc = loads(base, source="t.toml").receive_connectors[0]
    assert (rc.max_inbound_data_sessions, rc.max_inbound_data_sessions_per_source) == (200, 20)
    rc = loads(base + 'max_inbound_data_sessions = "unlimited"\nmax_inbound_data_sessions_per_source = 3\n',
               source="t.toml").receive_connectors[0]
    assert (rc.max_inbound_data_sessions, rc.max_inbound_data_sessions_per_source) == (None, 3)
    with pytest.raises(ConfigError) as info:
        loads(base + "max_inbound_data_sessions_per_source = 0\n", source="t.toml")
    assert str(info.value.problems[0]).startswith("t.toml:5: ")
    assert "max_inbound_data_sessions_per_source" in str(info.value.problems[0])


# -- the refusals in /metrics ------------------------------------------------------------------


def test_refused_data_is_counted_per_connector_and_reason(start_server):
    from test_metrics import scrape, value
    server = start_server(internet="max_inbound_data_sessions = 2\nmax_inbound_data_sessions_per_source = 1")
    first = in_data(server, "127.0.0.1")
    same_source = data_refused(server, "127.0.0.1")
    second = in_data(server, "127.0.0.4")
    # both sessions in DATA are fresh (full credit): nobody is evicted, the connector is full
    full = data_refused(server, "127.0.0.5")
    try:
        samples = scrape(server)
        name = "exedge_data_sessions_refused_total"
        assert value(samples, name, connector="From Internet", reason="source_limit") == 1
        assert value(samples, name, connector="From Internet", reason="connector_limit") == 1
        assert value(samples, name, connector="From Internet", reason="evicted_slow") == 0
    finally:
        for c in (first, same_source, second, full):
            c.close()
