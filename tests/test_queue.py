"""
The spool and the delivery queues: real files in a temporary directory,
disk work run in the calling thread, time from a task.Clock.
"""

import os

import pytest
from twisted.internet import defer, task

from exedge.cleanup import Cleanup
from exedge.config import loads
from exedge.queue import Envelope, Outcome, QueueManager, QueueStatus, Recipient, Spool
from exedge.routing import UNREACHABLE, NextHop, Router
from exedge.send import DropDirectoryAgent
from harness import config_text


def sync(f):
    return defer.maybeDeferred(f)


class ListSink:
    """The queue's intake, as far as cleanup can tell: it keeps what it is given."""

    def __init__(self, messages):
        self.messages = messages

    def submit(self, message):
        self.messages.append(message)


@pytest.fixture
def spool(tmp_path):
    s = Spool(str(tmp_path / "spool"), sync)
    s.prepare()
    return s


def envelope(*rcpts, sender="a@s.test"):
    return Envelope(sender=sender, recipients=tuple(Recipient(r) for r in rcpts), size=10)


def commit(spool, env, data=b"Subject: t\r\n\r\nbody\r\n"):
    incoming = spool.begin()
    incoming.write(data)
    return spool.run(lambda: None).addCallback(lambda _: incoming.commit(env))


def committed(spool, env, data=b"Subject: t\r\n\r\nbody\r\n"):
    results = []
    commit(spool, env, data).addCallback(results.append)
    return results[0]


def test_commit_writes_data_then_envelope_and_recovers_it(spool):
    stored = committed(spool, envelope("b@example.com", "c@example.com"))
    assert os.listdir(spool.incoming_dir) == []
    assert os.listdir(spool.queue_dir) == [stored.queue_id]
    [again] = spool.recover()
    assert again.queue_id == stored.queue_id
    assert again.envelope == stored.envelope
    assert again.read_data() == b"Subject: t\r\n\r\nbody\r\n"
    assert again.pending() == [0, 1]


def test_large_message_spills_to_disk_before_commit(spool):
    incoming = spool.begin()
    chunk = b"x" * 998 + b"\r\n"
    for _ in range(600):   # 600 KB: past the spill threshold
        incoming.write(chunk)
    assert os.path.exists(incoming.path)
    results = []
    incoming.commit(envelope("b@example.com")).addCallback(results.append)
    assert results[0].read_data() == chunk * 600


def test_recovery_removes_partial_incoming_and_quarantines_garbage(spool):
    with open(os.path.join(spool.incoming_dir, "PARTIAL"), "wb") as f:
        f.write(b"half a message")
    with open(os.path.join(spool.queue_dir, "GARBAGE"), "wb") as f:
        f.write(b"not a spool file at all, no footer here......")
    good = committed(spool, envelope("b@example.com"))
    recovered = spool.recover()
    assert [m.queue_id for m in recovered] == [good.queue_id]
    assert os.listdir(spool.incoming_dir) == []
    assert os.listdir(spool.corrupt_dir) == ["GARBAGE"]


def test_start_up_deletes_spares_and_recycled_files_without_counting_them_as_messages(spool):
    from exedge.queue.commit_worker import RECYCLED_PREFIX, SPARE_PREFIX
    for name in ("PARTIAL", f"{SPARE_PREFIX}123-0", f"{SPARE_PREFIX}123-1", f"{RECYCLED_PREFIX}5"):
        with open(os.path.join(spool.incoming_dir, name), "wb") as f:
            # a recycled file still holds the delivered message it was
            f.write(b"x" if name == "PARTIAL" else b"Subject: delivered\r\n\r\n" if "recycled" in name else b"")
    assert spool.start_recovery() == 1
    assert os.listdir(spool.incoming_dir) == []


def test_recorded_outcomes_survive_restart_and_torn_lines_are_ignored(spool):
    stored = committed(spool, envelope("b@example.com", "c@example.com", "d@example.com"))
    spool.record(stored, [0], "delivered", "ok")
    with open(os.path.join(spool.state_dir, stored.queue_id), "ab") as f:
        f.write(b'{"rcpts": [1], "sta')   # a crash in the middle of a write
    [again] = spool.recover()
    assert again.done == frozenset({0})
    assert again.pending() == [1, 2]


