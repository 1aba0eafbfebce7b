"""
Receive worker processes ([server] receive_workers = 2), with a real
twistd server: mail accepted and delivered; a worker killed with SIGKILL
mid-load loses no acknowledged message, delivers none twice and is
replaced; the per-source connection limit holds across workers; a reload
reaches every worker; a main process killed with SIGKILL leaves no worker
behind. Every process started here is stopped by its PID.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import time

from crash_load import body, delivered, start_senders
from test_metrics import scrape

WORKERS = "receive_workers = 2"


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent that is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _receive_workers(server) -> list[int]:
    return [p for p in _children(server.proc.pid) if "exedge.receive.worker" in _cmdline(p)]


def _ready_pids(server) -> set[int]:
    """The PIDs of the workers that have said they are ready."""
    return {int(pid) for pid in re.findall(r"receive worker \d \(pid (\d+)\) ready", server.log)}


def _wait_workers(server, count=2, ready=2) -> list[int]:
    """The receive workers' PIDs once C{count} run and C{ready} have said so since the server started."""
    server.wait_for(lambda: len(re.findall(r"receive worker \d \(pid \d+\) ready", server.log)) >= ready,
                    timeout=20, what=f"{ready} receive workers ready")
    return server.wait_for(lambda: len(_receive_workers(server)) == count and _receive_workers(server),
                           timeout=20, what=f"{count} receive workers")


def _body(token: str) -> bytes:
    return body(token, "workers", 40)


def _greeting(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        part = sock.recv(512)
        if not part:
            break
        data += part
    return data


def test_two_workers_accept_and_deliver(start_server):
    server = start_server(server=WORKERS)
    workers = _wait_workers(server)
    # concurrent sessions: the main process gives each to the least busy worker
    clients = [smtplib.SMTP("127.0.0.1", server.port, timeout=10) for _ in range(4)]
    try:
        for n, client in enumerate(clients * 5):
            client.sendmail("sender@workers.test", ["rcpt@example.com"], _body(f"A{n:02d}"))
    finally:
        for client in clients:
            client.quit()
    seen = delivered(server)
    assert seen == {f"A{n:02d}": 1 for n in range(20)}
    assert sorted(_receive_workers(server)) == sorted(workers)
    # both workers served sessions; the tracking log (written by the main process) has every RECEIVE
    assert all(f"receive worker {n}: " in server.log for n in (0, 1)), server.log[-3000:]
    server.wait_for(lambda: _tracking(server).count(",SMTP,RECEIVE,") == 20, what="20 RECEIVE events")


def _tracking(server) -> str:
    directory = server.path("var", "log", "MessageTracking")
    if not os.path.isdir(directory):
        return ""
    text = ""
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            text += f.read()
    return text


def test_kill_9_of_workers_mid_load_loses_and_duplicates_nothing(start_server):
    """Three kills, each of a worker serving ten busy connections: every 250 delivered once."""
    server = start_server(server=WORKERS)
    _wait_workers(server)
    tokens = [f"K{i:03d}" for i in range(600)]
    threads, acked, failed, stop = start_senders(server.port, tokens, mail_from="sender@workers.test",
                                                 subject="workers", lines=40, timeout=20)
    killed = []
    try:
        for n, at in enumerate((40, 100, 160)):
            deadline = time.monotonic() + 60
            while len(acked) < at and time.monotonic() < deadline:
                time.sleep(0.002)
            assert len(acked) >= at, f"mail stopped flowing before kill {n + 1}"
            # a worker that is serving now (it said it was ready: one killed before that would
            # never say so, and the count of ready lines below would wait for it): an original one,
            # or a replacement
            victim = server.wait_for(lambda: [p for p in _receive_workers(server)
                                              if p not in killed and p in _ready_pids(server)],
                                     what="a live worker")[0]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
            acked_at_last_kill = len(acked)
    finally:
        if len(killed) < 3:
            stop.set()
        for t in threads:
            t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert acked_at_last_kill < 600, "the kills came too late to test anything"
    assert len(acked) > acked_at_last_kill, "mail stopped flowing after the last kill"
    assert acked | failed == set(tokens)
    # every victim replaced: two workers again, none of them killed
    workers = _wait_workers(server, ready=2 + len(killed))
    assert not set(workers) & set(killed)

    seen = delivered(server)
    assert not {t: n for t, n in seen.items() if n > 1}, "delivered twice"
    assert acked <= set(seen), f"acknowledged but lost: {sorted(acked - set(seen))}"
    # announced and queued in the instant before the worker died, its 250 unsent: SMTP's known duplicate
    assert len(set(seen) - acked) <= 30


def test_per_source_connection_limit_holds_across_workers(start_server):
    server = start_server(server=WORKERS, internet="max_inbound_connection_per_source = 3")
    _wait_workers(server)
    held = []
    try:
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            held.append(s)
            assert _greeting(s).startswith(b"220 "), "refused below the limit"
        # three sessions, spread over both workers: the fourth is refused all the same
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        held.append(s)
        assert _greeting(s).startswith(b"421 4.3.2 ")
        # a session that ends is released: a new one is served again
        held.pop(0).close()

        def served():
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as probe:
                return _greeting(probe).startswith(b"220 ")
        server.wait_for(served, what="the closed session to be released")

        # the sessions of workers that die are released too
        for s in held:
            s.close()
        held = server.wait_for(lambda: _sessions(server, 3), what="three sessions once the others are released")
        for pid in _receive_workers(server):
            os.kill(pid, signal.SIGKILL)
        _wait_workers(server, ready=4)
        for s in held:
            s.close()          # already closed by the kill: their ends here only
        held = server.wait_for(lambda: _sessions(server, 3), what="the dead workers' sessions to be released")
    finally:
        for s in held:
            s.close()


def _sessions(server, count: int) -> list[socket.socket] | None:
    """C{count} sessions open at once, each greeted 220; None (all closed) if any is refused."""
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(count)]
    if all(_greeting(s).startswith(b"220 ") for s in socks):
        return socks
    for s in socks:
        s.close()
    return None


