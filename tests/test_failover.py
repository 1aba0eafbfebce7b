"""
Failover between send connectors by cost (Exchange: "a cost of 1 for the
faster connection and a cost of 50 for the slower, dial-up connection; the
slower connection is used when the faster is down"): recipients move to
the dearer connector for the same address space at once when every host
of the cheaper one fails at the connection level, new mail follows until
the cheaper one answers again, and a 5xx or any other failure moves
nothing. The queue's clock is a task.Clock; the last tests use real
relay agents and sinks on loopback.
"""

import contextlib
import os
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher

from exedge.config import loads
from exedge.interfaces import NextHop, NextHopUnreachable, Outcome
from exedge.queue import Envelope, QueueManager, QueueStatus, Recipient, Spool
from exedge.routing import Router
from exedge.send import RelayAgent
from exedge.testing import RecordingSink


class Agent:
    """Delivers, refuses with 5xx, or finds every host down, as told."""

    def __init__(self, name, mode="deliver"):
        self.connector = type("C", (), {"name": name})()
        self.mode = mode
        self.calls = []

    def deliver(self, message, recipients):
        self.calls.append([message.envelope.recipients[i].address for i in recipients])
        if self.mode == "down":
            return defer.fail(NextHopUnreachable("127.0.0.1:2: ConnectionRefusedError"))
        if self.mode == "broken":
            return defer.fail(OSError(28, "No space left on device"))
        status = "failed" if self.mode == "refuse" else "delivered"
        return defer.succeed([Outcome(i, status, "550 5.1.1 no" if status == "failed" else "250 ok",
                                      "5.1.1" if status == "failed" else "") for i in recipients])


class NoBounces:
    def bounce(self, message, outcomes):
        return defer.succeed(None)

    def success(self, message, outcomes):
        return defer.succeed(None)

    def delay(self, *args):
        return defer.succeed(None)


CONNECTORS = """
[[send_connectors]]
name = "Fast link"
address_spaces = ["branch.test;1"]
smart_hosts = ["192.0.2.1"]
dns_routing_enabled = false
{fast}
[[send_connectors]]
name = "Dial-up"
address_spaces = ["branch.test;50"]
smart_hosts = ["192.0.2.2"]
dns_routing_enabled = false
{slow}
[[send_connectors]]
name = "Internet"
address_spaces = ["*"]
smart_hosts = ["192.0.2.3"]
dns_routing_enabled = false
"""


@contextlib.contextmanager
def logged():
    lines = []

    def observe(event):
        if "failover" in str(event.get("log_format", "")):
            from twisted.logger import formatEvent
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


def setup(tmp_path, fast="", slow="", modes=("down", "deliver", "deliver"), agents=None, clock=None):
    cfg = loads(CONNECTORS.format(fast=fast, slow=slow))
    spool = Spool(str(tmp_path / "spool"), lambda f: defer.maybeDeferred(f))
    spool.prepare()
    clock = clock or task.Clock()
    if agents is None:
        agents = {c.name: Agent(c.name, mode) for c, mode in zip(cfg.send_connectors, modes)}
    manager = QueueManager(spool, Router(cfg.accepted_domains, cfg.send_connectors), agents, clock=clock,
                           bouncer=NoBounces())
    manager.startService()
    return manager, agents, clock, spool


def submit(manager, spool, *rcpts):
    incoming = spool.begin()
    incoming.write(b"Subject: t\r\n\r\nbody\r\n")
    stored = []
    incoming.commit(Envelope(sender="a@s.test", recipients=tuple(Recipient(r) for r in rcpts), size=100,
                             received_at=manager.clock.seconds())).addCallback(stored.append)
    manager.submit(stored[0])
    return stored[0]


