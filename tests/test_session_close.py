"""
How a session ends, on a StringTransport with a task.Clock: the half-close
(the client's EOF while answers are owed) and the close itself (the
producer let go, a bounded grace, then abort).
"""

from __future__ import annotations

import os

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from exedge.receive import SMTPServer
from exedge.testing import ManualRun
from test_protocol import Session

MESSAGE = b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n"
GRACE = SMTPServer.CLOSE_GRACE


@pytest.fixture
def session(tmp_path):
    return Session(tmp_path)


def lost(s: Session) -> None:
    """The transport reports the connection gone, as Twisted does once it is."""
    s.proto.connectionLost(Failure(ConnectionDone()))


# -- the half-close ------------------------------------------------------------


def test_answers_owed_at_the_half_close_go_out_in_order_then_the_session_closes(tmp_path):
    run = ManualRun()
    s = Session(tmp_path, run=run)
    s.send(MESSAGE + b"QUIT\r\n")
    s.transport.clear()
    s.proto.readConnectionLost()                 # EOF while the spool write is pending
    assert s.transport.value() == b"" and not s.transport.disconnecting
    run.flush()                                  # the commit worker answers after the read side is gone
    out = s.transport.value().split(b"\r\n")
    assert out[0].startswith(b"250 2.6.0 ") and out[1].startswith(b"221 2.0.0 ") and out[2:] == [b""]
    assert s.transport.disconnecting
    assert len(s.sink.messages) == 1


def test_half_close_with_nothing_owed_closes_at_once_not_at_the_idle_timeout(session):
    session.send(b"EHLO c.test\r\n")
    session.proto.readConnectionLost()
    assert session.transport.disconnecting


def test_half_close_after_the_250_closes_once_it_is_out(tmp_path):
    run = ManualRun()
    s = Session(tmp_path, run=run)
    s.send(MESSAGE)
    s.proto.readConnectionLost()
    assert not s.transport.disconnecting
    s.transport.clear()
    run.flush()
    assert s.transport.value().startswith(b"250 2.6.0 ") and s.transport.disconnecting


@pytest.mark.parametrize("tail", [b"RCPT TO:<c@exa", b"DATA\r\nSubject: y\r\n\r\nno final dot\r\n"])
def test_half_close_in_an_unfinished_command_or_message_answers_the_rest_and_queues_nothing_more(tmp_path, tail):
    run = ManualRun()
    s = Session(tmp_path, run=run)
    s.send(MESSAGE + b"MAIL FROM:<d@s.test>\r\nRCPT TO:<e@example.com>\r\n" + tail)
    s.transport.clear()
    s.proto.readConnectionLost()
    run.flush()
    replies = [line[:3] for line in s.transport.value().split(b"\r\n") if line[3:4] == b" "]
    assert replies == [b"250", b"250", b"250"] + ([b"354"] if tail.startswith(b"DATA") else [])
    assert s.transport.disconnecting
    lost(s)
    run.flush()
    assert len(s.sink.messages) == 1
    assert os.listdir(s.spool.incoming_dir) == []


def test_half_close_never_resumes_reading_the_finished_socket(tmp_path):
    """Reading again after EOF would read the EOF again (and Twisted would call readConnectionLost twice)."""
    run = ManualRun()
    s = Session(tmp_path, run=run)
    s.send(MESSAGE)
    s.proto.readConnectionLost()                 # the 250 is owed
    told = []
    s.transport.pauseProducing = lambda: told.append("pause")
    s.transport.resumeProducing = lambda: told.append("resume")
    producer = s.transport.producer
    producer.pauseProducing()                    # the client does not read its replies for a while
    producer.resumeProducing()
    assert "resume" not in told
    run.flush()
    assert s.transport.value().endswith(b"Queued mail for delivery\r\n") and s.transport.disconnecting
    assert "resume" not in told


# -- the close: the producer let go, then a bounded grace ---------------------------


def test_quit_unregisters_the_reply_producer(session):
    """Twisted's TLS layer does not start its close while a producer is registered."""
    assert session.transport.producer is not None
    session.send(b"QUIT\r\n")
    assert session.transport.disconnecting and session.transport.producer is None


@pytest.mark.parametrize("ending", ["quit", "idle", "errors"])
def test_a_close_not_finished_within_the_grace_is_aborted(session, ending):
    if ending == "quit":
        session.send(b"QUIT\r\n")
    elif ending == "idle":
        session.transport.clear()
        session.clock.advance(60)
        assert session.transport.value().startswith(b"421 4.4.2 ")
    else:
        session.send(b"BOGUS\r\n" * 5)
        assert b"421 4.7.0" in session.transport.value()
    assert session.transport.disconnecting and not session.transport.disconnected
    assert session.transport.producer is None
    session.clock.advance(GRACE - 0.1)
    assert not session.transport.disconnected
    session.clock.advance(0.1)
    assert session.transport.disconnected        # abortConnection
    lost(session)
    assert session.clock.getDelayedCalls() == []


def test_a_close_that_finishes_in_time_is_not_aborted(session):
    session.send(b"QUIT\r\n")
    session.clock.advance(GRACE / 2)
    lost(session)
    assert session.clock.getDelayedCalls() == []
    session.clock.advance(GRACE)
    assert not session.transport.disconnected


def test_refused_connection_is_aborted_after_the_grace_too(tmp_path):
    s = Session(tmp_path, internet='remote_ip_ranges = ["10.0.0.0/8"]')
    assert s.transport.value().startswith(b"554 5.7.1 ") and s.transport.disconnecting
    s.clock.advance(GRACE)
    assert s.transport.disconnected


def test_the_session_limit_ends_a_session_that_is_already_closing(tmp_path):
    s = Session(tmp_path, internet='connection_timeout = "3s"\nconnection_inactivity_timeout = "1s"')
    assert GRACE > 2
    s.transport.clear()
    s.clock.advance(1)
    assert s.transport.value().startswith(b"421 4.4.2 ") and s.transport.disconnecting
    s.clock.advance(2)                           # the session's 3 s are up before the grace is
    assert s.transport.disconnected


def test_connection_slot_is_released_when_the_connection_is_gone_not_before(tmp_path):
    s = Session(tmp_path, internet="max_inbound_connection = 1")
    s.send(b"QUIT\r\n")
    transport = StringTransport(hostAddress=s.transport.getHost(), peerAddress=s.transport.getPeer())
    second = SMTPServer(s.context)
    second.makeConnection(transport)
    assert transport.value().startswith(b"421 4.3.2 ")       # the first is closing, still there
    s.clock.advance(GRACE)
    lost(s)
    transport = StringTransport(hostAddress=s.transport.getHost(), peerAddress=s.transport.getPeer())
    SMTPServer(s.context).makeConnection(transport)
    assert transport.value().startswith(b"220 ")
