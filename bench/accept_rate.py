#!/usr/bin/env python
"""
Durable accept rate: exedge against a stock-Twisted reference, in one run.

For each message size (1 KiB, 100 KiB) and each number of concurrent
connections (1, 10, 50) this script starts, in fresh temporary working
directories on 127.0.0.1 ports:

  - the reference server (bench/reference_server.py: stock
    twisted.mail.smtp.ESMTP that fsyncs each message before its 250), and
  - exedge itself (a real "twistd exedge --config ..." subprocess, configured
    as tests/harness.py's config_text with tarpit 0),

drives the same load at each with the same load generator (Postfix's
smtp-source when installed, else the asyncio client below: k connections
sharing N messages, each connection sending EHLO once, then MAIL, RCPT,
DATA, the data and the final dot for message after message, waiting for
every reply; no PIPELINING, which stock Twisted does not offer), and reports
messages acknowledged with 250 after the final dot per second of wall time
(first connect to last 250), and the ratio exedge/reference. Each server
runs 3 times per configuration, alternating with the other; the median
counts.

    .venv/bin/python bench/accept_rate.py                # full run, ~2 min
    .venv/bin/python bench/accept_rate.py --quick        # smoke run, ~15 s
    .venv/bin/python bench/accept_rate.py --messages 4000 --only 1KiB/50

Results go to stdout (a table) and bench/results/latest.json. See
bench/README.md for how to read them. This is a measurement, not a test:
nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import harness  # noqa: E402  (tests/harness.py: exedge's canonical test config and twistd runner)
import against  # noqa: E402  (bench/against.py: another commit of exedge, for --against)

HOST = "127.0.0.1"
SIZES = {"1KiB": 1024, "100KiB": 100 * 1024}
CONCURRENCY = (1, 10, 50)
SENDER = "bench@sender.test"
RECIPIENT = "bench@example.com"      # an accepted domain of config_text: delivered to var/drop
WARMUP = 20                          # messages on one connection before timing, per server and run
REPLY_TIMEOUT = 30.0                 # seconds for any one SMTP reply
STOP_TIMEOUT = 15.0

# exedge knobs for the benchmark: no tarpit, room for 50 sessions from one
# address (the default per-source limit is 20), sessions that outlive a run.
EXEDGE_INTERNET = """\
max_inbound_connection_per_source = 1000
connection_timeout = "1h"
connection_inactivity_timeout = "5m"
"""


# -- the messages -----------------------------------------------------------

def make_message(index: int, size: int, tag: str) -> bytes:
    """A message of exactly C{size} octets (before the final dot), CRLF lines, nothing to dot-stuff."""
    head = (
        f"From: <{SENDER}>\r\n"
        f"To: <{RECIPIENT}>\r\n"
        f"Subject: bench {tag} #{index}\r\n"
        f"Message-ID: <{tag}.{index}@sender.test>\r\n"
        f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=us-ascii\r\n"
        f"\r\n"
    ).encode("ascii")
    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n"   # 74 octets
    need = size - len(head)
    full, rest = divmod(need, len(line))
    if rest == 1:          # no room for a line of its own: lengthen one
        full, rest = full - 1, rest + len(line)
    body = line * full + (b"x" * (rest - 2) + b"\r\n" if rest else b"")
    data = head + body
    assert len(data) == size, (len(data), size)
    return data


# -- the Python load generator --------------------------------------------

class SMTPReplyError(Exception):
    def __init__(self, stage: str, reply: bytes):
        super().__init__(f"{stage}: {reply[:200]!r}")
        self.stage = stage
        self.reply = reply


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    lines = []
    for _ in range(100):   # bounded multi-line reply
        line = await asyncio.wait_for(reader.readuntil(b"\r\n"), REPLY_TIMEOUT)
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            break
    last = lines[-1]
    try:
        code = int(last[:3])
    except ValueError:
        code = 0
    return code, b"".join(lines)


async def _expect(reader, writer, command: bytes | None, want: int, stage: str) -> None:
    if command is not None:
        writer.write(command)
    code, text = await _reply(reader)
    if code != want:
        raise SMTPReplyError(stage, text)


class Load:
    """N messages shared by k connections; counts what got its 250."""

    def __init__(self, port: int, count: int, size: int, concurrency: int, tag: str, deadline: float):
        self.port = port
        self.count = count
        self.concurrency = concurrency
        self.deadline = deadline
        self.tag = tag
        self.size = size
        self.next = 0
        self.ok = 0
        self.failed = 0                    # messages sent that did not get their 250
        self.failures: list[str] = []      # what went wrong (messages and sessions)
        self.latencies: list[float] = []
        self.first_connect = None
        self.last_ack = None
        self.truncated = False

    def _message(self, i: int) -> bytes:
        # only the Subject and Message-ID differ; keep the exact size
        return make_message(i, self.size, self.tag) + b".\r\n"

    def _claim(self) -> int | None:
        if self.next >= self.count:
            return None
        if time.perf_counter() > self.deadline:
            self.truncated = True
            return None
        i, self.next = self.next, self.next + 1
        return i

    async def _session(self) -> None:
        reconnects = 0
        while reconnects <= 3:
            if self.next >= self.count or time.perf_counter() > self.deadline:
                return
            writer = None
            current = None
            try:
                if self.first_connect is None:
                    self.first_connect = time.perf_counter()
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(HOST, self.port, limit=1 << 20), REPLY_TIMEOUT)
                await _expect(reader, writer, None, 220, "banner")
                await _expect(reader, writer, b"EHLO client.bench.test\r\n", 250, "EHLO")
                while (current := self._claim()) is not None:
                    data = self._message(current)
                    started = time.perf_counter()
                    try:
                        await _expect(reader, writer, b"MAIL FROM:<" + SENDER.encode() + b">\r\n", 250, "MAIL")
                        await _expect(reader, writer, b"RCPT TO:<" + RECIPIENT.encode() + b">\r\n", 250, "RCPT")
                        await _expect(reader, writer, b"DATA\r\n", 354, "DATA")
                        writer.write(data)
                        if len(data) > 65536:
                            await writer.drain()
                        await _expect(reader, writer, None, 250, "end of data")
                    except SMTPReplyError as e:
                        self.failed += 1
                        self.failures.append(f"message {current}: {e}")
                        current = None
                        await _expect(reader, writer, b"RSET\r\n", 250, "RSET")
                        continue
                    now = time.perf_counter()
                    self.ok += 1
                    self.last_ack = now
                    self.latencies.append(now - started)
                    current = None
                writer.write(b"QUIT\r\n")
                try:
                    await asyncio.wait_for(_reply(reader), 2.0)
                except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError):
                    pass
                return
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, SMTPReplyError) as e:
                if current is not None:
                    self.failed += 1
                    self.failures.append(f"message {current}: {type(e).__name__}: {e}")
                else:
                    self.failures.append(f"session: {type(e).__name__}: {e}")
                reconnects += 1
            finally:
                if writer is not None:
                    writer.close()

    async def run(self) -> None:
        sessions = [asyncio.ensure_future(self._session()) for _ in range(self.concurrency)]
        remaining = max(self.deadline - time.perf_counter(), 1.0) + REPLY_TIMEOUT
        done, pending = await asyncio.wait(sessions, timeout=remaining)
        for task in pending:
            task.cancel()
            self.truncated = True
        for task in done:
            if task.exception() is not None:
                self.failures.append(f"session crashed: {task.exception()!r}")
        # messages never sent because every session gave up count as failures
        # too (a run cut short by its time cap is reported as truncated instead)
        unsent = 0 if self.truncated else self.count - self.next
        if unsent:
            self.failed += unsent
            self.failures.append(f"{unsent} message(s) never sent")


def python_load(port: int, count: int, size: int, concurrency: int, tag: str, deadline: float) -> dict:
    load = Load(port, count, size, concurrency, tag, deadline)
    asyncio.run(load.run())
    elapsed = (load.last_ack - load.first_connect) if load.ok else None
    lat = sorted(load.latencies)
    return {
        "acknowledged": load.ok,
        "attempted": load.next,
        "failures": load.failed,
        "failure_samples": load.failures[:5],
        "seconds": elapsed,
        "truncated": load.truncated,
        "latency_p50_ms": round(lat[len(lat) // 2] * 1000, 2) if lat else None,
        "latency_p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2) if lat else None,
    }


# -- Postfix smtp-source as the load generator ---------------------------

def smtp_source_load(binary: str, port: int, count: int, size: int, concurrency: int,
                     deadline: float, committed) -> dict:
    """
    smtp-source aborts on the first unexpected reply and reports no counts,
    so what it got acknowledged is what the server committed to disk during
    the run (both servers answer 250 only after the fsync and commit nothing
    without answering 250). Its time includes its own start-up, a few ms.
    """
    before = committed()
    # -l is the body length, without the few header lines smtp-source adds
    cmd = [binary, "-d", "-s", str(concurrency), "-m", str(count), "-l", str(max(size - 200, 1)),
           "-f", SENDER, "-t", RECIPIENT, "-M", "client.bench.test", f"inet:{HOST}:{port}"]
    started = time.perf_counter()
    timeout = max(deadline - started, 1.0) + REPLY_TIMEOUT
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
        truncated, rc, err = False, proc.returncode, proc.stderr.decode(errors="replace")[-500:]
    except subprocess.TimeoutExpired as e:
        truncated, rc, err = True, None, (e.stderr or b"").decode(errors="replace")[-500:]
    elapsed = time.perf_counter() - started
    acked = committed() - before
    return {
        "acknowledged": acked, "attempted": count, "failures": 0 if truncated else count - acked,
        "failure_samples": [f"smtp-source exit {rc}: {err}"] if rc else [],
        "seconds": elapsed, "truncated": truncated,
        "latency_p50_ms": None, "latency_p99_ms": None,
    }


# -- the servers -------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """
    User + system CPU time so far of a process, all its threads and its
    running children (exedge's commit worker is a child process; its time
    would reach the parent's counters only when it exits).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        total = (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return None
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        children = []
    for child in children:
        total += cpu_seconds(child) or 0.0
    return total


def wait_listening(port: int, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5) as s:
                s.recv(512)
                s.sendall(b"QUIT\r\n")
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


def stop_process(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT)


def _names(directory: str, suffix: str = "") -> set[str]:
    try:
        return {n[: len(n) - len(suffix)] for n in os.listdir(directory) if n.endswith(suffix)}
    except FileNotFoundError:
        return set()


def _count_errors(path: str) -> int:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f if "Traceback" in line or "Unhandled" in line)
    except FileNotFoundError:
        return 0


