"""
Recovery in the background: the spool is read back in steps while new
mail is accepted. In process, the steps run when the test says so (a
ManualRun as the spool's delivery threads); then a real server is killed
in the middle of its recovery and started again.
"""

import collections
import csv
import os
import re
import smtplib
import time

from twisted.internet import defer, task

from exedge.config import loads
from exedge.logs import tracking
from exedge.manage.client import ManagementClient
from exedge.queue import Envelope, QueueManager, Recipient, Spool
from exedge.queue.intake import Intake
from exedge.queue.recovery import Recovery
from exedge.queue.spool import envelope_footer, new_queue_id
from exedge.routing import Router
from exedge.send import DropDirectoryAgent
from exedge.testing import ManualRun, StringSession
from harness import Server, config_text, free_port

MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>\r$", re.M)


def fill(spool_directory: str, count: int, *, rcpt: str = "rcpt@example.com", tag: str = "old") -> dict[str, str]:
    """
    C{count} committed messages in a spool as a previous run leaves them
    (the spool's own ids and file format; not fsync'ed: nothing crashes
    while a test fills). Returns queue id -> the Message-ID in its data.
    """
    queue = os.path.join(spool_directory, "queue")
    os.makedirs(queue, exist_ok=True)
    made = {}
    for n in range(count):
        queue_id = new_queue_id()
        token = f"{tag}-{n}@recovery.test"
        data = (b"Message-ID: <%s>\r\nSubject: left in the spool\r\n\r\nbody %d\r\n" % (token.encode(), n))
        env = Envelope(sender="a@sender.test", recipients=(Recipient(rcpt),), size=len(data),
                       received_at=time.time(), message_id=f"<{token}>")
        with open(os.path.join(queue, queue_id), "wb") as f:
            f.write(data + envelope_footer(env))
        made[queue_id] = token
    return made


def now(f):
    return defer.maybeDeferred(f)


class Counting:
    """A queue's intake that counts what it is given, then passes it on (or keeps it)."""

    def __init__(self, then=None):
        self.submits = collections.Counter()
        self.then = then

    def submit(self, message):
        self.submits[message.queue_id] += 1
        if self.then is not None:
            self.then(message)


def recovering(directory: str, step: int):
    """A spool whose recovery has begun, its steps run when the test says: (spool, delivery, counting, recovery)."""
    delivery = ManualRun()
    spool = Spool(directory, now, delivery)
    counting = Counting()
    recovery = Recovery(spool, counting.submit, delivery, task.Clock(), step=step)
    recovery.start()
    return spool, delivery, counting, recovery


def steps(run: ManualRun, recovery: Recovery, limit: int = 10_000) -> int:
    """Run recovery's steps to its end (bounded); how many it took."""
    for n in range(limit):
        if not recovery.recovering:
            return n
        run.finish_one()
    raise AssertionError("recovery did not end")


MAIL = (b"EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<new@example.com>\r\nDATA\r\n"
        b"Message-ID: <new@recovery.test>\r\n\r\nnew\r\n.\r\n")


def test_new_mail_is_accepted_while_old_mail_is_read_back_and_each_is_announced_once(tmp_path):
    directory = str(tmp_path / "spool")
    old = fill(directory, 2000)
    spool, delivery, counting, recovery = recovering(directory, step=100)
    # nothing read yet, and the queue directory is open to new mail already
    assert recovery.recovering and recovery.recovered == 0 and len(delivery.jobs) == 1
    config = loads(config_text(free_port()))
    session = StringSession(config, directory, spool=spool)
    codes = session.codes(MAIL)
    assert codes[-1] == "250 2.6.0", codes            # accepted before a single old message was read
    [new] = session.sink.messages
    assert os.path.exists(new.path)                    # on disk while queue/ is read: recovery meets it
    delivery.finish_one()
    # a step reads 100 files; when the directory lists the new message among
    # them (about one run in twenty) it is skipped there: its commit announced it
    first_step = recovery.recovered
    assert recovery.recovering and first_step in (99, 100)
    # one more accepted in the middle
    assert StringSession(config, directory, spool=spool).codes(MAIL)[-1] == "250 2.6.0"
    assert recovery.status() == {"recovering": True, "recovered": first_step}
    steps(delivery, recovery)
    assert recovery.done.called and recovery.recovered == 2000
    assert set(counting.submits) == set(old)           # every old message, none of the new ones
    assert set(counting.submits.values()) == {1}       # each once


