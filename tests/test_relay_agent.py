"""
The relay agent's sessions against a real sink on loopback: connections
are reused for messages that arrive while one is open, closed when idle,
and nothing handed to a session is lost when its connection goes away.
"""

import attrs
import pytest_twisted
from twisted.internet import defer, reactor, task

from exedge.config import loads
from exedge.queue.envelope import Envelope, Recipient
from exedge.send import RelayAgent
from exedge.testing import RecordingSink


@attrs.define
class Stored:
    """What the agent needs of a spooled message."""

    queue_id: str
    envelope: Envelope
    data: bytes = b"Subject: t\r\n\r\nbody\r\n"
    unreadable: bool = False
    held: bool = False            # still in memory after its commit (RecentData)

    def in_memory(self) -> bytes | None:
        return self.data if self.held else None

    def read_data(self) -> bytes:
        if self.unreadable:
            raise OSError(5, "Input/output error")
        return self.data


def stored(n: int, **kw) -> Stored:
    env = Envelope(sender="a@s.test", recipients=(Recipient(f"r{n}@partner.test"),))
    return Stored(f"Q{n}", env, **kw)


def connector(port: int, per_connection: int = 20):
    return loads(f"""
[[send_connectors]]
name = "To partner"
address_spaces = ["partner.test"]
dns_routing_enabled = false
smart_hosts = ["127.0.0.1:{port}"]
smtp_max_messages_per_connection = {per_connection}
""").send_connectors[0]


def agent(port: int, **kw) -> RelayAgent:
    a = RelayAgent(connector(port, **kw), helo="edge01.example.com",
                   run=lambda f: defer.maybeDeferred(f), reactor=reactor)
    a.idle_time = 0.5
    return a


def statuses(outcomes):
    return [o.status for o in outcomes]


@pytest_twisted.inlineCallbacks
def test_a_message_arriving_while_a_session_is_open_reuses_its_connection():
    sink = yield RecordingSink().start(reactor)
    try:
        a = agent(sink.port)
        first = yield a.deliver(stored(1), [0]).addTimeout(10, reactor)
        second = yield a.deliver(stored(2), [0]).addTimeout(10, reactor)   # within idle_time
        assert statuses(first) == statuses(second) == ["delivered"]
        assert sink.connections == 1
        assert [m.recipient for m in sink.messages] == ["r1@partner.test", "r2@partner.test"]
        yield task.deferLater(reactor, 1.0, lambda: None)    # idle past idle_time: QUIT
        assert sink.commands[-1] == "QUIT" and a._active == 0
        third = yield a.deliver(stored(3), [0]).addTimeout(10, reactor)
        assert statuses(third) == ["delivered"] and sink.connections == 2
    finally:
        yield sink.stop()


@pytest_twisted.inlineCallbacks
def test_a_reused_session_still_stops_at_the_per_connection_limit():
    sink = yield RecordingSink().start(reactor)
    try:
        a = agent(sink.port, per_connection=2)
        for n in range(5):
            outcomes = yield a.deliver(stored(n), [0]).addTimeout(10, reactor)
            assert statuses(outcomes) == ["delivered"]
        assert len(sink.messages) == 5 and sink.connections == 3
    finally:
        yield sink.stop()


@pytest_twisted.inlineCallbacks
def test_an_unreadable_message_fails_alone():
    sink = yield RecordingSink().start(reactor)
    try:
        a = agent(sink.port)
        bad, good = a.deliver(stored(1, unreadable=True), [0]), a.deliver(stored(2), [0])
        results = yield defer.DeferredList([bad, good], consumeErrors=True).addTimeout(10, reactor)
        assert not results[0][0] and results[0][1].check(OSError)
        assert results[1] == (True, [attrs.evolve(results[1][1][0])]) and results[1][1][0].status == "delivered"
        assert [m.recipient for m in sink.messages] == ["r2@partner.test"]
    finally:
        yield sink.stop()