def test_reload_reaches_every_worker(start_server):
    server = start_server(server=WORKERS)
    _wait_workers(server)
    second = _free_port()
    with open(server.config_path) as f:
        text = f.read()
    text = text.replace('max_message_size = "36MB"', 'max_message_size = "10MB"', 1)
    text = text.replace(f'bindings = ["127.0.0.1:{server.port}"]',
                        f'bindings = ["127.0.0.1:{server.port}", "127.0.0.1:{second}"]', 1)
    assert 'max_message_size = "10MB"' in text and str(second) in text
    with open(server.config_path, "w") as f:
        f.write(text)
    os.kill(server.proc.pid, signal.SIGHUP)
    server.wait_for(lambda: server.log.count("configuration reloaded") >= 2, what="both workers reloaded")

    # two sessions at once: one on each worker; both speak the new configuration
    clients = [smtplib.SMTP("127.0.0.1", server.port, timeout=10), smtplib.SMTP("127.0.0.1", second, timeout=10)]
    try:
        for client in clients:
            client.ehlo("client.test")
            assert client.esmtp_features["size"] == str(10 * 1024 * 1024)
        clients[1].sendmail("sender@workers.test", ["rcpt@example.com"], _body("R1"))
    finally:
        for client in clients:
            client.quit()
    assert delivered(server) == {"R1": 1}


def test_main_process_killed_leaves_no_worker_behind(start_server):
    server = start_server(server=WORKERS)
    workers = _wait_workers(server)
    family = workers + [c for w in workers for c in _children(w)]    # their commit workers too
    assert len(family) == 4
    try:
        server.kill()
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in family if _alive(p)], "orphaned workers"
    finally:
        for p in family:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



# -- back pressure: measured in the main process, applied by every worker's sessions ----------------

def test_back_pressure_refuses_in_workers_as_in_one_process(start_server):
    # "100%": less free space than the whole file system, so Medium from the first sample, before any worker
    server = start_server(server=WORKERS, extra='\n[back_pressure]\nmin_free_space_medium = "100%"\n')
    _wait_workers(server)
    for _ in range(4):          # both workers get sessions (the least busy one each time)
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
            c.ehlo("client.test")
            assert c.mail("a@partner.test") == (452, b"4.3.1 Insufficient system resources")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10, source_address=("127.0.0.2", 0)) as c:
        c.sendmail("a@partner.test", ["bob@example.com"], _body("SECURED"))
    assert delivered(server) == {"SECURED": 1}


