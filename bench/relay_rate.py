"""
The issue-14 table in one command: exedge against a private Postfix,
relay end to end and accept only, 1 KiB and 100 KiB, 1/10/50 connections.

`smtp-source` sends the load, one new connection per message and one
recipient (its default, as in the issue), and both servers fsync each
message before its 250.

  - relay: the server relays everything to one smart host, Postfix's
    `smtp-sink` dumping each message to a file; the rate is messages over
    the time from the first connection until the sink holds all of them.
  - accept: nothing leaves the server. exedge has no send connector for the
    domain, so every message is held in Unreachable; Postfix puts every
    message on its hold queue (`check_recipient_access` answering HOLD).
    The rate is messages over the time until smtp-source has its last 250;
    the messages on disk are counted afterwards.

For every run it reads the server's CPU (user + system of its whole
process tree from /proc: twistd and its commit worker; Postfix's master
and every daemon it started, with the reaped ones) over the timed interval,
divided by the messages (CPU per message) and by the wall time (cores
used). It also prints, in relay mode, the drain (from smtp-source's last
250 until the sink held every message: near zero when delivery kept up
with reception) and, for exedge, the mean commit time (final dot to
fsync'ed, from its /metrics). Rounds alternate which server goes first;
medians and ranges.

Needs the Debian package postfix (smtp-source, smtp-sink, postfix) and root
to start a Postfix instance; says so and exits 2 otherwise. Binds 127.0.0.1
only; every process is stopped by PID at the end, also on Ctrl-C or SIGTERM.

    .venv/bin/python bench/relay_rate.py                 # the whole table, ~15 min
    .venv/bin/python bench/relay_rate.py --quick         # 1 round, 300 messages, ~2 min
    .venv/bin/python bench/relay_rate.py --mode relay --only 1KiB/10 --rounds 5
    .venv/bin/python bench/relay_rate.py --against HEAD~1   # exedge before/after instead of Postfix
"""

from __future__ import annotations

import argparse
import contextlib
import tomllib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import against  # noqa: E402  (bench/against.py: another commit of exedge, for --against)
import harness  # noqa: E402
import postfix  # noqa: E402  (tests/postfix.py: a private Postfix instance)
import proc  # noqa: E402  (bench/proc.py: CPU and memory of a process tree, stopping by PID)

median = proc.median

HOST = "127.0.0.1"
MODES = ("relay", "accept")


def wait_port(port: int, timeout: float = 20.0, host: str = HOST) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


def count_files(directory: str) -> int:
    return sum(len(files) for _, _, files in os.walk(directory))


