"""
Connection schedules on send connectors, driven by a task.Clock: queues
held outside their windows (reason "schedule", the next window as their
next retry), opened at a window's start, closed at its end with what is
in flight finishing; oversize messages on their own windows; expiry and
delay notices counting on while held; windows across DST changes and the
week's end. The config's errors name the key and line.
"""

import datetime
import os
import zoneinfo

import pytest
from twisted.internet import defer, task

from exedge.config import ConfigError, loads
from exedge.config.schedule import parse_schedule
from exedge.interfaces import NextHop, Outcome
from exedge.queue import Envelope, QueueManager, QueueStatus, Recipient, Spool
from exedge.routing import Router

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def at(*args, zone=BERLIN) -> float:
    return datetime.datetime(*args, tzinfo=zone).timestamp()


class Agent:
    """A delivery agent whose deliveries finish when the test says so (or at once)."""

    def __init__(self, name, hold=False):
        self.connector = type("C", (), {"name": name})()
        self.hold = hold
        self.calls, self.pending = [], []

    def deliver(self, message, recipients):
        self.calls.append((message.queue_id, list(recipients)))
        d = defer.Deferred()
        outcome = [Outcome(i, "delivered", "250 2.0.0 OK") for i in recipients]
        if self.hold:
            self.pending.append((d, outcome))
        else:
            d.callback(outcome)
        return d

    def finish(self):
        while self.pending:
            d, outcome = self.pending.pop(0)
            d.callback(outcome)


class Bouncer:
    def __init__(self):
        self.bounced, self.delays = [], []

    def bounce(self, message, outcomes):
        self.bounced.append([(o.index, o.enhanced, o.detail) for o in outcomes])
        return defer.succeed(None)

    def delay(self, message, indexes, reason, retry_until):
        self.delays.append((list(indexes), reason))
        return defer.succeed(None)

    def success(self, message, outcomes):
        return defer.succeed(None)


def setup(tmp_path, connector: str, *, start: float, hold=False):
    cfg = loads('[[send_connectors]]\nname = "To Branch"\naddress_spaces = ["branch.test"]\n'
                'smart_hosts = ["192.0.2.1"]\ndns_routing_enabled = false\n' + connector)
    spool = Spool(str(tmp_path / "spool"), lambda f: defer.maybeDeferred(f))
    spool.prepare()
    clock = task.Clock()
    clock.advance(start)
    agent, bouncer = Agent("To Branch", hold), Bouncer()
    manager = QueueManager(spool, Router(cfg.accepted_domains, cfg.send_connectors), {"To Branch": agent},
                           clock=clock, bouncer=bouncer)
    manager.startService()
    return manager, agent, bouncer, clock, spool


def submit(manager, spool, size=300, rcpt="bob@branch.test"):
    incoming = spool.begin()
    incoming.write(b"Subject: s\r\n\r\n" + b"x" * max(0, size - 16) + b"\r\n")
    stored = []
    incoming.commit(Envelope(sender="a@s.test", recipients=(Recipient(rcpt),), size=size,
                             received_at=manager.clock.seconds())).addCallback(stored.append)
    manager.submit(stored[0])
    return stored[0]


WORKDAYS = 'schedule = ["Mon-Fri 08:00-18:00", "Sat 09:00-09:15"]\nschedule_time_zone = "Europe/Berlin"\n'


def test_outside_its_window_a_queue_is_held_and_runs_when_the_window_opens(tmp_path):
    manager, agent, _, clock, spool = setup(tmp_path, WORKDAYS, start=at(2026, 12, 7, 6, 30))   # Monday
    stored = submit(manager, spool)
    queue = manager.queues[NextHop("To Branch", "")]
    assert (queue.status, queue.hold_reason, queue.next_retry) == (QueueStatus.Held, "schedule", at(2026, 12, 7, 8, 0))
    assert agent.calls == []
    clock.advance(at(2026, 12, 7, 8, 0) - clock.seconds() - 1)
    assert agent.calls == []
    clock.advance(1)                                            # 08:00 Berlin
    assert agent.calls == [(stored.queue_id, [0])] and queue.status is QueueStatus.Ready
    assert os.listdir(spool.queue_dir) == []


