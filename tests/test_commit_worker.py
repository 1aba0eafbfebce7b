"""
The commit worker process and the server side that talks to it: real child
processes, real files, the real reactor.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.python.threadpool import ThreadPool

from exedge.queue import commit_worker as wire
from exedge.durable import DirectorySync
from exedge.queue import Envelope, Recipient, Spool
from exedge.queue.committer import ProcessCommitter, WorkerGone


def envelope(*rcpts):
    return Envelope(sender="a@s.test", recipients=tuple(Recipient(r) for r in rcpts), size=10)


def dirs(tmp_path):
    spool = tmp_path / "spool"
    for d in ("incoming", "queue"):
        (spool / d).mkdir(parents=True)
    return spool


def run_worker(spool, *requests) -> list:
    """Send the requests to a real worker in one write, close its stdin; its replies, parsed."""
    proc = subprocess.run([sys.executable, "-m", "exedge.queue.commit_worker", str(spool)],
                          input=b"".join(b"".join(wire.encode_request(i, name, [payload], append)) for i, name, payload, append in requests),
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    out, replies, offset = proc.stdout, [], 0
    while offset < len(out):
        request_id, errno, text_len = wire.REPLY.unpack_from(out, offset)
        offset += wire.REPLY.size
        replies.append((request_id, errno, out[offset:offset + text_len].decode()))
        offset += text_len
    return replies


def test_worker_commits_new_and_spilled_files_and_refuses_each_bad_one_alone(tmp_path):
    spool = dirs(tmp_path)
    (spool / "incoming" / "SPILLED").write_bytes(b"first half, ")
    replies = run_worker(
        spool,
        (1, "NEW", b"a whole message", False),
        (2, "SPILLED", b"second half", True),
        (3, "MISSING", b"footer", True),          # nothing to append to
        (4, "../escape", b"x", False),            # not a name in incoming/
        (5, "NEW", b"again", False),              # the same name twice: never overwrite
    )
    assert [(r[0], r[1]) for r in replies] == [(1, 0), (2, 0), (3, 2), (4, 22), (5, 17)]
    assert (spool / "queue" / "NEW").read_bytes() == b"a whole message"
    assert (spool / "queue" / "SPILLED").read_bytes() == b"first half, second half"
    assert not (tmp_path / "escape").exists()
    assert sorted(os.listdir(spool / "queue")) == ["NEW", "SPILLED"]
    assert os.stat(spool / "queue" / "NEW").st_mode & 0o777 == 0o600


def test_worker_answers_a_request_split_across_reads(tmp_path):
    spool = dirs(tmp_path)
    rfd, wfd = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "exedge.queue.commit_worker", str(spool)],
                            stdin=rfd, stdout=subprocess.PIPE)
    os.close(rfd)
    try:
        frame = b"".join(wire.encode_request(7, "BIG", [b"y" * 300_000], False))
        for i in range(0, len(frame), 70_000):    # arrives in pieces, as a pipe delivers it
            os.write(wfd, frame[i:i + 70_000])
        reply = proc.stdout.read(wire.REPLY.size)
        assert wire.REPLY.unpack(reply) == (7, 0, 0)
        assert (spool / "queue" / "BIG").read_bytes() == b"y" * 300_000
    finally:
        os.close(wfd)
        proc.wait(timeout=10)


def test_a_failed_fsync_in_a_group_fails_that_message_alone(tmp_path, monkeypatch):
    spool = dirs(tmp_path)
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/BAD"):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    queue_dir = str(spool / "queue")
    replies = wire.commit(str(spool / "incoming"), queue_dir, DirectorySync(queue_dir),
                          [(1, 0, "GOOD1", b"one"), (2, 0, "BAD", b"two"), (3, 0, "GOOD2", b"three")])
    assert [wire.REPLY.unpack_from(r)[:2] for r in replies] == [(1, 0), (2, 5), (3, 0)]
    assert sorted(os.listdir(queue_dir)) == ["GOOD1", "GOOD2"]
    assert os.listdir(spool / "incoming") == ["BAD"]     # never published; the server removes it


def test_an_orphaned_worker_commits_nothing(tmp_path):
    """The server was killed: a new one may have scanned queue/ already, and nobody can answer."""
    spool = dirs(tmp_path)
    rfd, wfd = os.pipe()
    # an intermediate parent that starts the worker and exits at once, as a SIGKILLed server would
    launcher = subprocess.run(
        [sys.executable, "-c", "import subprocess, sys; "
         "import os; p = subprocess.Popen([sys.executable, '-m', 'exedge.queue.commit_worker', sys.argv[1], str(os.getpid())], "
         "stdin=0, stdout=subprocess.DEVNULL); print(p.pid)", str(spool)],
        stdin=rfd, stdout=subprocess.PIPE, timeout=30)
    os.close(rfd)
    pid = int(launcher.stdout)
    os.write(wfd, b"".join(wire.encode_request(1, "ORPHAN", [b"x"], False)))
    os.close(wfd)
    deadline = time.monotonic() + 10
    while not _gone(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the orphaned worker did not exit")
        time.sleep(0.05)
    assert os.listdir(spool / "queue") == [] and os.listdir(spool / "incoming") == []


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: the test runner may be its subreaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def threaded(f):
    return deferToThread(f)


@pytest.fixture
def process_spool(tmp_path):
    made = []

    def make(run=threaded, **kw):
        spool = Spool(str(tmp_path / "spool"), run,
                      committer=lambda s: ProcessCommitter(s, reactor, **kw))
        spool.prepare()
        spool.receiving.start()
        made.append(spool)
        return spool

    yield make
    for spool in made:
        pytest_twisted.blockon(spool.receiving.stop())


@pytest_twisted.inlineCallbacks
def test_commits_through_the_worker_are_recovered_whole(process_spool):
    spool = process_spool()
    small = spool.begin()
    small.write(b"Subject: small\r\n\r\nbody\r\n")
    large = spool.begin()
    chunk = b"z" * 998 + b"\r\n"
    for _ in range(700):                        # past the spill threshold: streamed to incoming/
        large.write(chunk)
    stored = yield defer.gatherResults([small.commit(envelope("b@x.test")), large.commit(envelope("c@x.test"))])
    assert [name for name in os.listdir(spool.incoming_dir) if not name.startswith(wire.SPARE_PREFIX)] == []
    again = {m.queue_id: m for m in spool.recover()}
    assert set(again) == {m.queue_id for m in stored}
    assert again[stored[0].queue_id].read_data() == b"Subject: small\r\n\r\nbody\r\n"
    assert again[stored[1].queue_id].read_data() == chunk * 700
    assert again[stored[1].queue_id].envelope.recipients[0].address == "c@x.test"
    assert stored[1].data_length == len(chunk) * 700


def spilled(spool):
    incoming = spool.begin()
    for _ in range(700):                        # spilled: its file is in incoming/ already
        incoming.write(b"z" * 998 + b"\r\n")
    return incoming


# -- files made ahead (commit_worker.Spares) -------------------------------------------------------

def spare_names(incoming) -> list[str]:
    return sorted(n for n in os.listdir(incoming) if n.startswith(wire.SPARE_PREFIX))


def test_new_messages_are_written_into_files_made_ahead(tmp_path):
    spool = dirs(tmp_path)
    incoming, queue = str(spool / "incoming"), str(spool / "queue")
    (spool / "incoming" / "SPILLED").write_bytes(b"head, ")
    (spool / "incoming" / "PARTIAL").write_bytes(b"a message still arriving")
    spares = wire.Spares(incoming, limit=3)
    spares.want(10)                               # as many as the last group, within the limit
    spares.fill()
    made = spare_names(incoming)
    assert len(made) == 3 == len(spares)
    results = wire.write_group(incoming, queue, DirectorySync(queue), [
        ("A", b"message a", False),
        ("SPILLED", b"tail", True),               # a spilled message appends to its own file
        ("A", b"again", False),                   # a name twice in a group: refused, as O_EXCL did
        ("PARTIAL", b"x", False),                 # incoming/<name> is there: refused, as O_EXCL did
        ("B", b"message b", False),
    ], spares=spares)
    assert [r if r is wire.COMMITTED else r.errno for r in results] == [wire.COMMITTED, wire.COMMITTED, 17, 17,
                                                                        wire.COMMITTED]
    assert (spool / "queue" / "A").read_bytes() == b"message a"
    assert (spool / "queue" / "B").read_bytes() == b"message b"
    assert (spool / "queue" / "SPILLED").read_bytes() == b"head, tail"
    assert os.stat(spool / "queue" / "A").st_mode & 0o777 == 0o600
    # two spares became A and B; one is left, and nothing under a message's name
    assert len(spare_names(incoming)) == 1 == len(spares) and set(spare_names(incoming)) < set(made)
    assert sorted(os.listdir(incoming)) == ["PARTIAL", *spare_names(incoming)]
    spares.discard()
    assert os.listdir(incoming) == ["PARTIAL"]


def test_a_message_in_a_spare_is_under_its_own_name_so_a_cleanup_mid_commit_stops_it(tmp_path):
    """
    A receive worker dies mid-commit: the server unlinks incoming/<id> of what it never
    announced. A message written into a spare must be reachable by that name, so that its
    publication fails instead of leaving in queue/ a message nobody acknowledged.
    """
    spool = dirs(tmp_path)
    incoming, queue = str(spool / "incoming"), str(spool / "queue")
    spares = wire.Spares(incoming)
    spares.want(2)
    spares.fill()

    def fsync_then_the_server_cleans_up(fds):
        assert sorted(os.listdir(incoming)) == ["DEAD", "LIVE"]     # both under their own names
        os.unlink(os.path.join(incoming, "DEAD"))
        return wire.fsync_in_turn(fds)

    results = wire.write_group(incoming, queue, DirectorySync(queue),
                               [("LIVE", b"acknowledged", False), ("DEAD", b"never acknowledged", False)],
                               fsync_all=fsync_then_the_server_cleans_up, spares=spares)
    assert results[0] is wire.COMMITTED and results[1].errno == 2
    assert os.listdir(queue) == ["LIVE"] and os.listdir(incoming) == []


def test_spares_are_made_only_while_no_request_waits(tmp_path):
    incoming = str(dirs(tmp_path) / "incoming")
    spares = wire.Spares(incoming)
    spares.want(5)
    asked = []
    spares.fill(lambda: asked.append(1) or len(asked) > 2)    # a request arrives after two spares
    assert len(spare_names(incoming)) == 2
    spares.want(0)
    spares.fill()
    assert len(spare_names(incoming)) == 2                    # none wanted: none made, none removed
    spares.discard()
    assert os.listdir(incoming) == []


@pytest_twisted.inlineCallbacks
def test_the_worker_makes_the_next_file_ahead_uses_it_and_removes_spares_when_it_ends(process_spool):
    spool = process_spool()
    first = spool.begin()
    first.write(b"Subject: one\r\n\r\nbody\r\n")
    yield first.commit(envelope("b@x.test"))
    deadline = time.monotonic() + 10
    while not spare_names(spool.incoming_dir):            # made after the answer, while nobody waits
        assert time.monotonic() < deadline, "the worker made no file ahead"
        yield task.deferLater(reactor, 0.01, lambda: None)
    [spare] = spare_names(spool.incoming_dir)
    second = spool.begin()
    second.write(b"Subject: two\r\n\r\nbody\r\n")
    stored = yield second.commit(envelope("c@x.test"))
    assert spare not in os.listdir(spool.incoming_dir)    # the second message went into it
    assert stored.queue_id in os.listdir(spool.queue_dir)
    yield spool.receiving.stop()
    assert os.listdir(spool.incoming_dir) == []           # the worker removed the spare it made since
    again = {m.queue_id: m for m in spool.recover()}
    assert again[stored.queue_id].read_data() == b"Subject: two\r\n\r\nbody\r\n"


@pytest_twisted.inlineCallbacks
def test_the_files_a_killed_worker_made_ahead_are_removed_when_it_ends(process_spool):
    spool = process_spool(restart_interval=0.5)
    first = spool.begin()
    first.write(b"Subject: one\r\n\r\nbody\r\n")
    yield first.commit(envelope("b@x.test"))
    worker = spool.receiving._worker
    deadline = time.monotonic() + 10
    while not spare_names(spool.incoming_dir):            # made after the answer, while nobody waits
        assert time.monotonic() < deadline, "the worker made no file ahead"
        yield task.deferLater(reactor, 0.01, lambda: None)
    # a spare of another worker (a receive worker's commit worker) is not this one's to remove
    other = os.path.join(spool.incoming_dir, f"{wire.SPARE_PREFIX}{worker.pid + 1}-0")
    open(other, "wb").close()
    worker.transport.signalProcess(signal.SIGKILL)        # no chance to remove its own
    yield worker.ended
    assert spare_names(spool.incoming_dir) == [os.path.basename(other)]
    second = spool.begin()
    second.write(b"Subject: two\r\n\r\nbody\r\n")
    stored = yield second.commit(envelope("c@x.test")).addTimeout(10, reactor)
    assert stored.queue_id in os.listdir(spool.queue_dir)


@pytest_twisted.inlineCallbacks
def test_after_a_worker_dies_commits_wait_for_the_next_one(process_spool):
    spool = process_spool(restart_interval=0.5)
    worker = spool.receiving._worker
    worker.transport.signalProcess(signal.SIGKILL)
    yield worker.ended
    incoming = spilled(spool)
    stored = yield incoming.commit(envelope("b@x.test")).addTimeout(10, reactor)
    assert stored.read_data() == (b"z" * 998 + b"\r\n") * 700
    assert spool.receiving._worker is not worker
    assert [n for n in os.listdir(spool.incoming_dir) if not n.startswith(wire.SPARE_PREFIX)] == []


@pytest_twisted.inlineCallbacks
def test_commits_waiting_for_a_restart_fail_when_the_server_stops(process_spool):
    spool = process_spool(restart_interval=3600)      # a worker that keeps dying: no restart soon
    worker = spool.receiving._worker
    worker.transport.signalProcess(signal.SIGKILL)
    yield worker.ended
    incoming = spilled(spool)
    yield incoming.read_back()                  # the spill has reached the disk
    assert os.listdir(spool.incoming_dir) == [incoming.queue_id]
    outcome = []
    incoming.commit(envelope("b@x.test")).addBoth(outcome.append)
    yield task.deferLater(reactor, 0.2, lambda: None)
    assert outcome == []                        # waiting, not refused
    yield spool.receiving.stop()
    assert [f.type for f in outcome] == [WorkerGone]
    yield task.deferLater(reactor, 0.1, lambda: None)
    assert os.listdir(spool.incoming_dir) == [] and os.listdir(spool.queue_dir) == []


@pytest_twisted.inlineCallbacks
def test_a_commit_renamed_but_never_answered_is_removed_from_the_queue(process_spool):
    spool = process_spool(module="worker_dies_before_replying")
    incoming = spool.begin()
    incoming.write(b"Subject: t\r\n\r\nbody\r\n")
    with pytest.raises(WorkerGone):
        yield incoming.commit(envelope("b@x.test"))
    # the worker did rename it into queue/, but nobody was told: it must not be delivered after a restart
    with open(os.path.join(spool.directory, "renamed-by-worker")) as f:
        assert f.read() == incoming.queue_id
    assert os.listdir(spool.queue_dir) == []
    assert spool.recover() == []


@pytest_twisted.inlineCallbacks
def test_a_worker_dying_during_shutdown_still_fails_its_commits_and_cleans_up(process_spool):
    pool = ThreadPool(minthreads=1, maxthreads=2)
    pool.start()
    spool = process_spool(run=lambda f: deferToThreadPool(reactor, pool, f), module="worker_dies_before_replying")
    incoming = spool.begin()
    incoming.write(b"Subject: t\r\n\r\nbody\r\n")
    d = incoming.commit(envelope("b@x.test"))
    failures = []
    d.addErrback(failures.append)
    pool.stop()                                 # the thread pools are gone before the worker answers
    yield spool.receiving.stop()
    assert [f.type for f in failures] == [WorkerGone]
    assert os.path.exists(os.path.join(spool.directory, "renamed-by-worker"))
    assert os.listdir(spool.queue_dir) == []


@pytest_twisted.inlineCallbacks
def test_stop_waits_for_the_worker_to_exit(process_spool):
    spool = process_spool()
    worker = spool.receiving._worker
    pid = worker.transport.pid
    yield spool.receiving.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_pipe_to_the_worker_holds_a_large_message(process_spool):
    fcntl = pytest.importorskip("fcntl")
    spool = process_spool()
    fd = spool.receiving._worker.transport.pipes[0].fileno()
    assert fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) == 1 << 20


@pytest_twisted.inlineCallbacks
def test_a_committed_message_stays_in_memory_until_it_leaves_the_spool(process_spool):
    spool = process_spool()
    incoming = spool.begin()
    incoming.write(b"Subject: t\r\n\r\nbody\r\n")
    stored = yield incoming.commit(envelope("b@x.test"))
    assert stored.in_memory() == b"Subject: t\r\n\r\nbody\r\n"
    assert spool.recent.size == len(stored.in_memory()) + spool.recent.ENTRY_BYTES
    yield spool.remove(stored)
    assert stored.in_memory() is None and spool.recent.size == 0
    assert not os.path.exists(stored.path)


def test_recent_data_is_bounded_oldest_first():
    from exedge.queue.spool import RecentData
    recent = RecentData(max_bytes=6000)
    entry = 900 + recent.ENTRY_BYTES                     # the data and what its envelope and entry take
    held = [recent.hold(f"Q{i}", bytes([i]) * 900) for i in range(6)]
    assert recent.size <= 6000
    assert [h.data is not None for h in held] == [False, False, False, True, True, True]
    assert recent.hold("BIG", b"x" * 1501) is None       # over a quarter of the budget: read from disk
    recent.release("Q5")
    assert held[5].data is None and recent.size == 2 * entry


def test_recent_data_counts_each_entry_so_tiny_messages_are_bounded_too():
    """A flood of 100-octet messages: the envelopes, not the data, are what the memory holds."""
    from exedge.queue.spool import RecentData
    recent = RecentData(max_bytes=64 * 1024)
    held = [recent.hold(f"Q{i}", b"x" * 100) for i in range(1000)]
    kept = sum(h.data is not None for h in held)
    assert kept == 64 * 1024 // (100 + recent.ENTRY_BYTES)
    assert kept <= 64 * 1024 // (100 + 700)                # a parsed envelope is ~0.7 KiB: counted, not free


@pytest_twisted.inlineCallbacks
def test_what_a_broken_worker_prints_reaches_the_server_log(process_spool):
    from twisted.logger import globalLogPublisher
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        spool = process_spool(module="exedge.no_such_worker")
        yield spool.receiving._worker.ended
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e.get("line", "") for e in events if e.get("log_format") == "commit worker: {line}"]
    assert any("No module named exedge.no_such_worker" in line for line in lines)
    assert any("commit worker exited" in e.get("log_format", "") for e in events)


def test_the_commit_worker_starts_without_twisted():
    """
    The worker lives in the queue room but is a process of its own: it
    must not pay for importing Twisted (nor anything else of exedge's
    rooms) at every start.
    """
    code = ("import runpy, sys; sys.argv = ['w']\n"
            "import exedge.queue.commit_worker\n"
            "loaded = sorted(m for m in sys.modules if m.startswith(('twisted', 'zope', 'exedge.')))\n"
            "print(loaded)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['exedge.durable', 'exedge.queue', 'exedge.queue.commit_worker']"


@pytest_twisted.inlineCallbacks
def test_a_stop_removes_the_delivered_messages_that_wait_to_be_gathered(tmp_path):
    """Removals wait to go in batches (Spool.remove); a clean stop must not leave one to deliver again."""
    from exedge.service import SpoolService

    service = SpoolService(str(tmp_path / "spool"), 2, 1, reactor, lambda message: None)
    service.startService()
    spool = service.spool
    incoming = spool.begin()
    incoming.write(b"Subject: delivered\r\n\r\nbody\r\n")
    stored = yield incoming.commit(envelope("b@x.test"))
    removed = spool.remove(stored)               # delivered: its removal waits for more, or for a while
    assert not removed.called and os.path.exists(stored.path)
    yield service.stopService()
    assert removed.called and not os.path.exists(stored.path)
