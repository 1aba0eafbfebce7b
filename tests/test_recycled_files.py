"""
Recycled files (commit_worker's "Recycled files"): a delivered message's
file becomes the next message's, emptied first, and no reader of the old
message can be handed the new one's bytes. Real files, real commit worker.
"""

import os
import smtplib
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread

from exedge.durable import DirectorySync
from exedge.queue import Envelope, Recipient, Spool
from exedge.queue import commit_worker as wire
from exedge.queue import spool as spool_module
from exedge.queue.committer import ProcessCommitter


def envelope(*rcpts):
    return Envelope(sender="a@s.test", recipients=tuple(Recipient(r) for r in rcpts), size=10)


def sync(f):
    return defer.maybeDeferred(f)


def make_spool(tmp_path, recycle=True) -> Spool:
    spool = Spool(str(tmp_path / "spool"), sync, recycle=recycle)
    spool.prepare()
    return spool


def committed(spool, data: bytes, rcpt="b@x.test"):
    incoming = spool.begin()
    incoming.write(data)
    results = []
    incoming.commit(envelope(rcpt)).addCallback(results.append)
    [stored] = results
    return stored


def names(directory, prefix) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(prefix))


OLD = b"Subject: old\r\n\r\n" + b"an old message, longer than the new one\r\n" * 50


def test_a_delivered_messages_file_is_emptied_and_reused_for_a_new_message(tmp_path):
    spool = tmp_path / "spool"
    for d in ("incoming", "queue"):
        (spool / d).mkdir(parents=True)
    incoming, queue = str(spool / "incoming"), str(spool / "queue")
    recycled = spool / "incoming" / f"{wire.RECYCLED_PREFIX}7"
    recycled.write_bytes(OLD)
    inode = os.stat(recycled).st_ino
    spares = wire.Spares(incoming, limit=2)
    spares.want(2)
    spares.fill()
    made = names(incoming, wire.SPARE_PREFIX)
    assert len(made) == 2 and names(incoming, wire.RECYCLED_PREFIX) == []
    # the recycled file is one of the spares, under a spare's name, and empty already
    [reused] = [n for n in made if os.stat(os.path.join(incoming, n)).st_ino == inode]
    assert os.path.getsize(os.path.join(incoming, reused)) == 0
    results = wire.write_group(incoming, queue, DirectorySync(queue),
                               [("A", b"message a", False), ("B", b"message b", False)], spares=spares)
    assert results == [wire.COMMITTED, wire.COMMITTED]
    # each message is exactly its own bytes: nothing of the old one is left in the file it took
    assert (spool / "queue" / "A").read_bytes() == b"message a"
    assert (spool / "queue" / "B").read_bytes() == b"message b"
    assert inode in {os.stat(spool / "queue" / n).st_ino for n in ("A", "B")}
    assert os.stat(spool / "queue" / "A").st_mode & 0o777 == 0o600
    assert os.listdir(incoming) == []


def test_delivered_messages_go_to_a_bounded_ring_of_recycled_files(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "RECYCLED_SLOTS", 3)
    spool = make_spool(tmp_path)
    stored = [committed(spool, b"Subject: %d\r\n\r\nbody\r\n" % i) for i in range(5)]
    inodes = [os.stat(m.path).st_ino for m in stored]
    for m in stored:
        spool.remove(m)
    assert os.listdir(spool.queue_dir) == []
    # five removed, three slots: each rename onto a slot in use replaced (deleted) its file
    recycled = names(spool.incoming_dir, wire.RECYCLED_PREFIX)
    assert len(recycled) == 3
    kept = {os.stat(os.path.join(spool.incoming_dir, n)).st_ino for n in recycled}
    assert kept == set(inodes[2:])


def test_a_large_message_or_a_spool_that_does_not_recycle_unlinks(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "RECYCLE_AT_MOST", 100)
    spool = make_spool(tmp_path / "a")
    large = committed(spool, b"Subject: large\r\n\r\n" + b"x" * 100 + b"\r\n")
    small = committed(spool, b"Subject: small\r\n\r\nbody\r\n")
    spool.remove(large)
    assert os.listdir(spool.incoming_dir) == [] and not os.path.exists(large.path)
    spool.remove(small)
    assert len(names(spool.incoming_dir, wire.RECYCLED_PREFIX)) == 1
    plain = make_spool(tmp_path / "b", recycle=False)
    message = committed(plain, b"Subject: small\r\n\r\nbody\r\n")
    plain.remove(message)
    assert os.listdir(plain.incoming_dir) == [] and os.listdir(plain.queue_dir) == []


def reuse_for_another(spool, message, data: bytes) -> str:
    """What the server and a commit worker do meanwhile: C{message} delivered, its file reused for another."""
    spool.remove(message)
    spares = wire.Spares(spool.incoming_dir, limit=1)
    spares.want(1)
    spares.fill()
    other = "0000000000000FOTHER"
    assert wire.write_group(spool.incoming_dir, spool.queue_dir, DirectorySync(spool.queue_dir),
                            [(other, data, False)], spares=spares) == [wire.COMMITTED]
    return other


SECRET = b"Subject: for someone else\r\n\r\nnot for the first message's recipients\r\n"