def test_a_window_that_closes_mid_delivery_lets_it_finish_and_starts_nothing_new(tmp_path):
    manager, agent, _, clock, spool = setup(tmp_path, WORKDAYS, start=at(2026, 12, 11, 17, 59), hold=True)   # Friday
    first = submit(manager, spool)
    assert agent.calls == [(first.queue_id, [0])]               # in flight
    clock.advance(60)                                           # 18:00: the window closes
    queue = manager.queues[NextHop("To Branch", "")]
    assert queue.status is QueueStatus.Held and queue.hold_reason == "schedule"
    assert queue.next_retry == at(2026, 12, 12, 9, 0)           # Saturday's quarter of an hour
    second = submit(manager, spool)
    agent.finish()                                              # the delivery in flight completes
    assert len(agent.calls) == 1 and os.listdir(spool.queue_dir) == [second.queue_id]
    clock.advance(at(2026, 12, 12, 9, 0) - clock.seconds())
    assert agent.calls[-1] == (second.queue_id, [0])
    agent.finish()
    clock.advance(15 * 60)                                      # 09:15: closed again until Monday
    assert queue.status is QueueStatus.Held and queue.next_retry == at(2026, 12, 14, 8, 0)


def test_expiry_and_delay_notices_count_on_while_a_queue_is_held(tmp_path):
    manager, agent, bouncer, clock, spool = setup(tmp_path, 'schedule = "Never"\n', start=at(2026, 12, 7, 12, 0))
    submit(manager, spool)
    queue = manager.queues[NextHop("To Branch", "")]
    assert queue.status is QueueStatus.Held and queue.hold_reason == "schedule" and queue.next_retry is None
    for _ in range(2 * 24 * 60 + 5):                            # two days and a bit, minute by minute
        clock.advance(60)
    assert agent.calls == []
    [(indexes, reason)] = bouncer.delays
    assert indexes == [0] and "connection schedule" in reason
    [[(index, status, detail)]] = bouncer.bounced
    assert (index, status) == (0, "4.4.7") and "connection schedule" in detail


def test_oversize_messages_wait_for_their_own_windows(tmp_path):
    connector = ('max_message_size = "10MB"\noversize_threshold = "2KB"\n'
                 'oversize_schedule = ["Sat 09:00-09:15"]\nschedule_time_zone = "Europe/Berlin"\n')
    manager, agent, _, clock, spool = setup(tmp_path, connector, start=at(2026, 12, 11, 12, 0))   # Friday
    small = submit(manager, spool, size=1000)
    large = submit(manager, spool, size=5000)
    assert agent.calls == [(small.queue_id, [0])]               # the normal schedule is Always
    oversize = manager.queues[NextHop("To Branch", "", "oversize")]
    assert oversize.status is QueueStatus.Held and oversize.next_retry == at(2026, 12, 12, 9, 0)
    assert str(oversize.hop) == "To Branch (oversize)"
    clock.advance(at(2026, 12, 12, 9, 0) - clock.seconds())
    assert agent.calls[-1] == (large.queue_id, [0]) and os.listdir(spool.queue_dir) == []


def test_windows_are_wall_clock_times_across_dst_and_the_weeks_end():
    berlin = parse_schedule(["Sun 08:00-09:00"])
    # 28 March 2027: clocks go from 02:00 CET to 03:00 CEST; the window stays 08:00 local
    saturday = at(2027, 3, 27, 12, 0)
    assert berlin.next_opening(saturday, BERLIN) == at(2027, 3, 28, 8, 0)
    assert datetime.datetime.fromtimestamp(berlin.next_opening(saturday, BERLIN), datetime.timezone.utc).hour == 6
    # and in winter 08:00 local is 07:00 UTC
    assert datetime.datetime.fromtimestamp(berlin.next_opening(at(2026, 12, 12, 12, 0), BERLIN),
                                           datetime.timezone.utc).hour == 7
    # a window across midnight and the week's end: Sunday 23:00 to Monday 01:00
    late = parse_schedule(["Sun 23:00-01:00"])
    sunday = at(2026, 12, 13, 22, 0)
    assert not late.is_open(sunday, BERLIN)
    assert late.next_change(sunday, BERLIN) == at(2026, 12, 13, 23, 0)
    assert late.is_open(at(2026, 12, 14, 0, 30), BERLIN)
    assert late.next_change(at(2026, 12, 14, 0, 30), BERLIN) == at(2026, 12, 14, 1, 0)
    assert not late.is_open(at(2026, 12, 14, 1, 0), BERLIN)
    # an hour the spring change skips: 02:30 is read with the offset from before it (03:30 CEST)
    skipped = parse_schedule(["Sun 02:30-05:00"])
    assert skipped.next_opening(saturday, BERLIN) == at(2027, 3, 28, 3, 30)