def test_a_level_change_reaches_a_session_already_running_in_a_worker(start_server):
    # two messages waiting (held: no send connector serves held.test) put the queue at Medium
    server = start_server(server=WORKERS, extra='\n[[accepted_domains]]\ndomain_name = "held.test"\n'
                                                'domain_type = "InternalRelay"\n'
                                                '\n[back_pressure]\nmax_queue_length_medium = 1\n'
                                                'max_queue_length_high = 1000\n')
    _wait_workers(server)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as waiting:
        waiting.ehlo("client.test")
        assert waiting.mail("a@partner.test")[0] == 250      # Normal: the queue is empty
        assert waiting.rset()[0] == 250
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10, source_address=("127.0.0.2", 0)) as c:
            for n in range(2):
                c.sendmail("a@partner.test", ["x@held.test"], _body(f"HELD{n}"))
        server.wait_for(lambda: "back pressure: queue_length Normal -> Medium" in server.log, timeout=15,
                        what="the queue's level to change")
        # the main process tells the worker as it logs; its frame may land a moment after the line
        deadline = time.monotonic() + 5
        while True:
            reply = waiting.mail("a@partner.test")
            if reply[0] != 250 or time.monotonic() > deadline:
                break
            waiting.rset()
        assert reply == (452, b"4.3.1 Insufficient system resources")
    assert "Traceback" not in server.log


def test_back_pressure_watches_the_memory_of_the_workers_too(start_server):
    from manage_scenario import client_of
    from exedge.pressure import rss_of
    server = start_server(server=WORKERS)
    workers = _wait_workers(server)

    def sampled_with_workers():
        with client_of(server) as client:
            value = client.request("GET", "/api/status")["back_pressure"]["resources"]["memory"]["value"]
        # main alone is less than main and its smaller worker: only a sample that counts the workers passes
        return value is not None and value >= rss_of(server.proc.pid) + 0.8 * min(map(rss_of, workers))

    server.wait_for(sampled_with_workers, timeout=15, what="a memory sample that counts the receive workers")


# -- ETRN and ATRN ask the queue: their connectors' sessions stay in the main process ----------------

def test_etrn_with_workers_releases_the_held_mail(start_server, sinks):
    from test_etrn import ETRN_SERVER
    sink = sinks("branch")
    server = start_server(server=WORKERS, extra=ETRN_SERVER.format(sink=sink.port))
    _wait_workers(server)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.sendmail("alice@partner.test", ["bob@branch.fabrikam.com"], _body("BRANCH"))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10, source_address=("127.0.0.2", 0)) as c:
        c.sendmail("alice@partner.test", ["bob@example.com"], _body("INTERNAL"))
    server.wait_for(lambda: len(os.listdir(server.path("var", "spool", "queue"))) == 1, what="the held message alone")
    assert not sink.files()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.ehlo("branch.fabrikam.com")
        assert c.has_extn("etrn")
        assert c.docmd("ETRN", "branch.fabrikam.com") == (
            253, b"2.0.0 OK, 1 pending messages for node branch.fabrikam.com started")
    [delivered] = server.wait_for(sink.files, what="the released message at the branch")
    assert b"X-Test-Token: BRANCH" in delivered
    # where each session ran: the internal connector (no ETRN stage) in a worker, whose log lines the
    # main process logs with the worker's name; From Internet, with the ETRN stage, in the main process
    received = [line for line in server.log.splitlines() if "received in session" in line]
    assert len(received) == 2, received
    assert [bool(re.search(r"receive worker \d: ", line)) for line in received] == [False, True], received
    assert "on From Internet" in received[0] and "on From Internal Org" in received[1]


def test_a_size_the_spool_cannot_take_is_refused_in_a_worker(start_server, tmp_path):
    # High 1 GB below today's free space: Normal, but a 5 GB message would go past it
    free = os.statvfs(str(tmp_path)).f_bavail * os.statvfs(str(tmp_path)).f_frsize
    threshold = f"{(free - 1024**3) // 1024**2}MB"
    server = start_server(server=WORKERS, internet='max_message_size = "10GB"',
                          extra=f'\n[back_pressure]\nmin_free_space_medium = "{threshold}"\n'
                                f'min_free_space_high = "{threshold}"\n')
    _wait_workers(server)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.ehlo("client.test")
        assert c.mail("a@partner.test", [f"SIZE={5 * 1024**3}"]) == (452, b"4.3.1 Insufficient system storage")
        assert c.mail("a@partner.test", ["SIZE=1000"])[0] == 250
    assert "Traceback" not in server.log