def test_when_the_cheap_connector_is_down_its_recipients_move_to_the_dearer_one_at_once(tmp_path):
    with logged() as lines:
        manager, agents, clock, spool = setup(tmp_path)
        submit(manager, spool, "bob@branch.test")
        assert agents["Fast link"].calls == [["bob@branch.test"]]
        assert agents["Dial-up"].calls == [["bob@branch.test"]]          # the same instant: no retry wait
        assert agents["Internet"].calls == []                          # "*" is not the same address space
        assert os.listdir(spool.queue_dir) == []
        assert manager.queues[NextHop("Fast link", "")].status is QueueStatus.Retry
        # new mail follows while the cheap connector counts as down
        submit(manager, spool, "carol@branch.test")
        assert agents["Fast link"].calls == [["bob@branch.test"]] and agents["Dial-up"].calls[-1] == ["carol@branch.test"]
        assert any("Fast link" in line and "Dial-up" in line for line in lines)
        # at its retry interval it is tried again with new mail, and answers
        agents["Fast link"].mode = "deliver"
        clock.advance(60)
        submit(manager, spool, "dave@branch.test")
        assert agents["Fast link"].calls[-1] == ["dave@branch.test"] and len(agents["Dial-up"].calls) == 2
        assert any("answers again" in line and "Fast link" in line for line in lines)


def test_what_waits_in_the_cheap_queue_moves_too(tmp_path):
    manager, agents, clock, spool = setup(tmp_path, modes=("deliver", "deliver", "deliver"))
    manager.suspend(NextHop("Fast link", ""))
    submit(manager, spool, "bob@branch.test")
    submit(manager, spool, "carol@branch.test")
    agents["Fast link"].mode = "down"
    manager.release(NextHop("Fast link", ""))                          # the first attempt finds the hosts down
    assert agents["Dial-up"].calls == [["bob@branch.test"], ["carol@branch.test"]]
    assert os.listdir(spool.queue_dir) == []


def test_a_permanent_answer_or_any_other_failure_moves_nothing(tmp_path):
    manager, agents, clock, spool = setup(tmp_path, modes=("refuse", "deliver", "deliver"))
    submit(manager, spool, "bob@branch.test")
    assert agents["Dial-up"].calls == []                               # 5xx: the recipient fails, no failover
    agents["Fast link"].mode = "broken"
    submit(manager, spool, "carol@branch.test")
    assert agents["Dial-up"].calls == []                               # not a connection-level failure
    queue = manager.queues[NextHop("Fast link", "")]
    assert queue.status is QueueStatus.Retry and queue.message_count == 1


def test_without_a_fallback_the_recipients_wait_for_the_retry_as_before(tmp_path):
    manager, agents, clock, spool = setup(tmp_path, modes=("down", "down", "deliver"))
    submit(manager, spool, "bob@branch.test")
    assert agents["Dial-up"].calls == [["bob@branch.test"]]            # tried, down as well
    assert agents["Internet"].calls == []
    waiting = [q for q in manager.queues.values() if q.message_count]
    assert len(waiting) == 1 and waiting[0].status is QueueStatus.Retry
    before = len(agents["Fast link"].calls) + len(agents["Dial-up"].calls)
    clock.advance(1)
    assert len(agents["Fast link"].calls) + len(agents["Dial-up"].calls) == before   # no busy loop


def test_a_connector_outside_its_window_counts_as_down_only_when_another_is_open(tmp_path):
    manager, agents, clock, spool = setup(tmp_path, fast='schedule = "Never"\n',
                                          modes=("deliver", "deliver", "deliver"))
    submit(manager, spool, "bob@branch.test")
    assert agents["Dial-up"].calls == [["bob@branch.test"]] and agents["Fast link"].calls == []
    (tmp_path / "2").mkdir()
    manager, agents, clock, spool = setup(tmp_path / "2", fast='schedule = "Never"\n', slow='schedule = "Never"\n',
                                          modes=("deliver", "deliver", "deliver"))
    submit(manager, spool, "bob@branch.test")
    assert agents["Dial-up"].calls == [] and agents["Fast link"].calls == []
    assert manager.queues[NextHop("Fast link", "")].hold_reason == "schedule"   # waits for its own window


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relay_agents(fast_port, slow_port, clock):
    cfg = loads(CONNECTORS.format(fast="", slow="").replace('"192.0.2.1"', f'"127.0.0.1:{fast_port}"')
                .replace('"192.0.2.2"', f'"127.0.0.1:{slow_port}"'))
    return {c.name: RelayAgent(c, helo="edge01.example.com", run=lambda f: defer.maybeDeferred(f),
                               reactor=reactor, clock=clock) for c in cfg.send_connectors}


