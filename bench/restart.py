#!/usr/bin/env python
"""
Restart with a big queue: how long exedge takes to greet (and to accept a
new message) after a clean stop and after kill -9 with N messages queued,
and how much memory it holds once recovered and idle.

The spool is filled once per exedge tree by bench/spoolfill.py (the
project's own spool code, run with that tree on PYTHONPATH), N messages of
about 1 KiB to held.test: an accepted domain no send connector serves, so
every message is held in Unreachable and nothing is delivered while we
measure. Then, R rounds:

  - clean: SIGTERM to the running, idle server, wait for it to exit, start
    twistd and time until the port answers with 220 ("greet") and until a
    new message got its 250 ("accept");
  - kill:  the same after SIGKILL of the whole server (twistd and its
    commit worker, by their PIDs);
  - after each start, wait until the server is idle (its process tree used
    under 5% of a core over a second, and its RSS stopped growing): that is
    "recovered", however the recovery is scheduled, and the time it took is
    reported as "idle after"; then read the RSS of its tree.

The first start (straight after the fill) is reported too, and, for the
per-message figure, the idle RSS of the same server with an empty spool.
The messages added by the accept probes stay queued; the spool is checked
at the end (queued files = N + probes). Every process started here is
stopped by its PID, also on Ctrl-C or SIGTERM; temporary directories are
removed unless --keep.

    .venv/bin/python bench/restart.py                       # N = 100,000, 3 rounds
    .venv/bin/python bench/restart.py --messages 1000000    # the 1M case (4 GB of spool)
    .venv/bin/python bench/restart.py --against HEAD~1      # the same spool size for both, alternating
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import against  # noqa: E402
import harness  # noqa: E402
import proc  # noqa: E402

HOST = "127.0.0.1"
DOMAIN = "held.test"


def config(port: int) -> str:
    return harness.server_config(
        accepted_domains=({"domain_name": DOMAIN, "domain_type": "InternalRelay"},),
        receive_connectors=(dict(harness.FROM_INTERNET, tarpit_interval=0),),
        send_connectors=(),       # nothing serves held.test: Unreachable, held
    ).format(port=port)


class Exedge:
    """One exedge tree's server over one spool, started and stopped again and again."""

    name = "exedge"
    code: str | None = None

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.port = harness.free_port()
        self.server = harness.Server(workdir, config(self.port), self.port, code=self.code)
        self.spool = os.path.join(workdir, "var", "spool")
        self.probes = 0

    def fill(self, count: int) -> dict:
        env = dict(os.environ, PYTHONPATH=self.code or os.path.dirname(HERE))
        out = subprocess.run([sys.executable, os.path.join(HERE, "spoolfill.py"), self.spool, str(count),
                              "--domain", DOMAIN], env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    def start_timed(self, cap: float) -> dict:
        """Start twistd; seconds until it greets, until a new message is accepted, until idle; idle RSS."""
        log = open(self.server.log_path, "ab")
        t0 = time.monotonic()
        self.server.proc = subprocess.Popen([harness.TWISTD, "-n", "--pidfile=", "exedge", "--config",
                                             self.server.config_path], cwd=self.workdir, stdout=log,
                                            stderr=subprocess.STDOUT, env=self.server.env)
        log.close()
        greet = self._wait_greeting(t0, cap)
        accept = self._probe(t0, cap)
        idle, rss = self._wait_idle(t0, cap)
        return {"greet_s": greet, "accept_s": accept, "idle_after_s": idle, "rss_bytes": rss}

    def _wait_greeting(self, t0: float, cap: float) -> float:
        while time.monotonic() - t0 < cap:
            if self.server.proc.poll() is not None:
                raise RuntimeError(f"exedge exited with {self.server.proc.returncode}:\n{self.server.log[-3000:]}")
            try:
                with socket.create_connection((HOST, self.port), timeout=cap) as s:
                    s.settimeout(max(cap - (time.monotonic() - t0), 0.1))
                    banner = s.recv(512)
                    if banner.startswith(b"220"):
                        at = time.monotonic() - t0
                        s.sendall(b"QUIT\r\n")
                        return at
            except OSError:
                pass
            time.sleep(0.005)
        raise RuntimeError(f"exedge did not greet within {cap:.0f} s")

    def _probe(self, t0: float, cap: float) -> float:
        """A new message, the time of its 250 (from the start of twistd)."""
        left = max(cap - (time.monotonic() - t0), 1.0)
        with smtplib.SMTP(HOST, self.port, local_hostname="probe.bench.test", timeout=left) as client:
            client.sendmail("probe@sender.test", [f"probe@{DOMAIN}"],
                            b"Subject: probe\r\n\r\nnew mail while the queue is big\r\n")
        self.probes += 1
        return time.monotonic() - t0

    def _wait_idle(self, t0: float, cap: float) -> tuple[float, int]:
        pid = self.server.proc.pid
        last_cpu, last_rss = proc.cpu_seconds(pid), proc.rss_bytes(pid)
        while time.monotonic() - t0 < cap:
            time.sleep(1.0)
            cpu, rss = proc.cpu_seconds(pid), proc.rss_bytes(pid)
            if cpu - last_cpu < 0.05 and rss <= last_rss * 1.01:
                return time.monotonic() - t0 - 1.0, rss
            last_cpu, last_rss = cpu, rss
        return float("nan"), proc.rss_bytes(pid)

    def stop(self) -> None:
        self.server.stop()

    def kill9(self) -> None:
        """SIGKILL to every process of the server's tree (the commit worker too, as a power cut would)."""
        p = self.server.proc
        if p is None or p.poll() is not None:
            return
        for pid in reversed(proc.tree(p.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(timeout=15)

    def queued(self) -> int:
        d = os.path.join(self.spool, "queue")
        return sum(len(files) for _, _, files in os.walk(d)) if os.path.isdir(d) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000, help="queued messages (default 100,000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=1800, help="cap on the whole run")
    parser.add_argument("--start-seconds", type=float, default=300, help="cap on one start (greet, accept, idle)")
    parser.add_argument("--against", metavar="REV", help="also exedge at this commit, alternating")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "restart-latest.json"))
    args = parser.parse_args(argv)
    if not 0 <= args.messages <= 10_000_000:
        parser.error("--messages: 0..10,000,000")
    with proc.interruptible():
        if args.against:
            with against.checkout(args.against) as (tree, rev):
                Before = against.variant(Exedge, tree, f"exedge@{rev}")
                return run(args, [Exedge, Before])
        return run(args, [Exedge])


def run(args, kinds) -> int:
    cap = proc.TimeCap(args.max_seconds)
    servers, dirs, results = {}, [], {"messages": args.messages, "exedge": against.here(), "servers": {}}
    try:
        for kind in kinds:
            # the empty-spool baseline, then the fill
            workdir = tempfile.mkdtemp(prefix="restart-empty-")
            dirs.append(workdir)
            empty = kind(workdir)
            try:
                base = empty.start_timed(args.start_seconds)
            finally:
                empty.stop()
            workdir = tempfile.mkdtemp(prefix=f"restart-{kind.name.replace('@', '-')}-")
            dirs.append(workdir)
            server = servers[kind.name] = kind(workdir)
            filled = server.fill(args.messages)
            print(f"{kind.name}: empty spool: greets in {base['greet_s']:.2f} s, idle RSS "
                  f"{base['rss_bytes'] / 2**20:.0f} MB; filled {filled['messages']} messages in "
                  f"{filled['seconds']:.1f} s", flush=True)
            first = server.start_timed(args.start_seconds)
            print(f"{kind.name}: first start: greet {first['greet_s']:.2f} s, accept {first['accept_s']:.2f} s, "
                  f"idle after {first['idle_after_s']:.1f} s, RSS {first['rss_bytes'] / 2**20:.0f} MB", flush=True)
            results["servers"][kind.name] = {"empty": base, "fill": filled, "first": first, "clean": [], "kill": []}
        for r in range(args.rounds):
            order = kinds if r % 2 == 0 else kinds[::-1]
            for kind in order:
                server = servers[kind.name]
                for how in ("clean", "kill"):
                    if cap.over():
                        break
                    server.stop() if how == "clean" else server.kill9()
                    res = server.start_timed(args.start_seconds)
                    results["servers"][kind.name][how].append(res)
                    print(f"  round {r + 1} {kind.name:18} after {how:5}: greet {res['greet_s']:6.2f} s, "
                          f"accept {res['accept_s']:6.2f} s, idle after {res['idle_after_s']:6.1f} s, "
                          f"RSS {res['rss_bytes'] / 2**20:6.0f} MB", flush=True)
        ok = True
        for kind in kinds:
            server = servers[kind.name]
            got, want = server.queued(), args.messages + server.probes
            results["servers"][kind.name]["queued_at_end"] = got
            if got != want:
                ok = False
                print(f"{kind.name}: {got} messages queued at the end, expected {want}")
    finally:
        for server in servers.values():
            server.stop()
        if not args.keep:
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)
    report(args, kinds, results)
    if cap.cut:
        print(f"restart: --max-seconds {args.max_seconds:.0f} reached: rounds skipped")
    proc.write_json(args.json, results)
    return 0 if ok and not cap.cut else 1