def test_aborted_message_leaves_nothing(spool):
    incoming = spool.begin()
    incoming.write(b"x" * (600 * 1024))
    incoming.abort()
    assert os.listdir(spool.incoming_dir) == []


class FlakyAgent:
    """A drop agent whose first N attempts fail like a full disk."""

    def __init__(self, real, failures):
        self.real, self.failures, self.attempts = real, failures, 0
        self.connector = real.connector

    def deliver(self, message, recipients):
        self.attempts += 1
        if self.attempts <= self.failures:
            return defer.fail(OSError(28, "No space left on device"))
        return self.real.deliver(message, recipients)


def manager_for(tmp_path, spool, *, failures=0, bouncer=None, clock=None):
    cfg = loads(config_text(2525, extra="").replace('drop_directory = "var/drop"',
                                                    f'drop_directory = "{tmp_path}/drop"'))
    router = Router(cfg.accepted_domains, cfg.send_connectors)
    agent = FlakyAgent(DropDirectoryAgent(cfg.send_connectors[0], sync), failures)
    clock = clock or task.Clock()
    manager = QueueManager(spool, router, {"Local drop": agent}, clock=clock, bouncer=bouncer)
    manager.startService()
    return manager, agent, clock


def drop_files(tmp_path):
    d = tmp_path / "drop"
    return sorted(os.listdir(d)) if d.exists() else []


def test_delivery_to_drop_directory_then_removed_from_spool(tmp_path, spool):
    manager, _, _ = manager_for(tmp_path, spool)
    stored = committed(spool, envelope("b@example.com", "c@example.com"))
    manager.submit(stored)
    assert drop_files(tmp_path) == [stored.queue_id + ".eml"]
    with open(tmp_path / "drop" / (stored.queue_id + ".eml"), "rb") as f:
        assert f.read() == (b"X-Sender: <a@s.test>\r\nX-Receiver: <b@example.com>\r\n"
                            b"X-Receiver: <c@example.com>\r\nSubject: t\r\n\r\nbody\r\n")
    assert os.listdir(spool.queue_dir) == [] and os.listdir(spool.state_dir) == []


def test_transient_failure_retries_on_the_clock(tmp_path, spool):
    manager, agent, clock = manager_for(tmp_path, spool, failures=2)
    stored = committed(spool, envelope("b@example.com"))
    manager.submit(stored)
    queue = manager.queues[NextHop("Local drop", "")]
    assert queue.status is QueueStatus.Retry
    assert "No space left" in queue.last_error
    assert queue.next_retry == 60
    clock.advance(59)
    assert agent.attempts == 1
    clock.advance(1)
    assert agent.attempts == 2 and queue.status is QueueStatus.Retry
    clock.advance(60)
    assert agent.attempts == 3
    assert queue.status is QueueStatus.Ready and queue.message_count == 0
    assert drop_files(tmp_path) == [stored.queue_id + ".eml"]
    assert os.listdir(spool.queue_dir) == []


def test_held_and_suspended_queues_wait_until_released(tmp_path, spool):
    manager, agent, _ = manager_for(tmp_path, spool)
    hop = NextHop("Local drop", "")
    manager.hold(hop, "waiting for ETRN")
    manager.submit(committed(spool, envelope("b@example.com")))
    assert agent.attempts == 0 and manager.queues[hop].status is QueueStatus.Held
    manager.release(hop)
    assert agent.attempts == 1 and manager.queues[hop].message_count == 0
    manager.suspend(hop)
    manager.submit(committed(spool, envelope("c@example.com")))
    assert agent.attempts == 1 and manager.queues[hop].message_count == 1
    manager.release(hop)
    assert agent.attempts == 2


def test_unroutable_recipients_wait_in_unreachable_queue_and_stay_spooled(tmp_path, spool):
    manager, agent, _ = manager_for(tmp_path, spool)
    stored = committed(spool, envelope("b@example.com", "x@elsewhere.test"))
    manager.submit(stored)
    assert agent.attempts == 1
    unreachable = manager.queues[UNREACHABLE]
    assert unreachable.status is QueueStatus.Held and unreachable.message_count == 1
    assert "no send connector" in unreachable.hold_reason
    # b@ is done, x@ is not: the message stays, with b@ recorded
    [again] = spool.recover()
    assert again.done == frozenset({0}) and again.pending() == [1]


