"""
A spool that runs out of space, for real: a 2 MB tmpfs mounted as the
spool (root only: skipped with the reason otherwise), filled by messages
that wait in a held queue. The server answers 452 4.3.1, at DATA when back
pressure is off and at MAIL FROM once its monitor has seen the disk; it
writes no traceback, leaves no partial file, and every message it
acknowledged is there after a restart. Also the durability details: new
spool and drop directories, and a drop directory's abandoned .tmp files.
"""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import time

import pytest

from harness import LOCAL_DROP, Server, free_port, server_config

from exedge.durable import make_dirs
from exedge.queue.commit_worker import SPARE_PREFIX

SMALL = 100 * 1024        # kept in memory until the commit: the commit worker meets ENOSPC
LARGE = 700 * 1024        # spilled to incoming/ while it arrives: the spool thread meets ENOSPC


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MB tmpfs, unmounted after the test (and after the servers on it have stopped)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "small"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        r = subprocess.run(["umount", str(where)], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(where)], timeout=30)


def held_config(spool, back_pressure: str) -> str:
    """Mail for example.com waits in a held queue (schedule Never), so the spool only fills."""
    return server_config(
        server={"spool_directory": str(spool)},
        receive_connectors=({"name": "From Internet", "usage": "Internet", "bindings": ("127.0.0.1:{port}",),
                             "tarpit_interval": 0},),
        send_connectors=(dict(LOCAL_DROP, schedule="Never"),),
        extra="\n[back_pressure]\n" + back_pressure)


