"""
End-to-end relay rate: smtp-source -> server -> smart host (smtp-sink).

For each message size (1 KiB, 100 KiB) and connection count (10, 50), the
same load goes through exedge and, in the same run, through a private
Postfix instance (the reference) configured the same way: accept from
loopback, fsync before 250 (both do), relay everything to one smart host.
The smart host is Postfix's smtp-sink dumping each message to a file; the
rate is messages over the time from the first connection of the load until
the sink holds all of them.

Needs the Debian package postfix (smtp-source, smtp-sink, postfix) and root
to start a Postfix instance; says so and exits 2 otherwise. Binds 127.0.0.1
only; every process is stopped by PID at the end.

    .venv/bin/python bench/relay_rate.py [--messages N] [--rounds R] [--quick] [--only 1KiB/10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
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


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]

HOST = "127.0.0.1"


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class Sink:
    """smtp-sink dumping each message to its own file (no fsync: it is the far end)."""

    def __init__(self, workdir: str):
        self.port = harness.free_port()
        self.dir = os.path.join(workdir, "sink")
        os.makedirs(self.dir)
        shutil.chown(self.dir, "postfix", "postfix")   # smtp-sink drops root privileges to -u
        self.proc = subprocess.Popen(
            ["smtp-sink", "-u", "postfix", "-d", os.path.join(self.dir, "m"), f"{HOST}:{self.port}", "1024"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir)
        wait_port(self.port)

    def count(self) -> int:
        return sum(len(files) for _, _, files in os.walk(self.dir))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)


class Exedge:
    name = "exedge"
    code: str | None = None   # another checkout of exedge to run (--against), None: this one

    def __init__(self, workdir: str, sink_port: int):
        self.port = harness.free_port()
        config = harness.server_config(
            accepted_domains=({"domain_name": "relay.test", "domain_type": "InternalRelay"},),
            receive_connectors=(dict(harness.FROM_INTERNET, tarpit_interval=0, max_inbound_connection_per_source=1000,
                                     connection_timeout="1h", connection_inactivity_timeout="10m"),),
            send_connectors=({"name": "To smart host", "address_spaces": ["relay.test"], "dns_routing_enabled": False,
                              "smart_hosts": [f"{HOST}:{sink_port}"]},),
        ).format(port=self.port)
        self.server = harness.Server(workdir, config, self.port, code=self.code)

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


class Postfix:
    """A private Postfix instance (tests/postfix.py): its own queue, port and log."""

    name = "postfix"

    def __init__(self, workdir: str, sink_port: int):
        self.port = harness.free_port()
        self.instance = postfix.PrivatePostfix(self.port, {
            "myhostname": "bench.reference.test",
            "relay_domains": "relay.test",
            "relayhost": f"[{HOST}]:{sink_port}",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_client_connection_count_limit": "1000",
            "smtpd_client_connection_rate_limit": "0",
            "default_process_limit": "100",
        })

    def start(self) -> None:
        self.instance.start()

    def stop(self) -> None:
        self.instance.stop()


def run_one(kind, size: int, conns: int, count: int, cap: float) -> dict:
    workdir = tempfile.mkdtemp(prefix=f"relay-{kind.name}-")
    os.chmod(workdir, 0o755)   # Postfix's daemons run as the postfix user
    sink = Sink(workdir)
    server = kind(workdir, sink.port)
    try:
        server.start()
        t0 = time.monotonic()
        src = subprocess.run(["smtp-source", "-s", str(conns), "-m", str(count), "-l", str(size),
                              "-f", "bench@source.test", "-t", "rcpt@relay.test", f"{HOST}:{server.port}"],
                             capture_output=True, text=True, timeout=cap)
        accepted = time.monotonic() - t0
        deadline = time.monotonic() + cap
        while sink.count() < count and time.monotonic() < deadline:
            time.sleep(0.02)
        relayed = time.monotonic() - t0
        got = sink.count()
        return {"server": kind.name, "size": size, "conns": conns, "messages": count, "at_sink": got,
                "accept_seconds": accepted, "relay_seconds": relayed,
                "relay_rate": got / relayed if relayed else 0.0, "smtp_source_rc": src.returncode,
                "complete": got >= count and src.returncode == 0}
    finally:
        server.stop()
        sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=None, help="1 KiB messages per run (default 2000)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--only", action="append", default=[], metavar="SIZE/CONNS",
                        help="run only this case, e.g. 1KiB/10 or 100KiB/50 (repeatable)")
    parser.add_argument("--conns", action="append", type=int, default=[],
                        help="connection counts (repeatable; default 10 and 50)")
    parser.add_argument("--against", metavar="REV",
                        help="compare with exedge at this git commit (e.g. HEAD~1) instead of Postfix, "
                             "alternating in one run")
    args = parser.parse_args(argv)
    if args.against:
        with against.checkout(args.against) as (tree, rev):
            class Before(Exedge):
                name = f"exedge@{rev}"
                code = tree
            return compare(args, Before, Exedge)
    return compare(args, Postfix, Exedge)


def compare(args, Base, Exedge) -> int:
    """Base (Postfix, or exedge at another commit) against this exedge, alternating, in one run."""
    missing = [b for b in ("smtp-source", "smtp-sink", "postfix") if not shutil.which(b)]
    if missing or os.geteuid() != 0:
        print(f"relay_rate: needs root and the Debian package postfix (missing: {', '.join(missing) or 'root'})")
        return 2
    n_small = args.messages or (300 if args.quick else 2000)
    rounds = args.rounds or (1 if args.quick else 3)
    rows, results = [], []
    for size, n in ((1024, n_small), (100 * 1024, max(n_small // 4, 1))):
        for conns in (args.conns or (10, 50)):
            if args.only and f"{size // 1024}KiB/{conns}" not in args.only:
                continue
            rates = {Exedge.name: [], Base.name: []}
            for r in range(rounds):
                order = (Exedge, Base) if r % 2 == 0 else (Base, Exedge)
                for kind in order:
                    res = run_one(kind, size, conns, n, cap=120)
                    results.append(res)
                    flag = "" if res["complete"] else "  INCOMPLETE"
                    print(f"  {size // 1024:>4} KiB x{conns:<3} {kind.name:8} {res['at_sink']:>5}/{n} at the sink "
                          f"in {res['relay_seconds']:6.2f} s = {res['relay_rate']:8.1f}/s{flag}", flush=True)
                    rates[kind.name].append(res["relay_rate"])
            ex, base = median(rates[Exedge.name]), median(rates[Base.name])
            spread = (f"{min(rates[Base.name]):.0f}-{max(rates[Base.name]):.0f}",
                      f"{min(rates[Exedge.name]):.0f}-{max(rates[Exedge.name]):.0f}")
            rows.append((size, conns, base, ex, ex / base if base else 0.0, spread))
    print(f"\nexedge = {against.here()}; base = {Base.name}; medians of {rounds} round(s), ranges after")
    print(f"{'size':>8} {'conns':>5} {'base/s':>10} {'exedge/s':>10} {'exedge/base':>12}  ranges (base; exedge)")
    for size, conns, base, ex, ratio, (rb, re_) in rows:
        print(f"{size // 1024:>5}KiB {conns:>5} {base:>10.1f} {ex:>10.1f} {ratio:>11.2f}x  {rb}; {re_}")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "relay-latest.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0 if all(r["complete"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