def test_recovered_message_with_every_recipient_done_is_removed(tmp_path, spool):
    manager, agent, _ = manager_for(tmp_path, spool)
    stored = committed(spool, envelope("b@example.com"))
    spool.record(stored, [0], "delivered")   # crash came before the unlink
    [again] = spool.recover()
    manager.submit(again)
    assert agent.attempts == 0
    assert os.listdir(spool.queue_dir) == [] and os.listdir(spool.state_dir) == []


def test_restart_delivers_only_pending_recipients(tmp_path, spool):
    stored = committed(spool, envelope("b@example.com", "c@example.com"))
    spool.record(stored, [0], "delivered")
    manager, agent, _ = manager_for(tmp_path, spool)
    [again] = spool.recover()
    manager.submit(again)
    with open(tmp_path / "drop" / (stored.queue_id + ".eml"), "rb") as f:
        head = f.read(120)
    assert b"X-Receiver: <c@example.com>" in head and b"b@example.com" not in head
    assert os.listdir(spool.queue_dir) == []


def test_failed_spill_then_abort_leaves_no_partial_file(tmp_path):
    calls = []

    def run(f):
        calls.append(f)
        if len(calls) == 1:           # the spill: the disk is full
            return defer.fail(OSError(28, "No space left on device"))
        return defer.maybeDeferred(f)

    spool = Spool(str(tmp_path / "spool"), run)
    spool.prepare()
    incoming = spool.begin()
    with open(incoming.path, "wb") as f:   # what a spill had written before it failed
        f.write(b"partial")
    incoming.write(b"x" * (600 * 1024))
    incoming.abort()
    assert os.listdir(spool.incoming_dir) == []


def test_directory_fsync_failure_unpublishes_the_batch(spool, monkeypatch):
    def failing_sync():
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool._queue_sync, "sync", failing_sync)
    failures = []
    commit(spool, envelope("b@example.com")).addErrback(failures.append)
    assert failures and "Input/output error" in str(failures[0].value)
    assert os.listdir(spool.queue_dir) == [] and os.listdir(spool.incoming_dir) == []
    assert spool.recover() == []


def test_odd_state_lines_count_as_not_done_and_keep_the_message(spool):
    stored = committed(spool, envelope("b@example.com", "c@example.com"))
    with open(os.path.join(spool.state_dir, stored.queue_id), "wb") as f:
        f.write(b'{"status": "delivered"}\n[1, 2]\n{"rcpts": "x"}\n{"rcpts": [0]}\n'
                b'{"rcpts": [1], "status": "delivered"}\n')
    [again] = spool.recover()
    assert again.done == frozenset({1})   # only a line that says "delivered" (or "failed") counts
    assert os.listdir(spool.corrupt_dir) == []


class ScriptedAgent:
    """An agent whose outcome per recipient address is scripted, attempt by attempt."""

    def __init__(self, name, script):
        self.connector = type("C", (), {"name": name})()
        self.script = script          # address -> list of statuses, one per attempt
        self.calls = []

    def deliver(self, message, recipients):
        self.calls.append([message.envelope.recipients[i].address for i in recipients])
        return defer.succeed([
            Outcome(i, self.script[message.envelope.recipients[i].address].pop(0)) for i in recipients])


def scripted_manager(spool, agents, spaces, bouncer=None, route_policy=None):
    text = "".join(f'[[send_connectors]]\nname = "{n}"\naddress_spaces = ["{a}"]\ndrop_directory = "d/{n}"\n'
                   for n, a in spaces)
    cfg = loads(text)
    clock = task.Clock()
    m = QueueManager(spool, Router(cfg.accepted_domains, cfg.send_connectors), agents, clock=clock,
                     bouncer=bouncer, route_policy=route_policy)
    m.startService()
    return m, clock