def body(size: int, n: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    return f"Subject: message {n}\r\n\r\n".encode() + line * (size // len(line))


def attempt(port: int, size: int, n: int) -> tuple[str, int, bytes]:
    """One message: ("mail" or "data", code, text) of the reply that ended it."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.test")
        code, text = c.mail("alice@partner.test")
        if code != 250:
            return "mail", code, text
        assert c.rcpt("bob@example.com")[0] == 250
        code, text = c.data(body(size, n))
        return "data", code, text


def start(workdir, config: str) -> Server:
    port = free_port()
    return Server(workdir, config.format(port=port), port).start()


def fill(server, sizes, until) -> tuple[list[str], list]:
    """Send messages of C{sizes} in turn until C{until(results)}; the queue ids acknowledged, and every result."""
    acknowledged, results = [], []
    for n in range(200):
        size = sizes[n % len(sizes)]
        stage, code, text = attempt(server.port, size, n)
        results.append((size, stage, code, text))
        if code == 250:
            acknowledged.append(re.match(rb"2\.6\.0 <([0-9A-F]+)>", text).group(1).decode())
        else:
            assert (code, text[:5]) == (452, b"4.3.1"), results
        if until(results):
            return acknowledged, results
    raise AssertionError(f"never done: {results}")


def assert_recovered(workdir, spool, config, acknowledged, server):
    server.stop()
    assert os.listdir(spool / "incoming") == [], "a partial file was left behind"
    again = start(workdir, config)
    try:
        # recovery runs in the background: wait for this run's end of it (the log goes on from the first run)
        runs = again.wait_for(lambda: len(found := re.findall(r"recovery finished: (\d+) message\(s\) recovered",
                                                              again.log)) >= 2 and found,
                              what="the second run's recovery to finish")
        assert runs[-1] == str(len(acknowledged)), again.log[-3000:]
        assert sorted(os.listdir(spool / "queue")) == sorted(acknowledged)
    finally:
        again.stop()


def test_disk_full_at_data_answers_452_without_traceback_and_keeps_what_it_acknowledged(tmp_path, tmpfs):
    workdir = tmp_path / "server"
    workdir.mkdir()
    config = held_config(tmpfs, "enabled = false\n")
    server = start(workdir, config)
    try:
        def both_sizes_refused(results):
            refused = {size for size, _, code, _ in results if code == 452}
            return refused == {SMALL, LARGE} and len(results) >= 12

        acknowledged, results = fill(server, [SMALL, LARGE], both_sizes_refused)
        assert len(acknowledged) >= 2
        assert all(stage == "data" for _, stage, _, _ in results)
        assert {text for _, _, code, text in results if code == 452} == {b"4.3.1 Insufficient system storage"}
        log = server.log
        assert "Traceback" not in log and " 451 " not in log and "451 4." not in log, log[-3000:]   # not a bare "451": hex ids hold it
        assert "the spool's file system is full" in log
        # no partial message left; the commit worker's empty spares are not messages
        server.wait_for(lambda: [n for n in os.listdir(tmpfs / "incoming") if not n.startswith(SPARE_PREFIX)] == [],
                        what="incoming/ to hold no message")
    finally:
        server.stop()
    assert_recovered(workdir, tmpfs, config, acknowledged, server)


def test_disk_full_seen_by_back_pressure_refuses_at_mail_from(tmp_path, tmpfs):
    workdir = tmp_path / "server"
    workdir.mkdir()
    # the defaults: Medium below "1GB or 10%" (here 10 % of 2 MB), High below "500MB or 5%"
    config = held_config(tmpfs, "enabled = true\n")
    server = start(workdir, config)
    try:
        acknowledged, results = fill(server, [SMALL], lambda results: results[-1][2] == 452)
        # the monitor samples every 2 seconds: MAIL FROM is refused once it has seen the disk
        deadline = time.monotonic() + 10
        while True:
            stage, code, text = attempt(server.port, SMALL, 999)
            if stage == "mail":
                break
            assert time.monotonic() < deadline, "MAIL FROM was never refused"
            assert code == 452, (stage, code, text)
            time.sleep(0.2)
        assert (code, text) == (452, b"4.3.1 Insufficient system resources")
        assert "back pressure: free_space Normal -> " in server.log
        assert "Traceback" not in server.log, server.log[-3000:]
    finally:
        server.stop()
    assert_recovered(workdir, tmpfs, config, acknowledged, server)


# -- durability details ---------------------------------------------------------------------

def test_new_directories_are_fsynced_in_their_parent(tmp_path, monkeypatch):
    import exedge.durable as durable
    synced = []
    real = durable.fsync_dir
    monkeypatch.setattr(durable, "fsync_dir", lambda path: (synced.append(path), real(path))[1])
    make_dirs(str(tmp_path / "a" / "b" / "c"))
    assert synced == [str(tmp_path), str(tmp_path / "a"), str(tmp_path / "a" / "b")]
    synced.clear()
    make_dirs(str(tmp_path / "a" / "b" / "c"))      # there already: nothing made, nothing synced
    assert synced == []


def test_spool_and_drop_directories_made_durably_and_a_drop_tmp_left_by_a_crash_removed(tmp_path):
    """
    strace would show the fsyncs; here a server starts on a fresh working
    directory and the directories' creation goes through make_dirs (the
    unit test above shows it syncs). A .tmp of ours in the drop directory is
    removed at start, never renamed into a delivery; someone else's file stays.
    """
    workdir = tmp_path / "server"
    drop = workdir / "var" / "drop"
    drop.mkdir(parents=True)
    abandoned = drop / ".0000018F2A3B4C5DABCD0001.tmp"
    abandoned.write_bytes(b"X-Sender: <a@partner.test>\r\nX-Receiver: <bob@example.com>\r\n\r\nhalf a messa")
    theirs = drop / "reader-state.tmp"
    theirs.write_bytes(b"not ours")
    port = free_port()
    server = Server(workdir, server_config(receive_connectors=(
        {"name": "From Internet", "usage": "Internet", "bindings": ("127.0.0.1:{port}",), "tarpit_interval": 0},
    )).format(port=port), port).start()
    try:
        assert not abandoned.exists()
        assert theirs.read_bytes() == b"not ours"
        assert "removed .0000018F2A3B4C5DABCD0001.tmp" in server.log
        for d in ("incoming", "queue", "state", "corrupt"):
            assert (workdir / "var" / "spool" / d).is_dir()
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.sendmail("a@partner.test", ["bob@example.com"], b"Subject: after\r\n\r\nx\r\n")
        files = server.wait_for(server.drop_files, what="the delivery")
        assert len(files) == 1 and b"Subject: after" in open(files[0], "rb").read()
        assert sorted(os.listdir(drop)) == sorted([os.path.basename(files[0]), "reader-state.tmp"])
    finally:
        server.stop()
