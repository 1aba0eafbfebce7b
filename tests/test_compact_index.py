"""
The queue's compact index: what waits holds a compact record, not its
parsed envelope, and the envelope read back when the message becomes
active (or a report needs it) is the one that was committed. Real files
in a temporary directory; disk work in the calling thread, or on a
ManualRun where the order of reads matters; time from a task.Clock.
"""

import gc
import os
import weakref

from twisted.internet import defer, task

from exedge.config import loads
from exedge.queue import Envelope, QueueManager, QueueStatus, Recipient, Spool
from exedge.queue.spool import StoredMessage
from exedge.routing import UNREACHABLE, NextHop, Router
from exedge.send import DropDirectoryAgent
from exedge.testing import ManualRun
from harness import config_text

DATA = b"Subject: held\r\n\r\nbody\r\n"
DROP = NextHop("Local drop", "")


def now(f):
    return defer.maybeDeferred(f)


def envelope(*rcpts):
    return Envelope(sender="a@s.test", recipients=tuple(Recipient(r, notify=("FAILURE",)) for r in rcpts),
                    size=len(DATA), envid="ENV-1", message_id="<held@s.test>", subject="held", received_at=0.0)


def committed(spool, env):
    results = []
    incoming = spool.begin()
    incoming.write(DATA)
    incoming.commit(env).addCallback(results.append)
    return results[0]


class Agent:
    """The drop agent, noting the envelope each attempt was handed."""

    def __init__(self, tmp_path, connector, run=now):
        self.real = DropDirectoryAgent(connector, run)
        self.connector = connector
        self.seen = []

    def deliver(self, message, recipients):
        self.seen.append((message.queue_id, message.loaded_envelope(), list(recipients)))   # pinned by the attempt
        return self.real.deliver(message, recipients)


class Bouncer:
    def __init__(self):
        self.bounced = []

    def bounce(self, message, outcomes):
        env = message.envelope
        self.bounced.append((message.queue_id, env.sender, env.envid,
                             [(env.recipients[o.index].address, o.enhanced) for o in outcomes]))
        return defer.succeed(None)

    def delay(self, message, indexes, reason, retry_until):
        return defer.succeed(None)

    def success(self, message, outcomes):
        return defer.succeed(None)


def manager_for(tmp_path, spool, clock=None, bouncer=None):
    cfg = loads(config_text(2525, extra="").replace('drop_directory = "var/drop"',
                                                    f'drop_directory = "{tmp_path}/drop"'))
    agent = Agent(tmp_path, cfg.send_connectors[0])
    manager = QueueManager(spool, Router(cfg.accepted_domains, cfg.send_connectors), {"Local drop": agent},
                           clock=clock or task.Clock(), bouncer=bouncer)
    manager.startService()
    return manager, agent


def read_back(directory):
    """A restart's read-back: the messages with their envelopes parsed from the files."""
    return Spool(directory, now).recover()


def test_a_message_in_a_held_queue_holds_no_envelope_and_is_delivered_whole_when_released(tmp_path):
    directory = str(tmp_path / "spool")
    spool = Spool(directory, now)
    spool.prepare()
    stored = committed(spool, envelope("b@example.com", "c@example.com"))
    [again] = read_back(directory)                  # as after a restart: its own parsed envelope
    parsed = weakref.ref(again.loaded_envelope())
    manager, agent = manager_for(tmp_path, spool)
    manager.hold(DROP, "waiting for the site")
    manager.submit(again)
    assert manager.queues[DROP].status is QueueStatus.Held and manager.queues[DROP].message_count == 1
    gc.collect()
    assert again.loaded_envelope() is None and parsed() is None    # the compact record, nothing else
    assert again.size == len(DATA) and again.recipient_count == 2 and again.pending() == [0, 1]
    manager.release(DROP)
    [(queue_id, env, rcpts)] = agent.seen
    assert queue_id == stored.queue_id and rcpts == [0, 1]
    assert env == stored.envelope                                  # read back whole: the committed one
    with open(tmp_path / "drop" / f"{stored.queue_id}.eml", "rb") as f:
        assert f.read() == b"X-Sender: <a@s.test>\r\nX-Receiver: <b@example.com>\r\nX-Receiver: <c@example.com>\r\n" + DATA
    assert os.listdir(spool.queue_dir) == []
    assert again.loaded_envelope() is None                         # the attempt let it go