def test_deferred_recipients_are_retried_later_and_the_rest_recorded(spool):
    agent = ScriptedAgent("out", {"a@x.test": ["delivered"], "b@x.test": ["deferred", "delivered"]})
    manager, clock = scripted_manager(spool, {"out": agent}, [("out", "x.test")])
    stored = committed(spool, envelope("a@x.test", "b@x.test"))
    manager.submit(stored)
    assert agent.calls == [["a@x.test", "b@x.test"]]
    assert spool.recover()[0].done == frozenset({0})          # a@ recorded durably
    clock.advance(899)
    assert len(agent.calls) == 1
    clock.advance(1)                                          # message_retry_interval
    assert agent.calls[-1] == ["b@x.test"]
    assert os.listdir(spool.queue_dir) == []


def test_item_of_a_completed_message_is_dropped_not_retried_forever(spool, monkeypatch):
    a = ScriptedAgent("A", {"a@a.test": ["delivered"]})
    b = ScriptedAgent("B", {"b@b.test": ["delivered"]})
    manager, clock = scripted_manager(spool, {"A": a, "B": b}, [("A", "a.test"), ("B", "b.test")])
    manager.suspend(NextHop("B", ""))
    real_record = spool.record
    monkeypatch.setattr(spool, "record", lambda *args: defer.fail(OSError(28, "No space left on device")))
    stored = committed(spool, envelope("a@a.test", "b@b.test"))
    manager.submit(stored)                  # A delivers, but its outcome cannot be written
    queue_a = manager.queues[NextHop("A", "")]
    # the delivery counts anyway (in memory): no retry, no second delivery
    assert queue_a.status is QueueStatus.Ready and queue_a.message_count == 0
    monkeypatch.setattr(spool, "record", real_record)
    manager.release(NextHop("B", ""))       # B completes the message: removed
    assert os.listdir(spool.queue_dir) == []
    clock.advance(60)                        # A's retry finds nothing left to do
    assert a.calls == [["a@a.test"]]
    assert queue_a.message_count == 0 and queue_a.status is QueueStatus.Ready
    assert [c for c in clock.getDelayedCalls() if "_sweep" not in repr(c)] == []


class RecordingBouncer:
    def __init__(self):
        self.bounced = []
        self.delays = []

    def bounce(self, message, outcomes):
        self.bounced.append((message.queue_id, [(o.index, o.enhanced, o.detail) for o in outcomes]))
        return defer.succeed(None)

    def delay(self, message, indexes, reason, retry_until):
        self.delays.append((message.queue_id, list(indexes), reason, retry_until))
        return defer.succeed(None)

    def success(self, message, outcomes):
        return defer.succeed(None)


def test_retry_schedule_is_glitch_retries_then_the_long_interval(tmp_path, spool):
    manager, agent, clock = manager_for(tmp_path, spool, failures=6)
    manager.submit(committed(spool, envelope("b@example.com")))
    queue = manager.queues[NextHop("Local drop", "")]
    waits = []
    while agent.attempts <= 6:
        waits.append(queue.next_retry - clock.seconds())
        clock.advance(queue.next_retry - clock.seconds())
    assert waits == [60, 60, 60, 60, 1800, 1800]
    assert queue.failures == 0 and queue.status is QueueStatus.Ready


def test_message_that_keeps_failing_expires_with_an_ndr(tmp_path, spool):
    bouncer = RecordingBouncer()
    manager, agent, clock = manager_for(tmp_path, spool, failures=10**6, bouncer=bouncer)
    stored = committed(spool, envelope("b@example.com"))
    manager.submit(stored)
    for _ in range(200):                       # bounded: two days of retries every 30 minutes
        if not os.listdir(spool.queue_dir):
            break
        clock.advance(1800)
    assert os.listdir(spool.queue_dir) == []
    [(queue_id, [(index, status, detail)])] = bouncer.bounced
    assert (queue_id, index, status) == (stored.queue_id, 0, "4.4.7")
    assert "expired after 48 hours" in detail and "No space left on device" in detail
    assert clock.seconds() >= 2 * 86400


def test_unreachable_recipients_are_returned_at_expiry(tmp_path, spool):
    bouncer = RecordingBouncer()
    manager, agent, clock = manager_for(tmp_path, spool, bouncer=bouncer)
    stored = committed(spool, envelope("b@example.com", "x@nowhere.test"))
    manager.submit(stored)
    clock.advance(2 * 86400 - 60)
    assert bouncer.bounced == [] and len(os.listdir(spool.queue_dir)) == 1
    clock.advance(120)                          # the sweep after expiry
    [(queue_id, [(index, status, detail)])] = bouncer.bounced
    assert index == 1 and status == "4.4.7" and "no send connector" in detail
    assert os.listdir(spool.queue_dir) == []
    assert manager.queues[UNREACHABLE].message_count == 0


