"""
Recycled files (commit_worker's "Recycled files"): a delivered message's
file becomes the next message's, overwritten and cut to the new one's
length, and no reader of the old message can be handed the new one's
bytes. Real files, real commit worker.
"""

import os
import smtplib
import threading
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


def test_a_delivered_messages_file_is_overwritten_and_cut_for_a_new_message(tmp_path):
    spool = tmp_path / "spool"
    for d in ("incoming", "queue"):
        (spool / d).mkdir(parents=True)
    incoming, queue = str(spool / "incoming"), str(spool / "queue")
    inodes = set()
    for slot in (7, 8):
        recycled = spool / "incoming" / f"{wire.RECYCLED_PREFIX}{slot}"
        recycled.write_bytes(OLD)
        inodes.add(os.stat(recycled).st_ino)
    synced = []

    def before_reuse():
        # the queue directory's fsync: after both are claimed (one fsync for the two), before either is reused
        spares_now = names(incoming, wire.SPARE_PREFIX)
        synced.append(sorted(os.path.getsize(os.path.join(incoming, n)) for n in spares_now))

    spares = wire.Spares(incoming, limit=3, before_reuse=before_reuse)
    spares.want(1)
    spares.fill()
    assert synced == [[len(OLD), len(OLD)]]
    # every recycled file is taken (within the limit), beyond the one wanted; none created
    made = names(incoming, wire.SPARE_PREFIX)
    assert len(made) == 2 == len(spares) and names(incoming, wire.RECYCLED_PREFIX) == []
    assert {os.stat(os.path.join(incoming, n)).st_ino for n in made} == inodes
    # kept as they are (no blocks freed, none allocated again): the commit overwrites them
    assert [os.path.getsize(os.path.join(incoming, n)) for n in made] == [len(OLD), len(OLD)]
    shorter, longer = b"message a", b"message b, longer than the old one\r\n" * 60
    results = wire.write_group(incoming, queue, DirectorySync(queue),
                               [("A", shorter, False), ("B", longer, False)], spares=spares)
    assert results == [wire.COMMITTED, wire.COMMITTED]
    # each message is exactly its own bytes: nothing of the old one is left in the file it took
    assert (spool / "queue" / "A").read_bytes() == shorter
    assert (spool / "queue" / "B").read_bytes() == longer
    assert {os.stat(spool / "queue" / n).st_ino for n in ("A", "B")} == inodes
    assert os.listdir(incoming) == []


def test_a_recycled_file_whose_removal_could_not_be_made_durable_is_never_reused(tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / f"{wire.RECYCLED_PREFIX}1").write_bytes(OLD)
    # held open, so that its inode number cannot be given to a new file once it is deleted
    held = os.open(incoming / f"{wire.RECYCLED_PREFIX}1", os.O_RDONLY)

    def failing_fsync():
        raise OSError(5, "Input/output error")

    spares = wire.Spares(str(incoming), before_reuse=failing_fsync)
    spares.want(1)
    spares.fill()
    # deleted, not kept: its old name may still be in queue/ on the disk; a new file is made instead
    assert len(spares) == 1
    [fd, path] = spares.take()
    os.close(fd)
    assert os.listdir(incoming) == [os.path.basename(path)] and os.path.getsize(path) == 0
    assert os.stat(path).st_ino != os.fstat(held).st_ino and os.fstat(held).st_nlink == 0
    assert os.pread(held, 100, 0) == OLD[:100]          # and never written
    os.close(held)