def test_unreachable_mail_waits_compact_and_its_expiry_report_reads_the_envelope_back(tmp_path):
    directory = str(tmp_path / "spool")
    spool = Spool(directory, now)
    spool.prepare()
    committed(spool, envelope("b@example.com", "x@nowhere.test"))
    [again] = read_back(directory)
    bouncer = Bouncer()
    clock = task.Clock()
    manager, agent = manager_for(tmp_path, spool, clock, bouncer)
    manager.submit(again)
    assert manager.queues[UNREACHABLE].message_count == 1 and [rcpts for _, _, rcpts in agent.seen] == [[0]]
    assert again.loaded_envelope() is None
    assert manager.summary() == {"messages": 1, "bytes": len(DATA)}    # from the record
    clock.advance(2 * 86400 + 60)                                       # expired: the sweep
    assert bouncer.bounced == [(again.queue_id, "a@s.test", "ENV-1", [("x@nowhere.test", "4.4.7")])]
    assert os.listdir(spool.queue_dir) == [] and manager.summary()["messages"] == 0


def test_an_attempt_waits_for_the_envelope_read_on_a_delivery_thread(tmp_path):
    """Nothing reads a queue file on the reactor's thread: the attempt starts once the read is done."""
    directory = str(tmp_path / "spool")
    Spool(directory, now).prepare()
    committed(Spool(directory, now), envelope("b@example.com"))
    [again] = read_back(directory)
    delivery = ManualRun()
    spool = Spool(directory, now, delivery)
    manager, agent = manager_for(tmp_path, spool)
    manager.hold(DROP, "waiting")
    manager.submit(again)
    manager.release(DROP)
    assert agent.seen == [] and len(delivery.jobs) == 1         # the read, not yet run
    delivery.finish_one()
    assert [rcpts for _, _, rcpts in agent.seen] == [[0]]
    delivery.flush()
    assert os.listdir(spool.queue_dir) == []


def test_reload_routes_held_mail_again_reading_envelopes_in_steps(tmp_path):
    """Unreachable mail gets a route in a reload: read back 256 at a time, each delivered once."""
    directory = str(tmp_path / "spool")
    first = Spool(directory, now)
    first.prepare()
    for n in range(300):
        committed(first, envelope(f"r{n}@later.test"))
    delivery = ManualRun()
    spool = Spool(directory, now, delivery)
    manager, agent = manager_for(tmp_path, spool)
    for message in read_back(directory):
        manager.submit(message)
    assert manager.queues[UNREACHABLE].message_count == 300
    cfg = loads(config_text(2525, extra="").replace('drop_directory = "var/drop"', f'drop_directory = "{tmp_path}/drop"')
                .replace('address_spaces = ["example.com"]', 'address_spaces = ["example.com", "later.test"]'))
    assert "later.test" in str(cfg.send_connectors[0].address_spaces)
    manager.reconfigure(Router(cfg.accepted_domains, cfg.send_connectors), {"Local drop": agent}, manager.policy)
    assert manager.queues[UNREACHABLE].message_count == 0 and len(delivery.jobs) == 1   # one step in flight
    delivery.finish_one()
    assert len({queue_id for queue_id, _, _ in agent.seen}) == 256
    delivery.flush()
    delivered = sorted(env.recipients[0].address for _, env, _ in agent.seen)
    assert delivered == sorted(f"r{n}@later.test" for n in range(300))   # each once
    assert os.listdir(spool.queue_dir) == []


