#!/usr/bin/env python
"""
Idle sessions and connection bursts: what N open SMTP sessions cost exedge
in memory, and whether N connections arriving at once are all greeted.

  - idle (default): open N sessions (100 connecting at a time), each reads
    its 220 and then says nothing; once all are open and the server is idle
    again, read the RSS of its process tree (twistd and its commit worker,
    from /proc) and subtract its RSS with no session: RSS per session. Then
    check the server still answers a new session while the N are open.
  - burst: N connect(2) calls issued at once, each waiting for its 220 (up
    to --greet-seconds): how many were greeted, how many refused or reset,
    and the time until the last greeting.

The sessions all come from 127.0.0.1 (exedge's per-source and per-connector
limits are set to unlimited for the run; the issue's targets are about
memory, not limits). The soft RLIMIT_NOFILE is raised to the hard limit
before anything starts, for this client and for the server it starts (which
inherits it); the run says how far. Every process started is stopped by
PID, also on Ctrl-C or SIGTERM.

    .venv/bin/python bench/idle_sessions.py                      # 5,000 idle sessions, 3 rounds
    .venv/bin/python bench/idle_sessions.py --mode burst --sessions 2000
    .venv/bin/python bench/idle_sessions.py --against HEAD~1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import smtplib
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import against  # noqa: E402
import harness  # noqa: E402
import proc  # noqa: E402

HOST = "127.0.0.1"


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Exedge(against.Runner):
    start_timeout = 60.0

    def __init__(self, workdir: str, backlog: int | None):
        self.port = harness.free_port()
        connector = dict(harness.FROM_INTERNET, tarpit_interval=0, max_inbound_connection="unlimited",
                         max_inbound_connection_per_source="unlimited", connection_timeout="1h",
                         connection_inactivity_timeout="30m")
        if backlog:
            connector["listen_backlog"] = backlog
        config = harness.server_config(receive_connectors=(connector,)).format(port=self.port)
        self.server = harness.Server(workdir, config, self.port, code=self.code)



async def greeted(port: int, timeout: float, holder: list | None) -> str:
    """Connect, read the 220; "ok", or what went wrong. With C{holder}, keep the connection open in it."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    except asyncio.TimeoutError:
        return "connect timeout"
    except OSError as e:
        return f"connect: {e.strerror or e}"
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except asyncio.TimeoutError:
        line = b"(timeout)"
    except OSError as e:
        line = f"({e.strerror or e})".encode()
    if holder is not None and line.startswith(b"220"):
        holder.append(writer)
    else:
        writer.close()
    return "ok" if line.startswith(b"220") else "no greeting: " + line[:60].decode("ascii", "replace").strip()


def tally(outcomes: list[str]) -> dict:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o] = counts.get(o, 0) + 1
    return counts


async def idle_round(server: Exedge, n: int, timeout: float) -> dict:
    pid = server.pid
    await asyncio.sleep(1.0)
    rss0 = proc.rss_bytes(pid)
    holder: list = []
    outcomes: list[str] = []
    t0 = time.monotonic()
    for start in range(0, n, 100):
        outcomes += await asyncio.gather(*(greeted(server.port, timeout, holder)
                                           for _ in range(start, min(start + 100, n))))
    opened = time.monotonic() - t0
    # settle: the server idle again (under 5% of a core over a second), bounded
    last = proc.cpu_seconds(pid)
    for _ in range(30):
        await asyncio.sleep(1.0)
        cpu = proc.cpu_seconds(pid)
        if cpu - last < 0.05:
            break
        last = cpu
    rss1 = proc.rss_bytes(pid)
    # one more session must still be served while the N are open
    loop = asyncio.get_running_loop()
    try:
        code = await loop.run_in_executor(None, lambda: smtplib.SMTP(HOST, server.port, timeout=timeout).noop()[0])
    except (OSError, smtplib.SMTPException) as e:
        code = str(e)
    for w in holder:
        w.close()
    ok = outcomes.count("ok")
    return {"sessions": n, "greeted": ok, "failures": tally([o for o in outcomes if o != "ok"]),
            "open_seconds": opened, "rss_before": rss0, "rss_open": rss1,
            "rss_per_session": (rss1 - rss0) / ok if ok else 0.0, "another_session_noop": code}