def test_the_worker_fsyncs_the_queue_directory_before_it_reuses_a_recycled_file(tmp_path, monkeypatch):
    """serve(), the worker process's loop, run here on a thread: its spares are given the queue/ fsync."""
    spool = tmp_path / "spool"
    for d in ("incoming", "queue"):
        (spool / d).mkdir(parents=True)
    incoming = spool / "incoming"
    (incoming / f"{wire.RECYCLED_PREFIX}3").write_bytes(OLD)
    seen = []

    class Recording(DirectorySync):
        def sync(self):
            seen.append((self.path, sorted((n, os.path.getsize(incoming / n)) for n in os.listdir(incoming))))
            return super().sync()

    monkeypatch.setattr(wire, "DirectorySync", Recording)
    rfd, to_worker = os.pipe()
    from_worker, wfd = os.pipe()
    worker = threading.Thread(target=wire.serve, args=(str(spool), os.getppid(), rfd, wfd))
    worker.start()
    try:
        os.write(to_worker, b"".join(wire.encode_request(1, "M1", [b"message one"], False)))
        assert len(os.read(from_worker, 100)) == wire.REPLY.size           # answered
        deadline = time.monotonic() + 10

        def taken():     # then, while no request waits, the recycled file is taken as a spare
            return names(incoming, wire.SPARE_PREFIX) and not names(incoming, wire.RECYCLED_PREFIX)

        while not taken():
            assert time.monotonic() < deadline, "the worker did not take the recycled file"
            time.sleep(0.01)
        # the next message goes into it, over the old bytes, and is exactly itself
        os.write(to_worker, b"".join(wire.encode_request(2, "M2", [b"message two"], False)))
        assert len(os.read(from_worker, 100)) == wire.REPLY.size
    finally:
        os.close(to_worker)
        worker.join(10)
        for fd in (rfd, wfd, from_worker):
            os.close(fd)
    assert (spool / "queue" / "M1").read_bytes() == b"message one"
    assert (spool / "queue" / "M2").read_bytes() == b"message two"
    queue_syncs = [entries for path, entries in seen if path == str(spool / "queue")]
    # M1's own fsync; the one before the recycled file, claimed but still whole, is reused; M2's
    assert len(queue_syncs) == 3
    [(name, size)] = queue_syncs[1]
    assert name.startswith(wire.SPARE_PREFIX) and size == len(OLD)


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


@pytest.mark.parametrize("state", ["another message", "a spare"])
@pytest.mark.parametrize("reader", ["envelope", "recovery"])
def test_reading_an_envelope_from_a_file_reused_meanwhile_fails_instead_of_giving_another(tmp_path, monkeypatch,
                                                                                         reader, state):
    spool = make_spool(tmp_path)
    first = committed(spool, OLD, rcpt="first@x.test")
    [message] = spool.recover()
    real_read_envelope = spool_module.read_envelope
    reused = []

    def read_after_reuse(f):
        if not reused:
            if state == "a spare":          # taken as a spare, not written yet: under another name
                spool.remove(message)
                spares = wire.Spares(spool.incoming_dir)
                spares.want(1)
                spares.fill()
                reused.append(spares)
            else:
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


def test_the_server_recycles_a_delivered_messages_file_and_the_next_message_is_written_into_it(start_server):
    server = start_server()
    incoming = server.path("var", "spool", "incoming")

    def send(rcpt, data):
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            assert client.sendmail("alice@sender.test", [rcpt], data) == {}

    def inodes(prefix):
        found = {}
        for name in names(incoming, prefix):
            try:
                found[os.stat(os.path.join(incoming, name)).st_ino] = name
            except FileNotFoundError:
                pass
        return found

    send("bob@example.com", OLD)
    [inode] = server.wait_for(lambda: list(inodes(wire.RECYCLED_PREFIX)),
                              what="the delivered message's file in a recycled slot")
    send("carol@example.com", b"Subject: two\r\n\r\nbody\r\n")
    # once the worker has answered the second message, it takes the recycled file as a spare
    server.wait_for(lambda: inode in inodes(wire.SPARE_PREFIX), what="the commit worker to take the recycled file")
    three = b"Subject: three\r\n\r\nshort\r\n"
    send("dave@example.com", three)
    # the third message went into that file: delivered, it is recycled in turn, holding the third message
    name = server.wait_for(lambda: inodes(wire.RECYCLED_PREFIX).get(inode), what="the third message's file back")
    with open(os.path.join(incoming, name), "rb") as f:
        held = f.read()
    assert three in held and b"an old message" not in held
    server.wait_for(lambda: len(server.drop_files()) == 3, what="three drop files")
    contents = [open(path, "rb").read() for path in server.drop_files()]
    assert sorted(c.endswith(three) for c in contents) == [False, False, True]
    assert sum(c.endswith(OLD) for c in contents) == 1