@pytest_twisted.inlineCallbacks
def test_messages_not_begun_when_the_connection_drops_go_to_a_new_session():
    # the sink closes each connection right after the 250 for its first
    # message: the message in flight then is deferred (its fate unknown to
    # us), those not begun go over a new connection, and none is lost
    sink = yield RecordingSink(close_after_deliveries=1).start(reactor)
    try:
        a = agent(sink.port)
        ds = [a.deliver(stored(n), [0]) for n in range(4)]
        results = yield defer.gatherResults(ds).addTimeout(10, reactor)
        assert [statuses(r) for r in results] == [["delivered"], ["deferred"], ["delivered"], ["deferred"]]
        assert [m.recipient for m in sink.messages] == ["r0@partner.test", "r2@partner.test"]
        assert sink.connections == 2
    finally:
        yield sink.stop()


@pytest_twisted.inlineCallbacks
def test_an_idle_session_closed_by_the_peer_is_forgotten():
    sink = yield RecordingSink(close_after_deliveries=1).start(reactor)
    try:
        a = agent(sink.port)
        first = yield a.deliver(stored(1), [0]).addTimeout(10, reactor)
        yield task.deferLater(reactor, 0.2, lambda: None)     # the sink hangs up on the idle session
        assert a._idle == {} and a._active == 0
        second = yield a.deliver(stored(2), [0]).addTimeout(10, reactor)
        assert statuses(first) == statuses(second) == ["delivered"] and sink.connections == 2
    finally:
        yield sink.stop()


@pytest_twisted.inlineCallbacks
def test_each_outcome_names_its_own_recipient_even_for_repeated_addresses():
    sink = yield RecordingSink(rcpt_replies={"y@partner.test": 550}).start(reactor)
    try:
        a = agent(sink.port)
        env = Envelope(sender="a@s.test", recipients=(
            Recipient("x@partner.test", ("NEVER",)), Recipient("y@partner.test"),
            Recipient("x@partner.test", ("SUCCESS",), "rfc822;x@partner.test")))
        outcomes = yield a.deliver(Stored("Q9", env), [0, 1, 2]).addTimeout(10, reactor)
        assert sorted((o.index, o.status) for o in outcomes) == [(0, "delivered"), (1, "failed"), (2, "delivered")]
        rcpts = [c for c in sink.commands if c.startswith("RCPT")]
        assert rcpts == ["RCPT TO:<x@partner.test> NOTIFY=NEVER", "RCPT TO:<y@partner.test>",
                         "RCPT TO:<x@partner.test> NOTIFY=SUCCESS ORCPT=rfc822;x@partner.test"]
    finally:
        yield sink.stop()


@pytest_twisted.inlineCallbacks
def test_a_message_still_in_memory_is_sent_without_a_trip_to_the_disk():
    sink = yield RecordingSink().start(reactor)
    try:
        reads = []
        a = RelayAgent(connector(sink.port), helo="edge01.example.com",
                       run=lambda f: reads.append(f) or defer.maybeDeferred(f), reactor=reactor)
        a.idle_time = 0.1
        held = yield a.deliver(stored(1, held=True, data=b"Subject: held\r\n\r\nx\r\n"), [0]).addTimeout(10, reactor)
        assert statuses(held) == ["delivered"] and reads == []
        on_disk = yield a.deliver(stored(2), [0]).addTimeout(10, reactor)
        assert statuses(on_disk) == ["delivered"] and len(reads) == 1
        assert sink.messages[0].data == b"Subject: held\r\n\r\nx\r\n"
    finally:
        yield sink.stop()


def test_a_cancelled_load_leaves_its_messages_to_the_agent():
    """
    Review finding: a load cancelled while the spool read was under way
    (the connection went away) requeued the batch and then failed its
    callers too, so the queue retried what the agent would also deliver.
    """
    reading = defer.Deferred()
    a = RelayAgent(connector(2525), helo="edge01.example.com", run=lambda f: reading, reactor=reactor)
    done = defer.Deferred()
    batch = [(stored(1), [0], done)]
    loading = a._load(batch, {})
    loading.cancel()
    reading.errback(OSError(5, "Input/output error"))
    assert not done.called                                      # the agent still has it, requeued
    assert a._pending[""][0][2] is done
    a._pending.clear()
