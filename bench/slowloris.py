#!/usr/bin/env python
"""
A DATA slowloris: N sessions each trickling a maximum-size message, and
what it costs exedge in memory and a normal client in latency.

Each attacking session comes from one of --sources loopback addresses
(127.1.x.y, --sessions / --sources per address), sends EHLO, MAIL, RCPT and
DATA; after the 354 it sends --burst octets of message at once (by default
just under the spool's 512 KiB spill threshold: the most a message in
flight keeps in memory, the attacker's best case) and then a few octets
every --interval seconds, for ever. A session whose DATA is refused (451
4.3.2: max_inbound_data_sessions or _per_source reached) keeps its
transaction and sends DATA again every 5 intervals, as a patient attacker
would; both kinds stay connected. While all of them are connected, a
normal client sends a small message every --every seconds (connect, EHLO,
MAIL, RCPT, DATA, final dot, 250: that time is its latency), by turns as
an anonymous client on the attacked connector (127.0.0.1) and through a
second, internal connector (127.0.0.2, externally secured); the RSS of the
server's process tree (twistd and its commit worker, from /proc) is read
every second. The run fails unless every internal message got its 250
within a second. The anonymous one shares the attacked connector's DATA
slots: when the attack holds all of max_inbound_data_sessions, its DATA
evicts an attacking session below min_inbound_data_rate once one has been
slow for the 30 s window (before that, 451 4.3.2: try again later); the
evictions are counted from the server's log. An attack from fewer
addresses (--sources 10) is held by the per-source limit and leaves room.

The server runs with its connector's session limits raised (max_inbound_
connection and _per_source unlimited, timeouts 1 h) and the DATA limits
at their defaults (200 per connector, 10 per source), or --data-limits
unlimited to measure the per-session bound itself. The soft RLIMIT_NOFILE
is raised to the hard limit (client and, inherited, server). Every process
started is stopped by PID, also on Ctrl-C or SIGTERM; --max-seconds caps
the whole run.

    .venv/bin/python bench/slowloris.py                         # 2,000 sessions, 60 s held
    .venv/bin/python bench/slowloris.py --sources 10               # the per-source limit binds
    .venv/bin/python bench/slowloris.py --data-limits unlimited    # the per-session bound alone
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import smtplib
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import harness  # noqa: E402
import proc  # noqa: E402
from idle_sessions import raise_nofile  # noqa: E402

SPILL_THRESHOLD = 512 * 1024       # exedge.queue.incoming.SPILL_THRESHOLD, not imported: --against-free
HEADER = b"From: a@attacker.test\r\nTo: bob@example.com\r\nSubject: slow\r\n\r\n"
LINE = b"x" * 78 + b"\r\n"


def source_address(i: int, sources: int) -> str:
    k = i % sources
    return f"127.1.{k // 250}.{k % 250 + 1}"


class Tally:
    def __init__(self):
        self.connected = self.in_data = self.refused = self.failed = self.evicted = 0
        self.errors: dict[str, int] = {}

    def error(self, what: str) -> None:
        self.failed += 1
        self.errors[what] = self.errors.get(what, 0) + 1


async def reply(reader) -> bytes:
    """One SMTP reply (its last line)."""
    for _ in range(100):
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line
    raise ConnectionError("endless reply")


async def attacker(i: int, args, port: int, tally: Tally, stop: asyncio.Event, opened: list) -> None:
    writer = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source_address(i, args.sources), 0)), 30)
        opened.append(writer)
        if not (await asyncio.wait_for(reply(reader), 30)).startswith(b"220"):
            return tally.error("no greeting")
        tally.connected += 1
        for command in (b"EHLO slow.test", b"MAIL FROM:<a@attacker.test>", b"RCPT TO:<bob@example.com>"):
            writer.write(command + b"\r\n")
            if not (await asyncio.wait_for(reply(reader), 30)).startswith(b"250"):
                return tally.error(command.split(b" ")[0].decode())
        refused = False
        while not stop.is_set():
            writer.write(b"DATA\r\n")
            answer = await asyncio.wait_for(reply(reader), 30)
            if answer.startswith(b"354"):
                break
            if not answer.startswith(b"451"):
                return tally.error("DATA " + answer[:3].decode("ascii", "replace"))
            if not refused:
                refused = True
                tally.refused += 1
            await wait(stop, 5 * args.interval)
        else:
            return
        if refused:
            tally.refused -= 1
        tally.in_data += 1
        writer.write(HEADER + LINE * (max(args.burst - len(HEADER), 0) // len(LINE)))
        await writer.drain()
        at = 0
        told = asyncio.ensure_future(reader.readline())    # nothing is owed after the 354 but a 421
        try:
            while not stop.is_set():
                await wait(stop, args.interval)
                if told.done():
                    # evicted (421 4.4.2 Data rate too low) or closed: a real attacker would reconnect;
                    # this one stops, as the sessions already waiting keep the pressure on
                    tally.evicted += 1
                    return
                # a few octets at a time, cut anywhere in a line
                writer.write(LINE[at:at + args.trickle])
                at = 0 if at + args.trickle >= len(LINE) else at + args.trickle
        finally:
            told.cancel()
    except (OSError, ConnectionError, asyncio.TimeoutError) as e:
        if not stop.is_set():
            tally.error(type(e).__name__)


async def wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


# the normal client's two ways in: anonymous on the attacked connector, and the internal one
NORMAL = {"anonymous": "127.0.0.1", "internal": "127.0.0.2"}


def normal_message(port: int, source: str) -> float:
    """One message from a well-behaved client: seconds from connect to the 250 after the dot."""
    t0 = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as c:
        c.sendmail("alice@sender.test", ["bob@example.com"],
                   b"From: alice@sender.test\r\nTo: bob@example.com\r\nSubject: normal\r\n\r\nhello\r\n")
        elapsed = time.monotonic() - t0
        c.quit()
    return elapsed


def normal_client(port: int, every: float, stop: threading.Event, latencies: dict, failures: dict) -> None:
    """One message every C{every} seconds, by turns from each of L{NORMAL}'s addresses."""
    turn = 0
    while not stop.is_set():
        kind = list(NORMAL)[turn % len(NORMAL)]
        turn += 1
        try:
            latencies[kind].append(normal_message(port, NORMAL[kind]))
        except (OSError, smtplib.SMTPException) as e:
            failures[kind].append(str(e)[:80])
        stop.wait(every)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0