def test_new_mail_keeps_its_envelope_with_its_data_until_it_waits(tmp_path):
    """RecentData holds a new message's data and envelope for its first attempt; a held queue lets both go."""
    spool = Spool(str(tmp_path / "spool"), now)
    spool.prepare()
    manager, agent = manager_for(tmp_path, spool)
    manager.hold(DROP, "waiting")
    env = envelope("b@example.com")
    stored = committed(spool, env)
    fresh = StoredMessage(stored.queue_id, env, stored.path, stored.data_length,
                          held=spool.recent.hold(stored.queue_id, DATA))   # as the commit worker's answer builds it
    fresh.compact()
    assert fresh.loaded_envelope() is env and fresh.in_memory() == DATA     # recent: kept
    manager.submit(fresh)
    assert fresh.loaded_envelope() is None and fresh.in_memory() is None and spool.recent.size == 0


def test_mail_read_back_in_a_retry_interval_waits_compact_until_its_time(tmp_path):
    directory = str(tmp_path / "spool")
    spool = Spool(directory, now)
    spool.prepare()
    stored = committed(spool, envelope("b@example.com"))
    spool.record(stored, [0], "retry", at=600.0, durable=False)
    [again] = read_back(directory)
    clock = task.Clock()
    manager, agent = manager_for(tmp_path, spool, clock)
    manager.submit(again)
    assert again.loaded_envelope() is None and agent.seen == []
    clock.advance(600)
    [(queue_id, env, rcpts)] = agent.seen
    assert queue_id == stored.queue_id and env == stored.envelope and rcpts == [0]
    assert os.listdir(spool.queue_dir) == []


def test_an_admin_listing_reads_only_the_envelopes_it_shows(tmp_path):
    """Get-Message's first page, and one message by its id, read only their own files, oldest first."""
    directory = str(tmp_path / "spool")
    spool = Spool(directory, now)
    spool.prepare()
    for n in range(3):
        env = envelope("x@nowhere.test")                        # Unreachable: they wait
        committed(spool, Envelope(**{**{f: getattr(env, f) for f in ("sender", "recipients", "size", "envid",
                                                                     "message_id", "subject")},
                                     "received_at": float(n)}))
    oldest, middle, newest = sorted(read_back(directory), key=lambda m: m.received_at)
    manager, _ = manager_for(tmp_path, spool)
    for message in (newest, oldest, middle):
        manager.submit(message)
    assert all(m.loaded_envelope() is None for m in (oldest, middle, newest))
    os.unlink(newest.path)                   # a read of the newest would now fail: none may happen
    assert [m.identity for m in manager.message_page(limit=2)[0]] == [oldest.queue_id, middle.queue_id]
    page, total = manager.message_page(limit=1)
    assert [m.identity for m in page] == [oldest.queue_id] and total == 3
    assert manager.message_info(middle.queue_id).sender == "a@s.test"
    assert manager.message_info("NOSUCHID") is None
    assert all(m.loaded_envelope() is None for m in (oldest, middle))   # read for the listing, not kept


class Collecting:
    """An ATRN run's agent (the site's one session), noting what it was handed; it never answers."""

    def __init__(self):
        self.handed = []

    def deliver(self, message, recipients):
        env = message.loaded_envelope()          # pinned by the attempt, never read by it here
        self.handed.append((message.queue_id, [env.recipients[i].address for i in recipients]))
        return defer.Deferred()