def test_a_receive_workers_commit_during_recovery_is_announced_once_whichever_comes_first(tmp_path):
    """
    A receive worker commits into the same queue/ and names the message to
    the main process over its socket: recovery may read the file before
    the name arrives (then recovery announces it and the worker's
    announcement is dropped), or after (then recovery leaves it).
    """
    directory = str(tmp_path / "spool")
    old = fill(directory, 50)
    spool, delivery, counting, recovery = recovering(directory, step=100)
    [raced] = fill(directory, 1, tag="worker-before-its-name")      # on disk, its name not yet here
    [named] = fill(directory, 1, tag="worker-named")
    spool.note_begun(named)                                          # its name came first
    steps(delivery, recovery)
    assert set(counting.submits) == set(old) | {raced}
    assert set(counting.submits.values()) == {1}
    spool.note_begun(raced)                                          # the name, late
    assert spool.announced_by_recovery(raced) is True                # so the worker's announcement is dropped
    assert spool.announced_by_recovery(raced) is False               # once
    assert spool.announced_by_recovery(named) is False               # the worker announces this one


def test_a_message_gone_before_its_step_is_not_recovered_nor_set_aside(tmp_path):
    directory = str(tmp_path / "spool")
    old = fill(directory, 300)
    spool, delivery, counting, recovery = recovering(directory, step=10)
    delivery.finish_one()
    unread = sorted(set(old) - set(counting.submits))[:20]
    for queue_id in unread:                              # removed meanwhile (delivered, or by an admin)
        os.unlink(os.path.join(spool.queue_dir, queue_id))
    steps(delivery, recovery)
    assert set(counting.submits) == set(old) - set(unread)
    assert set(counting.submits.values()) == {1}
    assert os.listdir(spool.corrupt_dir) == []
    # and a name listed whose file has gone by the time it is read
    assert spool.read_back([unread[0]]) == []
    assert os.listdir(spool.corrupt_dir) == []


def test_messages_delivered_and_removed_during_recovery_do_not_come_back(tmp_path):
    """The queue manager delivers recovered mail (and new mail) while recovery goes on."""
    directory = str(tmp_path / "spool")
    old = fill(directory, 1000)
    clock = task.Clock()
    delivery = ManualRun()
    spool = Spool(directory, now, delivery, clock=clock)
    config = loads(config_text(free_port()).replace('"var/drop"', repr(str(tmp_path / "drop"))))
    agents = {c.name: DropDirectoryAgent(c, now) for c in config.send_connectors}
    intake = Intake()
    manager = QueueManager(spool, Router(config.accepted_domains, config.send_connectors), agents,
                           clock=clock, intake=intake)
    manager.startService()
    counting = Counting(intake.submit)
    recovery = Recovery(spool, counting.submit, delivery, clock, step=50)
    recovery.start()
    session = StringSession(config, directory, spool=spool)
    for n in range(300):
        if n % 30 == 0:
            assert session.codes(MAIL)[-1] == "250 2.6.0"
            intake.submit(session.sink.messages.pop())   # new mail to the same queue, as the server does
        if delivery.jobs:
            delivery.finish_one()                       # recovery steps, outcomes and removals in turn
        clock.advance(0.01)                             # removals are gathered for up to REMOVAL_WAIT
    delivery.flush()
    assert not recovery.recovering
    assert set(counting.submits) == set(old) and set(counting.submits.values()) == {1}
    drops = os.listdir(tmp_path / "drop")
    assert len(drops) == 1000 + 10                      # every old message and the ten new ones
    assert os.listdir(spool.queue_dir) == [] and os.listdir(spool.state_dir) == []
    assert manager.summary()["messages"] == 0
    manager.stopService()


def test_a_new_message_is_not_read_back_while_its_removal_is_still_under_way(tmp_path):
    """Its id is forgotten only once its file is gone, never before: else recovery could meet the file."""
    directory = str(tmp_path / "spool")
    delivery = ManualRun()
    spool = Spool(directory, now, delivery)
    spool.start_recovery()
    config = loads(config_text(free_port()))
    session = StringSession(config, directory, spool=spool)
    assert session.codes(MAIL)[-1] == "250 2.6.0"
    [new] = session.sink.messages
    assert spool.read_back(spool.queue_names()) == []   # committed during recovery: its commit announced it
    spool.remove(new)                                  # delivered; the unlink waits for a delivery thread
    assert os.path.exists(new.path)
    assert spool.read_back([new.queue_id]) == []
    delivery.flush()
    assert not os.path.exists(new.path) and spool.read_back([new.queue_id]) == []


def test_state_files_are_read_with_their_message_and_orphans_swept_at_the_end(tmp_path):
    directory = str(tmp_path / "spool")
    [(live, _), (other, _)] = fill(directory, 2, rcpt="x@example.com").items()
    spool = Spool(directory, now)
    os.makedirs(spool.state_dir)
    with open(os.path.join(spool.state_dir, live), "w") as f:
        f.write('{"rcpts": [0], "status": "retry", "detail": "", "at": 12345.0}\n')
    with open(os.path.join(spool.state_dir, "0000000000000000ORPH"), "w") as f:   # its message left earlier
        f.write('{"rcpts": [0], "status": "delivered", "detail": "", "at": 1.0}\n')
    delivery = ManualRun()
    spool = Spool(directory, now, delivery)
    taken = []
    recovery = Recovery(spool, taken.append, delivery, task.Clock(), step=1)
    recovery.start()
    delivery.finish_one()
    delivery.finish_one()
    assert {m.queue_id: m.retry_at for m in taken} == {live: 12345.0, other: 0.0}
    assert len(os.listdir(spool.state_dir)) == 2        # not swept while queue/ is being read
    steps(delivery, recovery)
    assert os.listdir(spool.state_dir) == [live]
    # a recovered message with a state file takes it along when it goes
    spool.remove([m for m in taken if m.queue_id == live][0])
    delivery.flush()
    assert os.listdir(spool.state_dir) == []