class _Stream:
    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass


def test_a_workers_log_lines_of_one_turn_go_out_in_one_write_and_an_error_at_once():
    """The main process reads them line by line either way; a write each cost a system call and a wake-up."""
    from twisted.internet import task
    from twisted.logger import LogLevel, Logger

    from exedge.children import StderrLog

    clock = task.Clock()
    clock.running = True
    stream = _Stream()
    log = Logger(namespace="test", observer=StderrLog(clock, stream))
    log.info("connect {n}", n=1)
    log.warn("odd \x1b[31m")
    log.info("disconnect")
    assert stream.writes == []                      # not yet: the turn goes on
    clock.advance(0)
    assert stream.writes == ["info\tconnect 1\nwarn\todd \\x1b[31m\ninfo\tdisconnect\n"]
    log.info("received")
    log.emit(LogLevel.error, "commit failed")         # written at once, after what waited, in order
    assert stream.writes[1:] == ["info\treceived\nerror\tcommit failed\n"]
    clock.advance(0)
    assert len(stream.writes) == 2
    clock.running = False                             # stopping: nothing waits for a turn that may not come
    log.info("Main loop terminated.")
    assert stream.writes[2:] == ["info\tMain loop terminated.\n"]


def test_metrics_add_up_what_every_worker_counted_and_keep_a_dead_workers_counts(start_server):
    """Commit latency and pipeline verdicts happen in the workers; /metrics is the main process's."""
    server = start_server(server=WORKERS, extra='[[pipeline]]\nstage = "sender_filter"\nblocked_domains = ["spam.test"]\n')
    workers = _wait_workers(server)
    clients = [smtplib.SMTP("127.0.0.1", server.port, timeout=10) for _ in range(4)]
    try:
        for n, client in enumerate(clients * 3):
            client.sendmail("sender@workers.test", ["rcpt@example.com"], _body(f"M{n:02d}"))
        for client in clients:
            code, _ = client.mail("x@spam.test")
            assert code == 554                      # sender_filter's refusal
            client.rset()
    finally:
        for client in clients:
            client.quit()
    commits = ("exedge_spool_commit_seconds_count", frozenset())
    refused = ("exedge_pipeline_verdicts_total",
               frozenset({"stage": "sender_filter", "hook": "on_mail", "verdict": "reject"}.items()))
    server.wait_for(lambda: scrape(server).get(commits) == 12 and scrape(server).get(refused) == 4,
                    timeout=15, what="12 commits and 4 refusals reported by the workers")
    served = [p for p in workers if p in _receive_workers(server)]
    os.kill(served[0], signal.SIGKILL)
    _wait_workers(server, ready=3)                  # replaced; what the dead one had reported stays
    samples = scrape(server)
    assert samples.get(commits) == 12 and samples.get(refused) == 4


def test_a_dead_workers_commit_published_between_the_unlinks_is_still_removed(tmp_path, monkeypatch):
    """
    The dead worker's commit worker renames incoming/<id> into queue/ at the worst moment: just
    after the server's first unlink. Whatever that moment, nothing unacknowledged stays in queue/.
    """
    from exedge.receive.workers import remove_unannounced

    incoming, queue = tmp_path / "incoming", tmp_path / "queue"
    incoming.mkdir()
    queue.mkdir()
    (incoming / "0662AB").write_bytes(b"never acknowledged")
    real_unlink = os.unlink
    calls = []

    def unlink_then_the_commit_worker_publishes(path):
        calls.append(os.path.basename(os.path.dirname(path)))
        try:
            real_unlink(path)
        finally:
            if len(calls) == 1:
                try:
                    os.rename(incoming / "0662AB", queue / "0662AB")
                except FileNotFoundError:
                    pass                  # too late: its file is gone, the publication fails
    monkeypatch.setattr(os, "unlink", unlink_then_the_commit_worker_publishes)
    remove_unannounced({"0662AB"}, str(incoming), str(queue))
    monkeypatch.undo()
    assert os.listdir(queue) == [] and os.listdir(incoming) == []
    assert calls == ["incoming", "queue"]