def test_one_delay_notice_after_four_hours_even_across_a_restart(tmp_path, spool):
    bouncer = RecordingBouncer()
    manager, agent, clock = manager_for(tmp_path, spool, failures=10**6, bouncer=bouncer)
    stored = committed(spool, envelope("b@example.com"))
    manager.submit(stored)
    clock.advance(4 * 3600 - 120)
    assert bouncer.delays == []
    clock.advance(180)
    [(queue_id, indexes, reason, retry_until)] = bouncer.delays
    assert (queue_id, indexes, retry_until) == (stored.queue_id, [0], 2 * 86400)
    assert "No space left on device" in reason
    clock.advance(4 * 3600)
    assert len(bouncer.delays) == 1                      # once only
    [again] = spool.recover()
    assert again.delay_notified == frozenset({0}) and again.done == frozenset()   # still to deliver
    bouncer2 = RecordingBouncer()
    restarted, _, clock2 = manager_for(tmp_path, spool, failures=10**6, bouncer=bouncer2)
    clock2.advance(5 * 3600)
    restarted.submit(again)
    clock2.advance(120)
    assert bouncer2.delays == []                          # remembered on disk


def test_sweep_survives_a_failing_delay_notice(tmp_path, spool):
    class Broken(RecordingBouncer):
        def delay(self, *args):
            raise RuntimeError("bug")

    bouncer = Broken()
    manager, agent, clock = manager_for(tmp_path, spool, failures=10**6, bouncer=bouncer)
    manager.submit(committed(spool, envelope("b@example.com")))
    for _ in range(100):
        if bouncer.bounced:
            break
        clock.advance(1800)
    assert bouncer.bounced and bouncer.bounced[0][1][0][1] == "4.4.7"   # expiry still happened


def test_bouncer_queues_a_delay_notice_from_the_null_sender(spool):
    from exedge.dsn import Bouncer
    submitted = []
    clock = task.Clock()
    clock.advance(5 * 3600)
    env = Envelope(sender="a@s.test", recipients=(Recipient("b@x.test"), Recipient("c@x.test", ("FAILURE",))),
                   size=10, received_at=0)
    stored = committed(spool, env)
    bouncer = Bouncer(Cleanup(spool, ListSink(submitted), clock), "edge01.example.com", spool.run_delivery, clock)
    bouncer.delay(stored, [0, 1], "4.4.7 no answer", 172800)
    [notice] = submitted
    assert notice.envelope.sender == "" and [r.address for r in notice.envelope.recipients] == ["a@s.test"]
    data = notice.read_data()
    assert b"Action: delayed" in data and b"Final-Recipient: rfc822; b@x.test" in data
    assert b"c@x.test" not in data          # NOTIFY=FAILURE: no delay notice for c@


def test_message_too_large_for_every_connector_is_returned_at_once(spool):
    agent = ScriptedAgent("small", {})
    text = ('[[send_connectors]]\nname = "small"\naddress_spaces = ["x.test"]\ndrop_directory = "d/s"\n'
            'max_message_size = "64KB"\n')
    cfg = loads(text)
    bouncer = RecordingBouncer()
    manager = QueueManager(spool, Router(cfg.accepted_domains, cfg.send_connectors), {"small": agent},
                           clock=task.Clock(), bouncer=bouncer)
    manager.startService()
    env = Envelope(sender="a@s.test", recipients=(Recipient("b@x.test"), Recipient("c@y.test")), size=100_000)
    manager.submit(committed(spool, env))
    [(_, [(index, status, detail)])] = bouncer.bounced
    assert (index, status) == (0, "5.3.4") and "too large" in detail
    assert agent.calls == []
    assert manager.queues[UNREACHABLE].message_count == 1    # c@y.test: no connector at all