async def burst_round(server: Exedge, n: int, timeout: float) -> dict:
    holder: list = []
    t0 = time.monotonic()
    done_at: list[float] = []

    async def one():
        result = await greeted(server.port, timeout, holder)
        done_at.append(time.monotonic() - t0)
        return result

    outcomes = await asyncio.gather(*(one() for _ in range(n)))
    for w in holder:
        w.close()
    ok = outcomes.count("ok")
    return {"sessions": n, "greeted": ok, "failures": tally([o for o in outcomes if o != "ok"]),
            "last_greeting_seconds": max(done_at) if done_at else 0.0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("idle", "burst"), action="append", default=[],
                        help="idle (default) or burst; repeatable")
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--greet-seconds", type=float, default=30.0, help="how long one session may wait for its 220")
    parser.add_argument("--backlog", type=int, default=None, help="the connector's listen_backlog (default: its default)")
    parser.add_argument("--max-seconds", type=float, default=900)
    parser.add_argument("--against", metavar="REV", help="also exedge at this commit, alternating")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "idle-latest.json"))
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= 100_000:
        parser.error("--sessions: 1..100,000")
    limit = raise_nofile()
    if limit < args.sessions + 100:
        print(f"idle_sessions: RLIMIT_NOFILE is {limit}: fewer than {args.sessions} sessions can be open")
    with proc.interruptible():
        if args.against:
            with against.checkout(args.against) as (tree, rev):
                Before = against.variant(Exedge, tree, f"exedge@{rev}")
                return run(args, [Exedge, Before], limit)
        return run(args, [Exedge], limit)


def run(args, kinds, limit: int) -> int:
    cap = proc.TimeCap(args.max_seconds)
    modes = args.mode or ["idle"]
    runs: list[dict] = []
    try:
        somaxconn = open("/proc/sys/net/core/somaxconn").read().strip()
    except OSError:
        somaxconn = "?"
    print(f"RLIMIT_NOFILE {limit} (client and server); net.core.somaxconn {somaxconn}")
    for mode in modes:
        for r in range(args.rounds):
            for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                if cap.over():
                    break
                workdir = tempfile.mkdtemp(prefix="idle-")
                server = kind(workdir, args.backlog)
                try:
                    server.start()
                    body = idle_round if mode == "idle" else burst_round
                    res = asyncio.run(asyncio.wait_for(body(server, args.sessions, args.greet_seconds),
                                                       max(cap.left(), 10)))
                finally:
                    server.stop()
                    shutil.rmtree(workdir, ignore_errors=True)
                res.update(server=kind.name, mode=mode, round=r + 1)
                runs.append(res)
                if mode == "idle":
                    print(f"  idle  {kind.name:18} {res['greeted']}/{res['sessions']} greeted in "
                          f"{res['open_seconds']:.1f} s; RSS {res['rss_before'] / 2**20:.0f} -> "
                          f"{res['rss_open'] / 2**20:.0f} MB = {res['rss_per_session'] / 1024:.1f} KiB/session; "
                          f"another session's NOOP: {res['another_session_noop']} {res['failures'] or ''}", flush=True)
                else:
                    print(f"  burst {kind.name:18} {res['greeted']}/{res['sessions']} greeted, last after "
                          f"{res['last_greeting_seconds']:.2f} s {res['failures'] or ''}", flush=True)
    print(f"\nexedge = {against.here()}; {args.sessions} sessions; medians of {args.rounds} round(s), ranges after")
    for mode in modes:
        for kind in kinds:
            mine = [x for x in runs if x["server"] == kind.name and x["mode"] == mode]
            if not mine:
                continue
            greeted = f"{min(x['greeted'] for x in mine)}-{max(x['greeted'] for x in mine)} of {args.sessions} greeted"
            if mode == "idle":
                per = [x["rss_per_session"] / 1024 for x in mine]
                total = [x["rss_open"] / 2**20 for x in mine]
                print(f"  idle  {kind.name:18} {proc.median(per):.1f} KiB/session ({min(per):.1f}-{max(per):.1f}), "
                      f"RSS with all open {proc.median(total):.0f} MB ({min(total):.0f}-{max(total):.0f}); {greeted}")
            else:
                last = [x["last_greeting_seconds"] for x in mine]
                print(f"  burst {kind.name:18} {greeted}; last greeting after {proc.median(last):.2f} s "
                      f"({min(last):.2f}-{max(last):.2f})")
    if cap.cut:
        print(f"idle_sessions: --max-seconds {args.max_seconds:.0f} reached: rounds skipped")
    proc.write_json(args.json, {"exedge": against.here(), "rlimit_nofile": limit, "somaxconn": somaxconn, "runs": runs})
    all_greeted = all(x["greeted"] == x["sessions"] for x in runs)
    return 0 if all_greeted and not cap.cut else 1


if __name__ == "__main__":
    sys.exit(main())