def test_dst_change_while_a_queue_is_held(tmp_path):
    connector = 'schedule = ["Sun 08:00-09:00"]\nschedule_time_zone = "Europe/Berlin"\n'
    manager, agent, _, clock, spool = setup(tmp_path, connector, start=at(2027, 3, 27, 12, 0))
    submit(manager, spool)
    clock.advance(at(2027, 3, 28, 8, 0) - clock.seconds() - 1)  # one second before 08:00 CEST
    assert agent.calls == []
    clock.advance(1)
    assert len(agent.calls) == 1


@pytest.mark.parametrize("value, message", [
    ('["Mon-Fri 08:05-18:00"]', "15-minute steps"),
    ('["Mon 09:00-09:00"]', "is empty"),
    ('["Mon-Fry 08:00-18:00"]', "unknown day 'Fry'"),
    ('["Mon-Fri 08:00-18:00", "Wed 17:00-19:00"]', "windows overlap"),
    ('"Sometimes"', 'expected "Always", "Never"'),
    ('[]', "non-empty list"),
])
def test_bad_schedules_are_config_errors_with_their_line(value, message):
    text = ('[[send_connectors]]\nname = "x"\naddress_spaces = ["*"]\nsmart_hosts = ["192.0.2.1"]\n'
            f'dns_routing_enabled = false\nschedule = {value}\n')
    with pytest.raises(ConfigError) as e:
        loads(text, "edge.toml")
    assert "edge.toml:6: send_connectors[0].schedule: " in str(e.value) and message in str(e.value)


def test_oversize_settings_are_checked_together():
    base = '[[send_connectors]]\nname = "x"\naddress_spaces = ["*"]\nsmart_hosts = ["192.0.2.1"]\ndns_routing_enabled = false\n'
    with pytest.raises(ConfigError) as e:
        loads(base + 'max_message_size = "10MB"\noversize_threshold = "20MB"\noversize_schedule = "Always"\n', "e.toml")
    assert "e.toml:7: send_connectors[0].oversize_threshold: is above this connector's max_message_size" in str(e.value)
    with pytest.raises(ConfigError) as e:
        loads(base + 'oversize_threshold = "2MB"\n', "e.toml")
    assert "send_connectors[0].oversize_threshold: needs oversize_schedule" in str(e.value)
    with pytest.raises(ConfigError) as e:
        loads(base + 'oversize_schedule = ["Sat 09:00-09:15"]\n', "e.toml")
    assert "send_connectors[0].oversize_schedule: needs oversize_threshold" in str(e.value)
    with pytest.raises(ConfigError) as e:
        loads(base + 'schedule_time_zone = "Europe/Bonn"\n', "e.toml")
    assert "e.toml:6: send_connectors[0].schedule_time_zone: unknown time zone 'Europe/Bonn'" in str(e.value)


def test_in_the_hour_an_autumn_change_repeats_open_and_the_next_change_agree():
    """
    Review finding: is_open read wall-clock minutes while next_change read
    first occurrences, so in the repeated hour a queue made after a
    window's close was taken for open until the next week's change.
    """
    utc = datetime.timezone.utc
    late = parse_schedule(["Sun 00:00-02:30"])      # 25 October 2026: 03:00 CEST becomes 02:00 CET
    first_0210 = datetime.datetime(2026, 10, 25, 0, 10, tzinfo=utc).timestamp()    # 02:10 CEST
    closes = datetime.datetime(2026, 10, 25, 0, 30, tzinfo=utc).timestamp()        # 02:30 CEST, the first one
    second_0210 = datetime.datetime(2026, 10, 25, 1, 10, tzinfo=utc).timestamp()   # 02:10 CET, again
    assert late.is_open(first_0210, BERLIN) and late.next_change(first_0210, BERLIN) == closes
    assert not late.is_open(second_0210, BERLIN)
    assert late.next_opening(second_0210, BERLIN) == at(2026, 11, 1, 0, 0)
    # the hour a spring change skips: the window opens when its timer fires, not half an hour before
    gap = parse_schedule(["Sun 02:30-05:00"])
    three = datetime.datetime(2027, 3, 28, 1, 0, tzinfo=utc).timestamp()           # 03:00 CEST
    assert not gap.is_open(three, BERLIN) and gap.next_change(three, BERLIN) == at(2027, 3, 28, 3, 30)