def test_restart_in_the_middle_of_a_retry_keeps_the_schedule_and_delivers_once(tmp_path, spool):
    manager, agent, clock = manager_for(tmp_path, spool, failures=5)
    clock.advance(1000)
    manager.submit(committed(spool, envelope("b@example.com")))
    for _ in range(4):                                   # four glitch retries fail too
        clock.advance(60)
    assert agent.attempts == 5
    queue = manager.queues[NextHop("Local drop", "")]
    assert queue.next_retry == 1240 + 1800
    # the process dies here; a new one starts at t=2000, 1040 s before the retry is due
    [again] = spool.recover()
    assert again.retry_at == 3040 and again.done == frozenset()
    restarted, agent2, clock2 = manager_for(tmp_path, spool)
    clock2.advance(2000)
    restarted.submit(again)
    clock2.advance(1039)
    assert agent2.attempts == 0
    clock2.advance(1)
    assert agent2.attempts == 1
    assert drop_files(tmp_path) == [again.queue_id + ".eml"] and os.listdir(spool.queue_dir) == []


def test_final_delivery_with_notify_success_sends_a_delivered_notice(tmp_path, spool):
    from exedge.dsn import Bouncer
    submitted = []
    clock = task.Clock()
    bouncer = Bouncer(Cleanup(spool, ListSink(submitted), clock), "edge01.example.com", spool.run_delivery, clock)
    manager, agent, clock = manager_for(tmp_path, spool, bouncer=bouncer, clock=clock)
    env = Envelope(sender="a@s.test", recipients=(Recipient("b@example.com", ("SUCCESS",)),
                                                  Recipient("c@example.com")), size=10)
    manager.submit(committed(spool, env))
    [notice] = submitted
    data = notice.read_data()
    assert notice.envelope.sender == "" and b"Action: delivered" in data and b"Status: 2.0.0" in data
    assert b"Final-Recipient: rfc822; b@example.com" in data and b"c@example.com" not in data
    assert b"Subject: Delivered: " in data or b"Subject: Delivered message" in data


def test_a_failing_success_notice_does_not_turn_a_delivery_into_a_retry(tmp_path, spool):
    class Broken(RecordingBouncer):
        def success(self, message, outcomes):
            return defer.fail(OSError(28, "No space left on device"))

    manager, agent, clock = manager_for(tmp_path, spool, bouncer=Broken())
    env = Envelope(sender="a@s.test", recipients=(Recipient("b@example.com", ("SUCCESS",)),), size=10)
    manager.submit(committed(spool, env))
    assert agent.attempts == 1 and os.listdir(spool.queue_dir) == []


def test_deferred_recipients_waiting_their_retry_also_get_a_delay_notice(spool):
    # the next hop answers 4xx for b@ on every attempt: b@ spends its time
    # waiting out message_retry_interval, outside the queue's items
    agent = ScriptedAgent("out", {"b@x.test": ["deferred"] * 100})
    bouncer = RecordingBouncer()
    manager, clock = scripted_manager(spool, {"out": agent}, [("out", "x.test")], bouncer=bouncer)
    manager.submit(committed(spool, envelope("b@x.test")))
    for _ in range(20):
        clock.advance(900)
    assert [d[1] for d in bouncer.delays] == [[0]]       # exactly one notice, for b@


def test_failed_ndr_write_never_redelivers_the_delivered_recipients(spool):
    agent = ScriptedAgent("out", {"a@x.test": ["delivered"], "b@x.test": ["failed", "failed"]})
    bouncer = RecordingBouncer()
    failures = [OSError(28, "No space left on device")]

    def bounce(message, outcomes):
        if failures:
            return defer.fail(failures.pop())
        return RecordingBouncer.bounce(bouncer, message, outcomes)

    bouncer.bounce = bounce
    manager, clock = scripted_manager(spool, {"out": agent}, [("out", "x.test")], bouncer=bouncer)
    manager.submit(committed(spool, envelope("a@x.test", "b@x.test")))
    clock.advance(900)                                   # b@ is tried again; its NDR goes out now
    assert agent.calls == [["a@x.test", "b@x.test"], ["b@x.test"]]
    assert [[i for i, _, _ in outs] for _, outs in bouncer.bounced] == [[1]]
    assert os.listdir(spool.queue_dir) == []