async def attack(args, server: harness.Server, cap: proc.TimeCap) -> dict:
    pid = server.proc.pid
    await asyncio.sleep(1.0)
    rss_base = proc.rss_bytes(pid)
    tally = Tally()
    stop = asyncio.Event()
    opened: list = []
    loop = asyncio.get_running_loop()
    # the normal client before the attack: its unloaded latency
    before = [await loop.run_in_executor(None, normal_message, server.port, NORMAL["anonymous"]) for _ in range(5)]
    t0 = time.monotonic()
    tasks = []
    for start in range(0, args.sessions, 100):
        tasks += [asyncio.ensure_future(attacker(i, args, server.port, tally, stop, opened))
                  for i in range(start, min(start + 100, args.sessions))]
        await asyncio.sleep(0.2)
    # every session connected and past its DATA (354 or 451), bounded
    while tally.in_data + tally.refused + tally.failed < args.sessions and not cap.over() \
            and time.monotonic() - t0 < 120:
        await asyncio.sleep(0.5)
    ramp = time.monotonic() - t0
    latencies: dict = {kind: [] for kind in NORMAL}
    failures: dict = {kind: [] for kind in NORMAL}
    done = threading.Event()
    client = threading.Thread(target=normal_client, args=(server.port, args.every, done, latencies, failures))
    client.start()
    rss: list[int] = []
    held_until = time.monotonic() + args.hold
    try:
        while time.monotonic() < held_until and not cap.over():
            rss.append(proc.rss_bytes(pid))
            await asyncio.sleep(1.0)
    finally:
        done.set()
        await loop.run_in_executor(None, client.join, 60)
        stop.set()
        await asyncio.wait(tasks, timeout=30)
        for w in opened:
            w.transport.abort()
    return {
        "sessions": args.sessions, "sources": args.sources, "burst": args.burst, "data_limits": args.data_limits,
        "connected": tally.connected, "in_data": tally.in_data, "refused_data": tally.refused,
        "failed": tally.failed, "errors": tally.errors, "ramp_seconds": ramp,
        "rss_base": rss_base, "rss_max": max(rss, default=0), "rss_median": proc.median(rss),
        "normal_before": before, "normal": latencies, "normal_failures": failures,
        "evicted": tally.evicted,
    }