class Sink:
    """smtp-sink dumping each message to its own file (no fsync: it is the far end)."""

    def __init__(self, workdir: str, host: str = HOST):
        self.host = host
        self.port = harness.free_port(host)
        self.dir = os.path.join(workdir, "sink")
        os.makedirs(self.dir)
        shutil.chown(self.dir, "postfix", "postfix")   # smtp-sink drops root privileges to -u
        self.proc = subprocess.Popen(
            ["smtp-sink", "-u", "postfix", "-d", os.path.join(self.dir, "m"), f"{host}:{self.port}", "1024"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir)
        try:
            wait_port(self.port, host=host)
        except BaseException:
            self.stop()
            raise

    def count(self) -> int:
        return count_files(self.dir)

    def recipients(self) -> int:
        """RCPT commands the sink accepted (X-Rcpt-Args records of its dump files): after a run, not during."""
        n = 0
        for top, _, files in os.walk(self.dir):
            for name in files:
                with open(os.path.join(top, name), "rb") as f:
                    head = f.read(65536).split(b"\n\n", 1)[0]
                n += head.count(b"X-Rcpt-Args:")
        return n

    def stop(self) -> None:
        proc.stop_pid(self.proc)


class Exedge(against.Runner):
    server_lines: str = ""    # [server] keys for this side (--server, --base-server), TOML

    def __init__(self, workdir: str, sink_port: int | None, mode: str = "relay"):
        self.port = harness.free_port()
        # accept only: no send connector serves relay.test, so every message is held in Unreachable
        sends = () if mode == "accept" else (
            {"name": "To smart host", "address_spaces": ["relay.test"], "dns_routing_enabled": False,
             "smart_hosts": [f"{HOST}:{sink_port}"]},)
        receive = dict(harness.FROM_INTERNET, tarpit_interval=0, max_inbound_connection_per_source=1000,
                       connection_timeout="1h", connection_inactivity_timeout="10m")
        if against.knows(self.code, "max_inbound_data_sessions_per_source"):
            receive["max_inbound_data_sessions_per_source"] = 1000    # 50 senders from one address
        config = harness.server_config(
            server=tomllib.loads(self.server_lines) or None,
            accepted_domains=({"domain_name": "relay.test", "domain_type": "InternalRelay"},),
            receive_connectors=(receive,),
            send_connectors=sends,
        ).format(port=self.port)
        self.spool = os.path.join(workdir, "var", "spool", "queue")
        self.server = harness.Server(workdir, config, self.port, code=self.code)

    def stored(self) -> int:
        """Messages in the spool now (accept mode: every acknowledged one stays)."""
        return count_files(self.spool) if os.path.isdir(self.spool) else 0

    def commit_ms(self) -> float | None:
        """
        The mean time from a final dot to its message fsync'ed, in ms, over
        the server's life (exedge_spool_commit_seconds on the management
        socket's /metrics); None when it cannot be read.
        """
        path = os.path.join(self.server.workdir, "var", "run", "exedge.sock")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(path)
                s.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                chunks = []
                while chunk := s.recv(65536):
                    chunks.append(chunk)
        except OSError:
            return None
        total = count = None
        for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
            if line.startswith("exedge_spool_commit_seconds_sum"):
                total = float(line.split()[-1])
            elif line.startswith("exedge_spool_commit_seconds_count"):
                count = float(line.split()[-1])
        return 1e3 * total / count if total is not None and count else None


class Postfix:
    """A private Postfix instance (tests/postfix.py): its own queue, port and log."""

    name = "postfix"

    def __init__(self, workdir: str, sink_port: int | None, mode: str = "relay"):
        self.port = harness.free_port()
        main = {
            "myhostname": "bench.reference.test",
            "relay_domains": "relay.test",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_client_connection_count_limit": "1000",
            "smtpd_client_connection_rate_limit": "0",
            "default_process_limit": "100",
        }
        if mode == "accept":
            # every message to its hold queue: accepted, fsync'ed, never scheduled by qmgr
            main["smtpd_recipient_restrictions"] = "check_recipient_access inline:{ relay.test=HOLD }"
            main["relayhost"] = f"[{HOST}]:9"     # never used: nothing leaves hold
        else:
            main["relayhost"] = f"[{HOST}]:{sink_port}"
        self.instance = postfix.PrivatePostfix(self.port, main)

    def start(self) -> None:
        self.instance.start()

    @property
    def pid(self) -> int:
        return self.instance.pid

    def stored(self) -> int:
        hold = os.path.join(self.instance.queue, "hold")
        return count_files(hold) if os.path.isdir(hold) else 0

    def stop(self) -> None:
        self.instance.stop()


@contextlib.contextmanager
def running(kind, mode: str, prefix: str = "relay"):
    """
    C{kind} (Exedge, Postfix, a variant) started in a directory of its own,
    relaying to a new Sink in relay mode: yields (server, sink or None);
    both stopped by PID and the directory removed afterwards.
    """
    workdir = tempfile.mkdtemp(prefix=f"{prefix}-{kind.name.replace('@', '-')}-")
    os.chmod(workdir, 0o755)   # Postfix's daemons run as the postfix user
    sink = Sink(workdir) if mode == "relay" else None
    server = None
    try:
        server = kind(workdir, sink.port if sink else None, mode)
        server.start()
        yield server, sink
    finally:
        if server is not None:
            server.stop()
        if sink is not None:
            sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def run_one(kind, mode: str, size: int, conns: int, count: int, cap: float, warmup: int = 0) -> dict:
    with running(kind, mode) as (server, sink):
        if warmup:
            # first-use costs (imports, the first connection to the sink) out of the timed part
            subprocess.run(["smtp-source", "-s", "1", "-m", str(warmup), "-l", str(size), "-f", "bench@source.test",
                            "-t", "rcpt@relay.test", f"{HOST}:{server.port}"], capture_output=True, timeout=cap)
            deadline = time.monotonic() + cap
            while sink is not None and sink.count() < warmup and time.monotonic() < deadline:
                time.sleep(0.02)
        before = server.stored()
        sent_before = sink.count() if sink is not None else 0
        meter = proc.Meter(server.pid).start()
        t0 = time.monotonic()
        try:
            src = subprocess.run(["smtp-source", "-s", str(conns), "-m", str(count), "-l", str(size),
                                  "-f", "bench@source.test", "-t", "rcpt@relay.test", f"{HOST}:{server.port}"],
                                 capture_output=True, text=True, timeout=cap)
            rc = src.returncode
        except subprocess.TimeoutExpired:
            rc = None
        accepted = time.monotonic() - t0
        if sink is not None:
            deadline = time.monotonic() + cap
            while sink.count() - sent_before < count and time.monotonic() < deadline:
                time.sleep(0.02)
            got = sink.count() - sent_before
        meter.stop()
        elapsed = meter.wall
        if sink is None:
            got = server.stored() - before
        commit = server.commit_ms() if hasattr(server, "commit_ms") else None
        return {"server": kind.name, "mode": mode, "size": size, "conns": conns, "messages": count, "done": got,
                "accept_seconds": accepted, "seconds": elapsed, "rate": got / elapsed if elapsed else 0.0,
                # relay: how long the last deliveries took after smtp-source's last 250 (near 0: delivery kept up)
                "drain_seconds": max(0.0, elapsed - accepted) if sink is not None else None,
                "commit_ms": commit,
                "cpu_seconds": meter.cpu, "cpu_us_per_msg": 1e6 * meter.cpu / got if got else 0.0,
                "cores": meter.cores, "smtp_source_rc": rc, "complete": got >= count and rc == 0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=None, help="1 KiB messages per run (default 2000; "
                        "100 KiB runs send a quarter)")
    parser.add_argument("--quick", action="store_true", help="300 messages, 1 round")
    parser.add_argument("--rounds", type=int, default=None, help="default 3")
    parser.add_argument("--mode", action="append", choices=MODES, default=[],
                        help="relay (end to end) or accept (held, nothing sent); repeatable, default both")
    parser.add_argument("--only", action="append", default=[], metavar="SIZE/CONNS",
                        help="run only this case, e.g. 1KiB/10 or 100KiB/50 (repeatable)")
    parser.add_argument("--conns", action="append", type=int, default=[],
                        help="connection counts (repeatable; default 1, 10 and 50)")
    parser.add_argument("--max-seconds", type=float, default=2400,
                        help="cap on the whole run (default 2400); runs not started by then are skipped")
    parser.add_argument("--run-seconds", type=float, default=120, help="cap on one run's load and its drain")
    parser.add_argument("--warmup", type=int, default=0, metavar="N",
                        help="messages each server gets before the timed part of a run (default 0)")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "relay-latest.json"))
    parser.add_argument("--against", metavar="REV",
                        help="compare with exedge at this git commit (e.g. HEAD~1) instead of Postfix, "
                             "alternating in one run")
    parser.add_argument("--server", default="", metavar="TOML",
                        help="[server] keys for this exedge, e.g. 'receive_workers = 2'")
    parser.add_argument("--base-server", default="", metavar="TOML",
                        help="with --against: [server] keys for the other side (e.g. 'receive_workers = 0'); "
                             "--against HEAD --server 'receive_workers = 2' compares two settings of one tree")
    args = parser.parse_args(argv)
    Exedge.server_lines = args.server
    with proc.interruptible():
        if args.against:
            with against.checkout(args.against) as (tree, rev):
                Before = against.variant(Exedge, tree, f"exedge@{rev}")
                Before.server_lines = args.base_server
                return compare(args, Before, Exedge)
        return compare(args, Postfix, Exedge)