def test_an_unreadable_file_is_set_aside_and_recovery_goes_on(tmp_path):
    directory = str(tmp_path / "spool")
    old = fill(directory, 30)
    with open(os.path.join(directory, "queue", "GARBAGE"), "wb") as f:
        f.write(b"not a message")
    spool, delivery, counting, recovery = recovering(directory, step=7)
    steps(delivery, recovery)
    assert set(counting.submits) == set(old)
    assert os.listdir(spool.corrupt_dir) == ["GARBAGE"]


def test_stopping_mid_recovery_announces_nothing_more(tmp_path):
    directory = str(tmp_path / "spool")
    fill(directory, 50)
    spool, delivery, counting, recovery = recovering(directory, step=10)
    delivery.finish_one()
    recovery.stop()
    delivery.flush()
    assert sum(counting.submits.values()) == 10 and not delivery.jobs
    assert len(os.listdir(spool.queue_dir)) == 50       # the rest waits on disk for the next start


# -- a real server, killed while it recovers ------------------------------------


def _send(port: int, tokens) -> set:
    """Each token as one message on one connection; those answered 250."""
    acked = set()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for token in tokens:
            client.sendmail("a@sender.test", ["rcpt@example.com"],
                            b"Message-ID: <%s>\r\nSubject: during recovery\r\n\r\nnew\r\n" % token.encode())
            acked.add(token)
    return acked


def _tracking_rows(server) -> dict[str, int]:
    """Message tracking log file -> its size now."""
    directory = server.path("var", "log", "MessageTracking")
    if not os.path.isdir(directory):
        return {}
    return {os.path.join(directory, n): os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory)}


def _delivers_since(server, sizes: dict[str, int]) -> collections.Counter:
    """DELIVER rows per internal message id written since C{sizes} (L{_tracking_rows})."""
    event, internal = tracking.FIELDS.index("event-id"), tracking.FIELDS.index("internal-message-id")
    seen = collections.Counter()
    for path in _tracking_rows(server):
        with open(path, "rb") as f:
            f.seek(sizes.get(path, 0))
            lines = f.read().decode("utf-8").splitlines()
        for row in csv.reader(line for line in lines if not line.startswith("#")):
            if row[event] == "DELIVER":
                seen[row[internal]] += 1
    return seen


def test_a_server_killed_mid_recovery_delivers_every_message_exactly_once(tmp_path, monkeypatch):
    port = free_port()
    server = Server(tmp_path, config_text(port), port)
    monkeypatch.chdir(server.workdir)                  # where the management socket is
    old = fill(server.path("var", "spool"), 4000)
    try:
        queue_dir = server.path("var", "spool", "queue")
        server.start()
        # greeted at once; mail accepted while the old mail is still read back and delivered
        status = ManagementClient(server.config_path).status()["spool"]
        assert status["recovering"] is True, status
        acked = _send(port, [f"first-{n}@recovery.test" for n in range(20)])
        server.wait_for(lambda: len(server.drop_files()) >= 100, what="old mail to be delivered")
        server.kill()
        assert "recovery started" in server.log
        assert "recovery finished" not in server.log, "the kill came after recovery: nothing tested"
        assert os.listdir(queue_dir)                   # the rest waits for the next start

        before = _tracking_rows(server)
        server.start()
        acked |= _send(port, [f"second-{n}@recovery.test" for n in range(20)])
        server.wait_for(lambda: "recovery finished" in server.log.split("recovery started")[-1], timeout=60,
                        what="the second recovery to finish")
        server.wait_for(lambda: not os.listdir(queue_dir), timeout=60, what="the spool to drain")
        assert ManagementClient(server.config_path).status()["spool"]["recovering"] is False
        server.stop()
    finally:
        server.kill()                                  # by its PID; nothing if it has stopped

    delivered = collections.Counter()
    for path in server.drop_files():
        with open(path, "rb") as f:
            delivered.update(m.decode() for m in MESSAGE_ID.findall(f.read()))
    assert set(delivered) == set(old.values()) | acked, "acknowledged but not delivered"
    assert set(delivered.values()) == {1}, "delivered twice"
    # the second run read each message back once: none was delivered twice by it
    delivers = _delivers_since(server, before)
    assert delivers and max(delivers.values()) == 1, delivers.most_common(3)
    assert os.listdir(server.path("var", "spool", "corrupt")) == []