def test_expiry_with_a_failing_state_write_sends_one_ndr_and_ends(tmp_path, spool, monkeypatch):
    a = ScriptedAgent("A", {})
    b = ScriptedAgent("B", {})
    bouncer = RecordingBouncer()
    manager, clock = scripted_manager(spool, {"A": a, "B": b}, [("A", "a.test"), ("B", "b.test")], bouncer=bouncer)
    manager.hold(NextHop("A", ""), "waiting")
    manager.hold(NextHop("B", ""), "waiting")
    monkeypatch.setattr(spool, "record", lambda *args, **kw: defer.fail(OSError(28, "No space left on device")))
    manager.submit(committed(spool, envelope("x@a.test", "y@b.test")))
    for _ in range(2 * 24 * 60 + 20):                    # two days and a bit, minute by minute
        clock.advance(60)
    assert sorted(i for _, outs in bouncer.bounced for i, _, _ in outs) == [0, 1]   # one NDR each, once
    assert manager.queues[NextHop("A", "")].message_count == 0
    assert manager.queues[NextHop("B", "")].message_count == 0
    assert os.listdir(spool.queue_dir) == []


def _spilled_with_header(spool, header: bytes, body_lines: int):
    incoming = spool.begin()
    incoming.write(b"Received: from client.test; Mon, 23 Nov 2026 08:00:00 +0000\r\n")
    incoming.write(header)
    line = b"body line that is not a header: X-Old: no\r\n"
    for _ in range(body_lines):
        incoming.write(line)
    return incoming, len(b"Received: from client.test; Mon, 23 Nov 2026 08:00:00 +0000\r\n")


class Recording:
    """A message edit that notes the length of each piece it is applied to."""

    def __init__(self, edit, seen):
        self.edit, self.seen = edit, seen
        self.head_only, self.prefix_length = edit.head_only, edit.prefix_length

    def apply(self, data):
        self.seen.append(len(data))
        return self.edit.apply(data)


def test_header_edits_on_a_spilled_message_stream_and_equal_the_whole_transform(spool):
    from exedge.pipeline import Message
    incoming, prefix = _spilled_with_header(
        spool, b"Subject: big\r\nX-Old: 1\r\n\tfolded\r\nX-Keep: 2\r\n\r\n", 50_000)   # ~2 MiB: spilled
    assert os.path.exists(incoming.path)
    whole = []
    incoming.read_back().addCallback(whole.append)
    m = Message("a@s.test", ["b@x.test"], b"", 0)
    m.add_header("X-New", "yes")
    m.remove_header("X-Old")
    edit = m.edit(prefix)
    seen = []
    lengths = []
    incoming.rewrite(Recording(edit, seen)).addCallback(lengths.append)
    assert seen and max(seen) < 1000          # only the header section went through the transform
    after = []
    incoming.read_back().addCallback(after.append)
    assert after[0] == edit.apply(whole[0])   # the same bytes as transforming it whole
    assert lengths == [len(after[0])]
    header = after[0].split(b"\r\n\r\n", 1)[0]
    assert b"X-Old" not in header and b"folded" not in header and after[0].startswith(b"X-New: yes\r\nReceived: ")
    assert sorted(os.listdir(spool.incoming_dir)) == [incoming.queue_id]   # no temporary left
    stored = []
    incoming.commit(envelope("b@x.test")).addCallback(stored.append)
    assert stored[0].read_data() == after[0]


def test_a_replacement_or_an_unended_header_is_transformed_whole(spool):
    from exedge.pipeline import Message
    incoming, prefix = _spilled_with_header(spool, b"Subject: no end of header\r\n", 0)
    for _ in range(20_000):                   # no empty line: the whole message is header
        incoming.write(b"X-Many: header line\r\n")
    m = Message("a@s.test", ["b@x.test"], b"", 0)
    m.add_header("X-New", "yes")
    seen = []
    incoming.rewrite(Recording(m.edit(prefix), seen))
    assert seen and seen[0] > 400_000         # fell back to the whole message
    m.replace(b"Subject: replaced\r\n\r\nnew\r\n")
    assert m.edit(prefix).head_only is False


class RoutesLater:
    """A routing stage that defers (or refuses) recipients as scripted, and notes each time it is asked."""

    name, anti_spam = "routes_later", False

    def __init__(self, **verdicts):
        self.verdicts = verdicts      # recipient -> list of verdicts, one per time asked (None: keep the route)
        self.asked = []

    def on_route(self, envelope, recipient, route):
        self.asked.append(recipient)
        script = self.verdicts.get(recipient.split("@")[0], [])
        return script.pop(0) if script else None