class Reference:
    name = "reference"

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.port = harness.free_port(HOST)
        self.spool = os.path.join(workdir, "spool")
        self.log_path = os.path.join(workdir, "reference.log")
        self.proc = None
        self._log = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "reference_server.py"), "--port", str(self.port),
             "--spool", self.spool],
            cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT)
        wait_listening(self.port, self.proc, "reference server")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        try:
            stop_process(self.proc)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def committed(self) -> int:
        return len(_names(os.path.join(self.spool, "new")))

    def backlog(self) -> int:
        return 0

    def drain(self, timeout: float) -> float | None:
        return 0.0

    def errors_in_log(self) -> int:
        return _count_errors(self.log_path)


class Exedge:
    name = "exedge"

    code: str | None = None   # another checkout of exedge to run (--against), None: this one
    server_lines: str = ""    # [server] lines for this side (--server, --reference-server)

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.port = harness.free_port(HOST)
        internet = EXEDGE_INTERNET
        if against.knows(self.code, "max_inbound_data_sessions_per_source"):
            internet += "max_inbound_data_sessions_per_source = 1000\n"     # 50 senders from one address
        config = harness.config_text(self.port, tarpit="0", internet=internet, server=self.server_lines)
        self.server = harness.Server(workdir, config, self.port, code=self.code)

    def start(self) -> None:
        self.server.start()

    @property
    def pid(self) -> int | None:
        return self.server.proc.pid if self.server.proc else None

    def stop(self) -> None:
        self.server.stop()

    def _queue(self) -> set[str]:
        return _names(self.server.path("var", "spool", "queue"))

    def committed(self) -> int:
        """Queue ids still in the queue or already in the drop directory (a message can be in both for a moment)."""
        return len(self._queue() | _names(self.server.path("var", "drop"), ".eml"))

    def backlog(self) -> int:
        """Acknowledged but not yet delivered to the drop directory."""
        return len(self._queue())

    def drain(self, timeout: float) -> float | None:
        """Seconds until the queue is empty (None: not within C{timeout})."""
        started = time.perf_counter()
        while time.perf_counter() - started < timeout:
            if not self._queue():
                return time.perf_counter() - started
            time.sleep(0.02)
        return None

    def errors_in_log(self) -> int:
        return _count_errors(self.server.log_path)