def start_server(workdir: str, args) -> harness.Server:
    port = harness.free_port()
    internal = dict(harness.FROM_INTERNAL_ORG, usage="Custom", remote_ip_ranges=(NORMAL["internal"],),
                    tarpit_interval=0)
    connector = dict(harness.FROM_INTERNET, remote_ip_ranges=("127.0.0.0/8",), tarpit_interval=0,
                     max_inbound_connection="unlimited", max_inbound_connection_per_source="unlimited",
                     connection_timeout="1h", connection_inactivity_timeout="30m")
    if args.data_limits == "unlimited":
        connector.update(max_inbound_data_sessions="unlimited", max_inbound_data_sessions_per_source="unlimited")
    config = harness.server_config(server={"dns_servers": []}, accepted_domains=("example.com",),
                                   receive_connectors=(connector, internal),
                                   send_connectors=(dict(harness.LOCAL_DROP, usage="Custom"),)).format(port=port)
    return harness.Server(workdir, config, port).start(timeout=60)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--sources", type=int, default=200, help="attacking addresses (127.1.x.y)")
    parser.add_argument("--burst", type=int, default=SPILL_THRESHOLD - 8 * 1024,
                        help="octets sent at once after the 354 (default: just under the spill threshold)")
    parser.add_argument("--trickle", type=int, default=4, help="octets per interval after the burst")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--hold", type=float, default=60.0, help="seconds the attack is held while measuring")
    parser.add_argument("--every", type=float, default=0.5, help="seconds between the normal client's messages")
    parser.add_argument("--data-limits", choices=("default", "unlimited"), default="default")
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--json", default=os.path.join(HERE, "results", "slowloris-latest.json"))
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= 20_000 or not 1 <= args.sources <= 25_000:
        parser.error("--sessions: 1..20,000; --sources: 1..25,000")
    if not 0 <= args.burst <= 36 * 1024**2 or not 1 <= args.trickle <= len(LINE):
        parser.error("--burst: 0..36 MB; --trickle: 1..80")
    limit = raise_nofile()
    print(f"RLIMIT_NOFILE {limit} (client and server)")
    if limit < args.sessions + 100:
        print(f"slowloris: RLIMIT_NOFILE {limit}: fewer than {args.sessions} sessions can be open")
    cap = proc.TimeCap(args.max_seconds)
    workdir = tempfile.mkdtemp(prefix="slowloris-")
    server = None
    with proc.interruptible():
        try:
            server = start_server(workdir, args)
            res = asyncio.run(asyncio.wait_for(attack(args, server, cap), max(cap.left(), 10) + 60))
        finally:
            if server is not None:
                server.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    mb = 2**20
    print(f"{res['sessions']} sessions from {res['sources']} addresses, burst {res['burst'] // 1024} KiB, "
          f"DATA limits {res['data_limits']}: {res['connected']} connected, {res['in_data']} in DATA, "
          f"{res['refused_data']} refused 451 4.3.2, {res['failed']} failed {res['errors'] or ''} "
          f"(ramp {res['ramp_seconds']:.1f} s); {res['evicted']} evicted below min_inbound_data_rate")
    print(f"server RSS (tree): {res['rss_base'] / mb:.0f} MB before; during the attack median "
          f"{res['rss_median'] / mb:.0f} MB, max {res['rss_max'] / mb:.0f} MB")
    print(f"normal client, connect to the 250 after the dot (unloaded: median "
          f"{proc.median(res['normal_before']) * 1000:.0f} ms):")
    for kind, lat in res["normal"].items():
        failed = res["normal_failures"][kind]
        shown = f"; {len(failed)} failed, e.g. {failed[0]}" if failed else ""
        if lat:
            print(f"  {kind:9} ({NORMAL[kind]}): {len(lat)} messages, median {proc.median(lat) * 1000:.0f} ms, "
                  f"p95 {percentile(lat, 0.95) * 1000:.0f} ms, range {min(lat) * 1000:.0f}-{max(lat) * 1000:.0f} ms{shown}")
        else:
            print(f"  {kind:9} ({NORMAL[kind]}): none sent{shown}")
    if cap.cut:
        print(f"slowloris: --max-seconds {args.max_seconds:.0f} reached")
    proc.write_json(args.json, res)
    # what must hold: the internal client is served, each message within a second
    internal = res["normal"]["internal"]
    ok = internal and not res["normal_failures"]["internal"] and max(internal) < 1.0 and not cap.cut
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