def test_an_atrn_run_has_the_sites_held_mail_read_back_on_a_delivery_thread_first(tmp_path):
    """The collection must be handed every message before the connection turns; reading them is not the reactor's."""
    from test_etrn import HELD
    directory = str(tmp_path / "spool")
    Spool(directory, now).prepare()
    for n in range(3):
        committed(Spool(directory, now), envelope(f"u{n}@branch.fabrikam.com"))
    held = read_back(directory)
    delivery = ManualRun()
    spool = Spool(directory, now, delivery)
    cfg = loads(config_text(2525, extra=HELD))
    manager = QueueManager(spool, Router(cfg.accepted_domains, cfg.send_connectors), {}, clock=task.Clock())
    manager.startService()
    for message in held:
        manager.submit(message)
    delivery.flush()                         # routed (read back for it), then left to wait compact
    [queue] = [q for q in manager.queues.values() if q.hop.connector == "To Branch"]
    assert queue.status is QueueStatus.Held and queue.message_count == 3
    assert all(m.loaded_envelope() is None for m in held)

    def match(hop):
        return hop.connector == "To Branch"

    ready = manager.preload(match)
    assert not ready.called and delivery.jobs          # waiting for the delivery thread
    delivery.flush()
    release = ready.result
    assert all(m.loaded_envelope() is not None for m in held)
    expected = sorted((m.queue_id, [m.loaded_envelope().recipients[0].address]) for m in held)
    for message in held:
        os.unlink(message.path)                         # a read on the reactor's thread now would fail
    site = Collecting()
    result = manager.trigger(match, site)
    release()
    assert result.started and result.messages == 3
    assert sorted(site.handed) == expected
    assert not delivery.jobs                             # nothing more was read for the run


class Tracking:
    def __init__(self):
        self.events = []

    def track(self, event):
        self.events.append(event)


def test_cleanup_reports_a_received_message_from_the_envelope_it_committed_not_from_the_file(tmp_path):
    """
    Once the queue has the message it may let the envelope go at once (a
    held message is compact) or be done with it (delivered and its file
    gone, here by a drop agent that runs in the calling thread). The 250's
    log line and RECEIVE event come from the envelope cleanup committed:
    reading the file back there would block the reactor, or fail.
    """
    from exedge.cleanup import Cleanup, Transaction, Trace
    directory = str(tmp_path / "spool")
    spool = Spool(directory, now)
    spool.prepare()
    manager, agent = manager_for(tmp_path, spool)
    tracking = Tracking()
    cleanup = Cleanup(spool, manager, task.Clock(), tracking=tracking)
    receipts = []
    for rcpt in ("b@example.com", "x@nowhere.test"):        # delivered at once; held in Unreachable
        draft = cleanup.open(Trace("client.test", "127.0.0.1", 2525, "edge01.example.com", "From Internet", "S1"))
        draft.write(DATA)
        cleanup.commit(Transaction(sender="a@s.test", recipients=[Recipient(rcpt)]), None, draft,
                       b"Subject: held\r\nMessage-ID: <m@s.test>\r\n").addCallback(receipts.append)
    assert [r.code for r in receipts] == [250, 250]
    assert [(e.event_id, e.recipients, e.message_id) for e in tracking.events] == [
        ("RECEIVE", ("b@example.com",), "<m@s.test>"), ("RECEIVE", ("x@nowhere.test",), "<m@s.test>")]
    assert [rcpts for _, _, rcpts in agent.seen] == [[0]] and len(os.listdir(spool.queue_dir)) == 1


def test_a_held_messages_log_line_is_its_text_whatever_braces_its_recipients_hold(tmp_path):
    """The Unreachable line is formatted once (exedge.logs.literal): "{0}" in an address is text, never a field."""
    from twisted.logger import formatEvent, globalLogPublisher

    directory = str(tmp_path / "spool")
    spool = Spool(directory, now)
    spool.prepare()
    stored = committed(spool, envelope("{0}@NoWhere.test", "{x}}@nowhere.test"))
    manager, _ = manager_for(tmp_path, spool)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        manager.submit(stored)
    finally:
        globalLogPublisher.removeObserver(events.append)
    [line] = [formatEvent(e) for e in events if "Unreachable" in formatEvent(e)]
    assert line == (f"{stored.queue_id}: held in the Unreachable queue: no send connector serves nowhere.test "
                    "({0}@NoWhere.test, {x}}@nowhere.test)")