# -- one measurement -------------------------------------------------------

def measure(kind, base: str, size_name: str, concurrency: int, count: int, loadgen: str | None,
            run_deadline: float, drain: bool) -> dict:
    """One fresh server, warm-up, the timed load, checks; the server is always stopped."""
    workdir = tempfile.mkdtemp(prefix=f"{kind.name}-{size_name}-c{concurrency}-", dir=base)
    server = kind(workdir)
    size = SIZES[size_name]
    tag = f"{kind.name}-{size_name}-c{concurrency}-{os.path.basename(workdir)}"
    try:
        server.start()
        warm = python_load(server.port, WARMUP, size, 1, tag + "-warmup", run_deadline)
        if warm["failures"] or not warm["acknowledged"]:
            raise RuntimeError(f"{kind.name} failed the warm-up: {warm['failure_samples']}")
        committed_before = server.committed()
        cpu_before, client_before = cpu_seconds(server.pid), time.process_time()
        if loadgen:
            result = smtp_source_load(loadgen, server.port, count, size, concurrency, run_deadline,
                                      server.committed)
        else:
            result = python_load(server.port, count, size, concurrency, tag, run_deadline)
        cpu_after, client_after = cpu_seconds(server.pid), time.process_time()
        result["backlog"] = server.backlog()
        result["on_disk"] = server.committed() - committed_before
        result["on_disk_ok"] = result["on_disk"] == result["acknowledged"]
        if cpu_before is not None and cpu_after is not None and result["acknowledged"]:
            # includes work for earlier messages still being delivered (exedge's backlog)
            result["server_cpu_us_per_msg"] = round((cpu_after - cpu_before) / result["acknowledged"] * 1e6)
        else:
            result["server_cpu_us_per_msg"] = None
        if result["seconds"]:
            result["client_cpu_pct"] = round((client_after - client_before) / result["seconds"] * 100)
        result["drain_seconds"] = server.drain(timeout=60.0) if drain else None
        result["log_errors"] = server.errors_in_log()
    finally:
        server.stop()
    result["rate"] = (result["acknowledged"] / result["seconds"]) if result["seconds"] else 0.0
    # the same messages over the time until the last was also delivered (exedge's queue empty)
    result["rate_with_delivery"] = (result["acknowledged"] / (result["seconds"] + result["drain_seconds"])
                                    if result["seconds"] and result["drain_seconds"] is not None else None)
    return result