def report(args, kinds, results) -> None:
    n = args.messages
    print(f"\nexedge = {results['exedge']}; {n} queued messages; medians of {args.rounds} round(s), ranges after")
    print(f"{'server':>18} {'after':>6} {'greet s':>8} {'accept s':>9} {'idle after s':>12} {'RSS MB':>7} "
          f"{'KiB/queued msg':>14}  ranges (greet; RSS MB)")
    for kind in kinds:
        data = results["servers"][kind.name]
        base = data["empty"]["rss_bytes"]
        for how in ("clean", "kill"):
            runs = data[how]
            if not runs:
                continue
            col = {k: [x[k] for x in runs] for k in runs[0]}
            rss = proc.median(col["rss_bytes"])
            per = (rss - base) / 1024 / n if n else 0.0
            print(f"{kind.name:>18} {how:>6} {proc.median(col['greet_s']):>8.2f} {proc.median(col['accept_s']):>9.2f} "
                  f"{proc.median(col['idle_after_s']):>12.1f} {rss / 2**20:>7.0f} {per:>14.2f}  "
                  f"{min(col['greet_s']):.2f}-{max(col['greet_s']):.2f}; "
                  f"{min(col['rss_bytes']) / 2**20:.0f}-{max(col['rss_bytes']) / 2**20:.0f}")
        print(f"{kind.name:>18} empty spool: idle RSS {base / 2**20:.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