@pytest.mark.parametrize("other", [SECRET, SECRET * 40], ids=["shorter", "longer"])
def test_reading_a_message_whose_file_was_reused_meanwhile_fails_instead_of_giving_another(tmp_path, monkeypatch,
                                                                                          other):
    spool = make_spool(tmp_path)
    committed(spool, OLD)
    [message] = spool.recover()                   # not held in memory: its data is read from the file
    real_read = os.read
    reused = []

    def read_after_reuse(fd, n):
        if not reused:
            reused.append(reuse_for_another(spool, message, other + footer_of(other)))
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", read_after_reuse)
    with pytest.raises(FileNotFoundError):
        message.read_data()
    monkeypatch.setattr(os, "read", real_read)
    # the file it had open held the other message by then
    with open(os.path.join(spool.queue_dir, reused[0]), "rb") as f:
        assert f.read().startswith(SECRET)


def footer_of(data: bytes) -> bytes:
    return spool_module.envelope_footer(Envelope(sender="z@s.test", recipients=(Recipient("z@x.test"),),
                                                 size=len(data)))


@pytest.mark.parametrize("reader", ["envelope", "recovery"])
def test_reading_an_envelope_from_a_file_reused_meanwhile_fails_instead_of_giving_another(tmp_path, monkeypatch,
                                                                                         reader):
    spool = make_spool(tmp_path)
    first = committed(spool, OLD, rcpt="first@x.test")
    [message] = spool.recover()
    real_read_envelope = spool_module.read_envelope
    reused = []

    def read_after_reuse(f):
        if not reused:
            reused.append(reuse_for_another(spool, message, SECRET + footer_of(SECRET)))
        return real_read_envelope(f)

    monkeypatch.setattr(spool_module, "read_envelope", read_after_reuse)
    if reader == "envelope":
        with pytest.raises(FileNotFoundError):
            message.read_envelope()
    else:
        # recovery meets the first message's name, but its file holds the other one by the time it reads
        with pytest.raises(FileNotFoundError):
            spool._load(first.queue_id, message.path)


@pytest.fixture
def process_spool(tmp_path):
    spool = Spool(str(tmp_path / "spool"), deferToThread, recycle=True,
                  committer=lambda s: ProcessCommitter(s, reactor))
    spool.prepare()
    spool.receiving.start()
    yield spool
    pytest_twisted.blockon(spool.receiving.stop())


@pytest_twisted.inlineCallbacks
def commit_through(spool, data: bytes):
    incoming = spool.begin()
    incoming.write(data)
    stored = yield incoming.commit(envelope("b@x.test"))
    return stored


@pytest_twisted.inlineCallbacks
def test_through_the_commit_worker_a_delivered_messages_file_carries_a_later_message(process_spool):
    spool = process_spool
    first = yield commit_through(spool, OLD)
    inode = os.stat(first.path).st_ino
    yield spool.remove(first)                     # delivered: its file waits in a recycled slot
    assert names(spool.incoming_dir, wire.RECYCLED_PREFIX) and not os.path.exists(first.path)
    # the worker takes recycled files as spares after answering a group, while nobody waits
    later = []
    deadline = time.monotonic() + 20
    while names(spool.incoming_dir, wire.RECYCLED_PREFIX):
        assert time.monotonic() < deadline, "the worker never took the recycled file"
        later.append((yield commit_through(spool, b"Subject: %d\r\n\r\nbody\r\n" % len(later))))
        yield task.deferLater(reactor, 0.01, lambda: None)
    # a spare is taken last in first out: the recycled one is used by the next commit or the one after
    for _ in range(2):
        later.append((yield commit_through(spool, b"Subject: %d\r\n\r\nbody\r\n" % len(later))))
    [reusing] = [m for m in later if os.stat(m.path).st_ino == inode]
    yield spool.receiving.stop()
    again = {m.queue_id: m for m in spool.recover()}
    n = later.index(reusing)
    assert again[reusing.queue_id].read_data() == b"Subject: %d\r\n\r\nbody\r\n" % n
    assert again[reusing.queue_id].envelope.recipients[0].address == "b@x.test"
    assert first.queue_id not in again


def test_the_server_recycles_a_delivered_messages_file_and_its_commit_worker_takes_it(start_server):
    server = start_server()
    incoming = server.path("var", "spool", "incoming")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        assert client.sendmail("alice@sender.test", ["bob@example.com"], OLD) == {}
    server.wait_for(lambda: names(incoming, wire.RECYCLED_PREFIX),
                    what="the delivered message's file in a recycled slot")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        assert client.sendmail("alice@sender.test", ["carol@example.com"], b"Subject: two\r\n\r\nbody\r\n") == {}
    # taken as a spare once the worker has answered the second message's commit
    server.wait_for(lambda: not names(incoming, wire.RECYCLED_PREFIX) and len(server.drop_files()) == 2,
                    what="the commit worker to take the recycled file")
    contents = sorted(open(path, "rb").read() for path in server.drop_files())
    assert contents[0].endswith(OLD) or contents[1].endswith(OLD)
    assert any(c.endswith(b"Subject: two\r\n\r\nbody\r\n") for c in contents)