@pytest_twisted.inlineCallbacks
def wait_for(predicate, seconds=10.0):
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        yield task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("timed out")


@pytest.mark.parametrize("fast_peer", ["nothing listens", "421 greeting"])
@pytest_twisted.inlineCallbacks
def test_over_real_sockets_the_dial_up_link_carries_the_mail_and_the_fast_link_takes_over_again(tmp_path, fast_peer):
    slow = yield RecordingSink().start(reactor)
    fast_port = free_port()
    fast = None
    if fast_peer == "421 greeting":
        fast = yield RecordingSink(greeting_code=421).start(reactor, port=fast_port)
    clock = task.Clock()
    agents = relay_agents(fast_port, slow.port, clock)
    manager, _, _, spool = setup(tmp_path, agents=agents, clock=clock)
    try:
        submit(manager, spool, "bob@branch.test")
        yield wait_for(lambda: slow.messages)
        assert [m.recipient for m in slow.messages] == ["bob@branch.test"]
        # the fast link comes back; at its retry interval new mail takes it again
        if fast is not None:
            yield fast.stop()
        fast = yield RecordingSink().start(reactor, port=fast_port)
        clock.advance(60)
        submit(manager, spool, "carol@branch.test")
        yield wait_for(lambda: fast.messages)
        assert [m.recipient for m in fast.messages] == ["carol@branch.test"] and len(slow.messages) == 1
    finally:
        manager.stopService()
        yield slow.stop()
        if fast is not None:
            yield fast.stop()


@pytest_twisted.inlineCallbacks
def test_over_real_sockets_a_5xx_greeting_is_an_answer_not_a_down_link(tmp_path):
    slow = yield RecordingSink().start(reactor)
    fast = yield RecordingSink(greeting_code=554).start(reactor)
    clock = task.Clock()
    manager, _, _, spool = setup(tmp_path, agents=relay_agents(fast.port, slow.port, clock), clock=clock)
    try:
        submit(manager, spool, "bob@branch.test")
        queue = manager.queues[NextHop("Fast link", "")]
        yield wait_for(lambda: queue.status is QueueStatus.Retry)
        assert slow.messages == [] and queue.message_count == 1
    finally:
        manager.stopService()
        yield slow.stop()
        yield fast.stop()


def test_a_fallback_that_refuses_the_sender_is_no_fallback_the_mail_waits(tmp_path):
    """
    Review finding: failover picked the dial-up link without asking its
    delivery restrictions, and what it refused was bounced 5.7.1 (or left
    through the "*" connector) instead of waiting for the fast link.
    """
    manager, agents, clock, spool = setup(tmp_path, slow='accept_messages_only_from = ["*@fabrikam.com"]\n')
    bounced = []
    manager.bouncer.bounce = lambda message, outcomes: (bounced.append(outcomes), defer.succeed(None))[1]
    outsider = submit(manager, spool, "bob@branch.test")                     # from a@s.test
    assert agents["Dial-up"].calls == [] and agents["Internet"].calls == [] and bounced == []
    queue = manager.queues[NextHop("Fast link", "")]
    assert queue.status is QueueStatus.Retry and queue.message_count == 1   # waits for the fast link
    incoming = spool.begin()
    incoming.write(b"Subject: t\r\n\r\nbody\r\n")
    stored = []
    incoming.commit(Envelope(sender="alice@fabrikam.com", recipients=(Recipient("carol@branch.test"),), size=100,
                             received_at=clock.seconds())).addCallback(stored.append)
    manager.submit(stored[0])
    assert agents["Dial-up"].calls == [["carol@branch.test"]]              # the dial-up link takes its own
    assert os.listdir(spool.queue_dir) == [outsider.queue_id]