def summarize(runs: list[dict]) -> dict:
    rates = [r["rate"] for r in runs]
    cpu = [r["server_cpu_us_per_msg"] for r in runs if r.get("server_cpu_us_per_msg")]
    delivered = [r["rate_with_delivery"] for r in runs if r.get("rate_with_delivery") is not None]
    return {
        "rate": statistics.median(rates) if rates else 0.0,
        "rate_with_delivery": statistics.median(delivered) if len(delivered) == len(runs) and runs else None,
        "rate_min": min(rates, default=0.0),
        "rate_max": max(rates, default=0.0),
        "server_cpu_us_per_msg": statistics.median(cpu) if cpu else None,
        "acknowledged": sum(r["acknowledged"] for r in runs),
        "failures": sum(r["failures"] for r in runs),
        "truncated": any(r["truncated"] for r in runs),
        "on_disk_ok": all(r["on_disk_ok"] for r in runs),
        "log_errors": sum(r["log_errors"] for r in runs),
        "max_backlog": max((r["backlog"] for r in runs), default=0),
        "runs": runs,
    }


# -- the run ---------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Durable accept rate of exedge vs. a stock-Twisted reference.")
    parser.add_argument("--messages", type=int, default=None,
                        help="messages per run at 1 KiB (default 1500; --quick 300)")
    parser.add_argument("--large-messages", type=int, default=None,
                        help="messages per run at 100 KiB (default: a third of --messages)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="runs per server and configuration, alternating servers; "
                             "the median rate is reported (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (~15 s; at most ~30 s on a slow machine)")
    parser.add_argument("--only", action="append", default=[], metavar="SIZE/CONNS",
                        help="only this configuration, e.g. 1KiB/50 (repeatable)")
    parser.add_argument("--loadgen", choices=("auto", "python", "smtp-source"), default="auto",
                        help="auto: smtp-source when installed, else the Python client")
    parser.add_argument("--no-drain", dest="drain", action="store_false",
                        help="do not wait, after each exedge run, for its drop delivery to catch up "
                             "(default: wait, up to 60 s, and report the rate including delivery)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="cap on the whole run (default 360; --quick 90); later runs are skipped")
    parser.add_argument("--run-seconds", type=float, default=None,
                        help="cap on one load run (default 40; --quick 15); a capped run is marked truncated")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "latest.json"), help="where to write the results")
    parser.add_argument("--keep", action="store_true", help="keep the temporary working directories")
    parser.add_argument("--against", metavar="REV",
                        help="compare with exedge at this git commit (e.g. HEAD~1) instead of the stock-Twisted "
                             "reference: the 'reference' columns are then that commit, alternating in one run")
    parser.add_argument("--server", default="", metavar="TOML",
                        help="[server] lines for exedge, e.g. 'receive_workers = 2'")
    parser.add_argument("--reference-server", default="", metavar="TOML",
                        help="with --against: [server] lines for the reference side (e.g. 'receive_workers = 0')")
    args = parser.parse_args(argv)
    global Reference
    Exedge.server_lines = args.server
    stack = contextlib.ExitStack()
    if args.against:
        tree, rev = stack.enter_context(against.checkout(args.against))

        class Reference(Exedge):     # noqa: F811 -- the baseline of this run is exedge at another commit
            name = "reference"
            code = tree
            server_lines = args.reference_server

    n_small = args.messages or (300 if args.quick else 1500)
    n_large = args.large_messages or max(n_small // 3, 1)
    rounds = max(1, args.rounds or (1 if args.quick else 3))
    max_seconds = args.max_seconds or (90.0 if args.quick else 360.0)
    run_seconds = args.run_seconds or (15.0 if args.quick else 40.0)

    found = shutil.which("smtp-source") or next(
        (p for p in ("/usr/sbin/smtp-source", "/usr/bin/smtp-source") if os.access(p, os.X_OK)), None)
    if args.loadgen == "smtp-source" and not found:
        parser.error("smtp-source is not installed (Debian: package postfix)")
    loadgen = found if args.loadgen in ("auto", "smtp-source") else None
    if loadgen:
        loadgen_desc = f"Postfix smtp-source ({loadgen})"
    elif args.loadgen == "auto":
        loadgen_desc = "Python asyncio client (smtp-source not installed)"
    else:
        loadgen_desc = "Python asyncio client"

    all_configs = [(s, c) for s in SIZES for c in CONCURRENCY]
    plan = all_configs
    if args.only:
        wanted = {tuple(o.split("/", 1)) for o in args.only}
        plan = [(s, c) for s, c in all_configs if (s, str(c)) in wanted]
        if not plan:
            parser.error("--only matched nothing; choose from " + " ".join(f"{s}/{c}" for s, c in all_configs))

    baseline = f"exedge at {rev}" if args.against else "stock-Twisted reference"
    print(f"exedge ({against.here()}) durable accept rate vs. {baseline}; load generator: {loadgen_desc}")
    print(f"  per run: {n_small} x 1 KiB or {n_large} x 100 KiB messages, after {WARMUP} untimed warm-up messages, "
          f"fresh server and directory; {rounds} round(s) per server, alternating; "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}", flush=True)

    started = time.perf_counter()
    base = tempfile.mkdtemp(prefix="exedge-bench-")
    rows = []
    try:
        for i, (size_name, conc) in enumerate(plan):
            count = n_small if size_name == "1KiB" else n_large
            runs = {"reference": [], "exedge": []}
            skipped = False
            for r in range(rounds):
                # alternate which server goes first, so neither always follows the other
                for kind in ((Reference, Exedge) if (i + r) % 2 == 0 else (Exedge, Reference)):
                    left = max_seconds - (time.perf_counter() - started)
                    if left < 5:
                        skipped = True
                        break
                    res = measure(kind, base, size_name, conc, count, loadgen,
                                  time.perf_counter() + min(run_seconds, left), args.drain)
                    runs[kind.name].append(res)
                    flags = []
                    if res["failures"]:
                        flags.append(f"{res['failures']} FAILED: {res['failure_samples'][:2]}")
                    if res["truncated"]:
                        flags.append("TRUNCATED by the time cap")
                    if not res["on_disk_ok"]:
                        flags.append(f"{res['on_disk']} on disk")
                    if res["log_errors"]:
                        flags.append(f"{res['log_errors']} errors in its log")
                    extra = ""
                    if res["latency_p50_ms"] is not None:
                        extra += f"  latency p50 {res['latency_p50_ms']:.1f} p99 {res['latency_p99_ms']:.1f} ms"
                    if res["server_cpu_us_per_msg"]:
                        extra += f"  cpu {res['server_cpu_us_per_msg']} us/msg"
                    if kind is Exedge:
                        extra += f"  queue backlog {res['backlog']}"
                        if res["drain_seconds"] is not None:
                            extra += f", delivered {res['drain_seconds']:.1f} s later"
                    print(f"  {size_name:>6} x{conc:<2} {kind.name:<9} {res['acknowledged']:5d} acked in "
                          f"{res['seconds'] or 0:6.2f} s = {res['rate']:7.1f}/s{extra}"
                          + (f"  [{'; '.join(flags)}]" if flags else ""), flush=True)
                if skipped:
                    break
            row = {"size": size_name, "concurrency": conc, "messages": count, "skipped": skipped}
            for name, rs in runs.items():
                row[name] = summarize(rs) if rs else None
            ref, exe = row["reference"], row["exedge"]
            row["ratio"] = exe["rate"] / ref["rate"] if ref and exe and ref["rate"] and exe["rate"] else None
            row["ratio_with_delivery"] = (exe["rate_with_delivery"] / ref["rate"]
                                          if row["ratio"] and exe["rate_with_delivery"] else None)
            rows.append(row)
            if skipped:
                print(f"  total time cap ({max_seconds:.0f} s) reached: the remaining runs are skipped", flush=True)
                break
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
        stack.close()
    total = time.perf_counter() - started

    print()
    print(f"Durable accept rate: messages acknowledged (250 after the final dot) per second, "
          f"median of {rounds} run(s); load generator: {loadgen_desc}")
    print(f"{'size':>7} {'conns':>5} {'msgs/run':>8} {'reference/s':>12} {'exedge/s':>9} {'exedge/ref':>10}"
          f" {'ref cpu':>8} {'exe cpu':>8} {'exe+deliv/s':>11} {'ratio':>6}  notes")
    problems = 0
    not_run = len(plan) - sum(1 for row in rows if not row["skipped"])
    for row in rows:
        ref, exe = row["reference"], row["exedge"]
        notes = []
        for name, res in (("ref", ref), ("exedge", exe)):
            if res is None:
                notes.append(f"{name} not run")
                problems += 1
                continue
            if row["skipped"]:
                notes.append(f"{name}: {len(res['runs'])} of {rounds} rounds")
            if rounds > 1:
                notes.append(f"{name} {res['rate_min']:.0f}-{res['rate_max']:.0f}")
            if res["failures"]:
                notes.append(f"{name}: {res['failures']} FAILED")
                problems += 1
            if not res["on_disk_ok"]:
                notes.append(f"{name}: on-disk count differs")
                problems += 1
            if res["log_errors"]:
                notes.append(f"{name}: {res['log_errors']} log errors")
                problems += 1
            if res["truncated"]:
                notes.append(f"{name}: truncated")
        if exe is not None and exe["max_backlog"]:
            notes.append(f"exedge backlog {exe['max_backlog']}")

        def rate(res):
            return f"{res['rate']:.1f}" if res else "-"

        def cpu(res):
            return f"{res['server_cpu_us_per_msg']:.0f}us" if res and res["server_cpu_us_per_msg"] else "-"
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
        with_delivery = f"{exe['rate_with_delivery']:.1f}" if exe and exe["rate_with_delivery"] else "-"
        ratio2 = f"{row['ratio_with_delivery']:.2f}x" if row["ratio_with_delivery"] else "-"
        print(f"{row['size']:>7} {row['concurrency']:>5} {row['messages']:>8} {rate(ref):>12} {rate(exe):>9}"
              f" {ratio:>10} {cpu(ref):>8} {cpu(exe):>8} {with_delivery:>11} {ratio2:>6}  {'; '.join(notes)}")
    print("cpu: server process CPU time (all threads, user+system) per acknowledged message, median run;")
    print("exe+deliv/s: exedge's messages over the time until its queue had also delivered them all to")
    print("  the drop directory, and its ratio to the reference (which has no delivery step);")
    print("notes: slowest-fastest run; the largest exedge queue backlog (acknowledged, not yet delivered) at the end of a run")
    if not_run:
        problems += 1
        print(f"NOT COMPLETE: {not_run} of {len(plan)} configuration(s) cut short or not run (time cap)")
    at50 = [r for r in rows if r["concurrency"] == 50 and r["ratio"] is not None]
    if at50:
        met = all(r["ratio"] >= 1.0 for r in at50)
        print("target exedge >= 1.0x reference at 50 connections: "
              + ", ".join(f"{r['size']} {r['ratio']:.2f}x" for r in at50) + (" -> met" if met else " -> NOT met"))
    print(f"total {total:.0f} s; " + (f"{problems} problem(s), see above" if problems
                                     else "every message acknowledged and found on disk"))

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": [os.path.basename(sys.executable)] + sys.argv,
            "loadgen": loadgen_desc,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "messages_1KiB": n_small, "messages_100KiB": n_large, "rounds": rounds, "warmup": WARMUP,
            "total_seconds": round(total, 1),
            "rows": rows,
        }, f, indent=2)
    print(f"results written to {os.path.relpath(args.json)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