def routing_policy(stage):
    from exedge.pipeline import Entry, Pipeline
    return Pipeline([Entry(stage)], task.Clock())


def test_a_routing_stage_that_defers_holds_that_recipient_and_asks_again_later(spool):
    """Defect: a defer_ from on_route was ignored and the recipient went out on the original route."""
    from exedge.pipeline import defer_
    from exedge.routing import ROUTE_DEFERRED
    stage = RoutesLater(b=[defer_("partner relay not reachable yet", "4.4.1")])
    agent = ScriptedAgent("out", {"a@x.test": ["delivered"], "b@x.test": ["delivered"]})
    manager, clock = scripted_manager(spool, {"out": agent}, [("out", "x.test")], route_policy=routing_policy(stage))
    manager.submit(committed(spool, envelope("a@x.test", "b@x.test")))
    assert agent.calls == [["a@x.test"]]                       # a@ goes on; b@ waits
    held = manager.queues[ROUTE_DEFERRED]
    assert held.status is QueueStatus.Held and len(held.waiting) == 1
    assert held.last_error == "4.4.1 partner relay not reachable yet"
    assert spool.recover()[0].retry_at == 900                   # a restart keeps the wait
    clock.advance(899)
    assert agent.calls == [["a@x.test"]]
    clock.advance(1)                                            # message_retry_interval: asked again
    assert stage.asked == ["a@x.test", "b@x.test", "b@x.test"]
    assert agent.calls == [["a@x.test"], ["b@x.test"]] and held.waiting == []
    assert os.listdir(spool.queue_dir) == []


def test_a_recipient_a_routing_stage_keeps_deferring_expires_with_the_stages_reason(spool):
    from exedge.pipeline import defer_
    stage = RoutesLater(b=[defer_("partner relay not reachable yet", "4.4.1")] * 1000)
    bouncer = RecordingBouncer()
    agent = ScriptedAgent("out", {})
    manager, clock = scripted_manager(spool, {"out": agent}, [("out", "x.test")], bouncer=bouncer,
                                      route_policy=routing_policy(stage))
    manager.submit(committed(spool, envelope("b@x.test")))
    for _ in range(2 * 24 * 4 + 2):                            # two days and a bit, every retry interval
        clock.advance(900)
    assert agent.calls == []
    [(_, [(index, status, detail)])] = bouncer.bounced
    assert (index, status) == (0, "4.4.7") and "partner relay not reachable yet" in detail
    assert os.listdir(spool.queue_dir) == []


def test_a_routing_refusal_whose_ndr_cannot_be_queued_is_retried_as_that_ndr(spool):
    """
    Defect: the refused recipient was parked in the held Unreachable queue
    and came back two days later as 4.4.7 with the wrong reason.
    """
    from exedge.pipeline import reject
    stage = RoutesLater(b=[reject("Recipient not authorized on this connector", "5.7.1")])
    bouncer = RecordingBouncer()
    full = [OSError(28, "No space left on device")] * 2

    def bounce(message, outcomes):
        if full:
            return defer.fail(full.pop())
        return RecordingBouncer.bounce(bouncer, message, outcomes)

    bouncer.bounce = bounce
    agent = ScriptedAgent("out", {"a@x.test": ["delivered"]})
    manager, clock = scripted_manager(spool, {"out": agent}, [("out", "x.test")], bouncer=bouncer,
                                      route_policy=routing_policy(stage))
    manager.submit(committed(spool, envelope("a@x.test", "b@x.test")))
    assert agent.calls == [["a@x.test"]] and bouncer.bounced == []
    assert UNREACHABLE not in manager.queues                    # never parked where nothing retries it
    clock.advance(60)                                           # the disk is still full
    assert bouncer.bounced == []
    clock.advance(60)
    [(_, [(index, status, detail)])] = bouncer.bounced
    assert (index, status, detail) == (1, "5.7.1", "5.7.1 Recipient not authorized on this connector")
    assert stage.asked == ["a@x.test", "b@x.test"]              # the NDR is retried, not the routing
    assert os.listdir(spool.queue_dir) == []
    clock.advance(3600)
    assert len(bouncer.bounced) == 1