def _range(values: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}" if values else "-"


def compare(args, Base, Exedge) -> int:
    """Base (Postfix, or exedge at another commit) against this exedge, alternating, in one run."""
    missing = [b for b in ("smtp-source", "smtp-sink", "postfix") if not shutil.which(b)]
    if missing or os.geteuid() != 0:
        print(f"relay_rate: needs root and the Debian package postfix (missing: {', '.join(missing) or 'root'})")
        return 2
    n_small = args.messages or (300 if args.quick else 2000)
    rounds = args.rounds or (1 if args.quick else 3)
    cap = proc.TimeCap(args.max_seconds)
    rows, results = [], []
    for mode in (args.mode or MODES):
        for size, n in ((1024, n_small), (100 * 1024, max(n_small // 4, 1))):
            for conns in (args.conns or (1, 10, 50)):
                if args.only and f"{size // 1024}KiB/{conns}" not in args.only:
                    continue
                runs = {Exedge.name: [], Base.name: []}
                for r in range(rounds):
                    order = (Exedge, Base) if r % 2 == 0 else (Base, Exedge)
                    for kind in order:
                        if cap.over():
                            break
                        res = run_one(kind, mode, size, conns, n, cap=min(args.run_seconds, max(cap.left(), 5)),
                                      warmup=args.warmup)
                        results.append(res)
                        flag = "" if res["complete"] else "  INCOMPLETE"
                        more = "" if res["drain_seconds"] is None else f", drain {res['drain_seconds']:.2f} s"
                        more += "" if res["commit_ms"] is None else f", commit {res['commit_ms']:.2f} ms"
                        print(f"  {mode:6} {size // 1024:>4} KiB x{conns:<3} {kind.name:8} {res['done']:>5}/{n} "
                              f"in {res['seconds']:6.2f} s = {res['rate']:8.1f}/s, "
                              f"{res['cpu_us_per_msg']:7.0f} us CPU/msg, {res['cores']:.2f} cores{more}{flag}",
                              flush=True)
                        runs[kind.name].append(res)
                if not runs[Exedge.name] or not runs[Base.name]:
                    continue
                col = {k: {f: [r[f] for r in v] for f in ("rate", "cpu_us_per_msg", "cores")} for k, v in runs.items()}
                ex, base = col[Exedge.name], col[Base.name]
                rows.append((mode, size, conns, median(base["rate"]), median(ex["rate"]),
                             median(ex["rate"]) / median(base["rate"]) if median(base["rate"]) else 0.0,
                             median(base["cpu_us_per_msg"]), median(ex["cpu_us_per_msg"]),
                             median(base["cores"]), median(ex["cores"]),
                             f"{_range(base['rate'])}; {_range(ex['rate'])}"))
    print(f"\nexedge = {against.here()}; base = {Base.name}; smtp-source, a new connection per message; "
          f"medians of {rounds} round(s), rate ranges after")
    print(f"{'mode':>6} {'size':>7} {'conns':>5} {'base/s':>8} {'exedge/s':>8} {'ratio':>6} "
          f"{'base us/msg':>11} {'exe us/msg':>10} {'base cores':>10} {'exe cores':>9}  ranges (base; exedge)")
    for mode, size, conns, base, ex, ratio, bcpu, ecpu, bcores, ecores, ranges in rows:
        print(f"{mode:>6} {size // 1024:>4}KiB {conns:>5} {base:>8.1f} {ex:>8.1f} {ratio:>5.2f}x "
              f"{bcpu:>11.0f} {ecpu:>10.0f} {bcores:>10.2f} {ecores:>9.2f}  {ranges}")
    if cap.cut:
        print(f"relay_rate: --max-seconds {args.max_seconds:.0f} reached: the remaining runs were skipped")
    proc.write_json(args.json, {"exedge": against.here(), "base": Base.name, "rounds": rounds,
                                "cut_by_time": cap.cut, "runs": results})
    return 0 if all(r["complete"] for r in results) and not cap.cut else 1


if __name__ == "__main__":
    sys.exit(main())
