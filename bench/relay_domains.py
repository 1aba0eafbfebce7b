#!/usr/bin/env python
"""
Relay cost as the work spreads: many destination domains, many recipients.

Two comparisons, each within one run, rounds alternating:

  1. domains: exedge relays N one-recipient messages through MX routing,
     all to one domain ("1 domain") or spread over 1,000 distinct domains
     ("1000 domains", message i to d<i mod 1000>.bench.test). Every
     domain's MX record points at the same sink, so the far end is the
     same; only exedge's work differs (a lookup, a queue and a connection
     per domain). Target (issue 14): 1000 domains at >= 0.8x 1 domain.
  2. recipients: M messages of 100 recipients across 10 domains (10
     each), relayed by Postfix to smtp-sink as its relayhost, and by exedge
     two ways: through MX routing (a queue and a transaction per domain,
     ten per message) and through a smart host for the ten domains (one
     queue, Postfix's shape). Target: exedge at >= 0.8x Postfix.

The DNS server is the project's own (exedge.testing's DNSZoneServer, a real
twisted.names server, run as `python -m exedge.testing --dns`), one zone
bench.test with 1,000 MX records pointing at mx.bench.test = 127.0.0.9,
where Postfix's smtp-sink listens (so exedge's loop check lets it through:
the address is a smart host of a disabled connector, as in the tests).

The load is this script's asyncio client (smtp-source sends one recipient
address per message): C connections (default 10) sharing the messages,
each session EHLO once then MAIL, RCPT..., DATA, 1 KiB of data, waiting
for every reply, no PIPELINING. The rate is messages over the time from
the first connection until the server's queue is empty again (exedge:
var/spool/queue; Postfix: its incoming, active, deferred and maildrop
queues). Afterwards the recipients the sink got are counted: a run is
complete only when every recipient arrived. Server CPU per message is read
from /proc (bench/proc.py). Needs root and the Debian package postfix for
smtp-sink and the Postfix case.

    .venv/bin/python bench/relay_domains.py                # both, 3 rounds
    .venv/bin/python bench/relay_domains.py --case domains --messages 5000 --rounds 5
    .venv/bin/python bench/relay_domains.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import against  # noqa: E402
import harness  # noqa: E402
import postfix  # noqa: E402
import proc  # noqa: E402
from relay_rate import Sink, count_files, wait_port  # noqa: E402

HOST = "127.0.0.1"
SINK_HOST = "127.0.0.9"
ZONE = "bench.test"
DOMAINS = 1000
REPLY_TIMEOUT = 60.0


def domain(i: int) -> str:
    return f"d{i:04d}.{ZONE}"


class DNS:
    """exedge.testing's DNSZoneServer in a process of its own: d0000..d0999 MX -> mx.bench.test -> SINK_HOST."""

    def __init__(self, workdir: str):
        names = {domain(i): [["MX", 10, f"mx.{ZONE}"]] for i in range(DOMAINS)}
        names[f"mx.{ZONE}"] = [["A", SINK_HOST]]
        path = os.path.join(workdir, "zones.json")
        with open(path, "w") as f:
            json.dump({ZONE: names}, f)
        self.port = harness.free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "exedge.testing", "--dns", path, "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(self.port)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        proc.stop_pid(self.proc)


class Exedge(against.Runner):
    """exedge relaying by MX (default) or to the sink as a smart host for the ten domains."""

    name = "exedge-mx"
    smart_host = False
    start_timeout = 60.0

    def __init__(self, workdir: str, sink: Sink, dns: DNS):
        self.port = harness.free_port()
        if self.smart_host:
            sends = ({"name": "To sink", "address_spaces": [domain(i) for i in range(10)], "dns_routing_enabled": False,
                      "smart_hosts": [f"{SINK_HOST}:{sink.port}"]},)
        else:
            sends = ({"name": "To Internet", "address_spaces": ["*"], "port": sink.port},
                     {"name": "Sink allowance", "address_spaces": ["unused.invalid"], "smart_hosts": [SINK_HOST],
                      "dns_routing_enabled": False, "enabled": False})
        config = harness.server_config(
            server={"dns_servers": [f"{HOST}:{dns.port}"]},
            receive_connectors=(dict(harness.FROM_INTERNAL_ORG, tarpit_interval=0,
                                     max_inbound_connection_per_source="unlimited", max_recipients_per_message=1000,
                                     connection_timeout="1h", connection_inactivity_timeout="10m"),),
            send_connectors=sends,
        ).format(port=self.port)
        self.queue = os.path.join(workdir, "var", "spool", "queue")
        self.server = harness.Server(workdir, config, self.port, code=self.code)

    def queued(self) -> int:
        return count_files(self.queue) if os.path.isdir(self.queue) else 0


class ExedgeSmartHost(Exedge):
    name = "exedge-smarthost"
    smart_host = True


class Postfix:
    name = "postfix"

    def __init__(self, workdir: str, sink: Sink, dns: DNS):
        self.port = harness.free_port()
        self.instance = postfix.PrivatePostfix(self.port, {
            "myhostname": "bench.reference.test",
            "relay_domains": ", ".join(domain(i) for i in range(10)),
            "relayhost": f"[{SINK_HOST}]:{sink.port}",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_client_connection_count_limit": "1000",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_recipient_limit": "1000",
            "default_process_limit": "100",
        })

    def start(self) -> None:
        self.instance.start()

    @property
    def pid(self) -> int:
        return self.instance.pid

    def queued(self) -> int:
        return sum(count_files(os.path.join(self.instance.queue, q)) for q in
                   ("maildrop", "incoming", "active", "deferred") if os.path.isdir(os.path.join(self.instance.queue, q)))

    def stop(self) -> None:
        self.instance.stop()


# -- the load -------------------------------------------------------------------

def message(i: int, size: int = 1024) -> bytes:
    head = (f"From: <bench@sender.test>\r\nTo: <undisclosed-recipients:;>\r\nSubject: relay #{i}\r\n"
            f"Message-ID: <r{i}@sender.test>\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n\r\n").encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n"
    return head + line * max((size - len(head)) // len(line), 1) + b".\r\n"


async def _reply(reader) -> int:
    for _ in range(100):
        line = await asyncio.wait_for(reader.readuntil(b"\r\n"), REPLY_TIMEOUT)
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3]) if line[:3].isdigit() else 0
    return 0


async def _send(port: int, jobs: list, failures: list) -> None:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), REPLY_TIMEOUT)
    try:
        if await _reply(reader) != 220:
            raise OSError("no greeting")
        writer.write(b"EHLO client.bench.test\r\n")
        await _reply(reader)
        while jobs:
            i, rcpts = jobs.pop()
            writer.write(b"MAIL FROM:<bench@sender.test>\r\n")
            codes = [await _reply(reader)]
            for r in rcpts:
                writer.write(b"RCPT TO:<%s>\r\n" % r.encode())
                codes.append(await _reply(reader))
            writer.write(b"DATA\r\n")
            codes.append(await _reply(reader))
            if codes[-1] != 354:
                failures.append((i, codes))
                writer.write(b"RSET\r\n")
                await _reply(reader)
                continue
            writer.write(message(i))
            codes.append(await _reply(reader))
            if codes[0] != 250 or codes[-1] != 250 or any(c != 250 for c in codes[1:-2]):
                failures.append((i, codes))
        writer.write(b"QUIT\r\n")
        await _reply(reader)
    finally:
        writer.close()


async def load(port: int, jobs: list, conns: int) -> list:
    failures: list = []
    results = await asyncio.gather(*(_send(port, jobs, failures) for _ in range(conns)), return_exceptions=True)
    failures += [("session", repr(r)) for r in results if isinstance(r, BaseException)]
    return failures


def run_one(kind, label: str, jobs: list, conns: int, cap: float) -> dict:
    workdir = tempfile.mkdtemp(prefix="relay-domains-")
    os.chmod(workdir, 0o755)
    want = sum(len(r) for _, r in jobs)
    count = len(jobs)
    sink = dns = server = None
    try:
        sink = Sink(workdir, host=SINK_HOST)
        dns = DNS(workdir)
        server = kind(workdir, sink, dns)
        server.start()
        meter = proc.Meter(server.pid).start()
        try:
            failures = asyncio.run(asyncio.wait_for(load(server.port, list(reversed(jobs)), conns), cap))
        except asyncio.TimeoutError:
            failures = [("load", "cut by the time cap")]
        loaded = time.monotonic() - meter._t0
        deadline = time.monotonic() + cap
        while server.queued() and time.monotonic() < deadline:
            time.sleep(0.02)
        meter.stop()
        # the removal of a delivered message's file follows the delivery closely; count the sink after
        time.sleep(0.2)
        got = sink.recipients()
        return {"server": kind.name, "case": label, "messages": count, "recipients": want, "at_sink": got,
                "load_seconds": loaded, "seconds": meter.wall, "rate": count / meter.wall,
                "cpu_us_per_msg": 1e6 * meter.cpu / count, "cores": meter.cores,
                "failures": failures[:5], "complete": got >= want and not failures and not server.queued()}
    finally:
        for p in (server, dns, sink):
            if p is not None:
                p.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", choices=("domains", "recipients"), default=[])
    parser.add_argument("--messages", type=int, default=None, help="one-recipient messages per run (default 3000)")
    parser.add_argument("--wide-messages", type=int, default=None, help="100-recipient messages per run (default 300)")
    parser.add_argument("--conns", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=None, help="default 3")
    parser.add_argument("--quick", action="store_true", help="500 and 50 messages, 1 round")
    parser.add_argument("--max-seconds", type=float, default=1800)
    parser.add_argument("--run-seconds", type=float, default=180)
    parser.add_argument("--against", metavar="REV", help="exedge at this commit instead of Postfix / the other case")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "relay-domains-latest.json"))
    args = parser.parse_args(argv)
    missing = [b for b in ("smtp-sink", "postfix") if not shutil.which(b)]
    if missing or os.geteuid() != 0:
        print(f"relay_domains: needs root and the Debian package postfix (missing: {', '.join(missing) or 'root'})")
        return 2
    with proc.interruptible():
        if args.against:
            with against.checkout(args.against) as (tree, rev):
                Before = against.variant(Exedge, tree, f"exedge-mx@{rev}")
                return run(args, Before)
        return run(args, None)


def run(args, before) -> int:
    n = args.messages or (500 if args.quick else 3000)
    m = args.wide_messages or (50 if args.quick else 300)
    rounds = args.rounds or (1 if args.quick else 3)
    cap = proc.TimeCap(args.max_seconds)
    one = [(i, [f"u{i}@{domain(0)}"]) for i in range(n)]
    spread = [(i, [f"u{i}@{domain(i % DOMAINS)}"]) for i in range(n)]
    wide = [(i, [f"r{j}.{i}@{domain(j % 10)}" for j in range(100)]) for i in range(m)]
    plans = []
    if "domains" in (args.case or ["domains"]) or not args.case:
        # (label, kind, jobs): with --against, each case on both trees
        cases = [("1 domain", Exedge, one), ("1000 domains", Exedge, spread)]
        if before:
            cases += [("1 domain", before, one), ("1000 domains", before, spread)]
        plans.append(("domains", cases))
    if "recipients" in args.case or not args.case:
        kinds = [Postfix, Exedge, ExedgeSmartHost] if before is None else [before, Exedge]
        plans.append(("recipients", [("100 rcpts/10 domains", k, wide) for k in kinds]))
    results = []
    for _, cases in plans:
        for r in range(rounds):
            for label, kind, jobs in (cases if r % 2 == 0 else cases[::-1]):
                if cap.over():
                    break
                res = run_one(kind, label, jobs, args.conns, min(args.run_seconds, max(cap.left(), 5)))
                results.append(res)
                flag = "" if res["complete"] else f"  INCOMPLETE {res['failures']}"
                print(f"  {label:22} {kind.name:18} {res['at_sink']:>6}/{res['recipients']} rcpts in "
                      f"{res['seconds']:6.2f} s = {res['rate']:7.1f} msg/s, {res['cpu_us_per_msg']:7.0f} us CPU/msg, "
                      f"{res['cores']:.2f} cores{flag}", flush=True)
    print(f"\nexedge = {against.here()}; {args.conns} connections; medians of {rounds} round(s), ranges after")
    groups: dict = {}
    for res in results:
        groups.setdefault((res["case"], res["server"]), []).append(res)
    for (label, server), runs in groups.items():
        rates = [x["rate"] for x in runs]
        cpu = [x["cpu_us_per_msg"] for x in runs]
        print(f"  {label:22} {server:18} {proc.median(rates):8.1f} msg/s ({min(rates):.0f}-{max(rates):.0f}), "
              f"{proc.median(cpu):7.0f} us CPU/msg ({min(cpu):.0f}-{max(cpu):.0f})")

    def rate(label, server):
        runs = groups.get((label, server), [])
        return proc.median([x["rate"] for x in runs]) if runs else 0.0

    one_rate, spread_rate = rate("1 domain", Exedge.name), rate("1000 domains", Exedge.name)
    if one_rate and spread_rate:
        print(f"  1000 domains / 1 domain: {spread_rate / one_rate:.2f}x (target >= 0.8x)")
    pf = rate("100 rcpts/10 domains", Postfix.name)
    for k in (Exedge, ExedgeSmartHost):
        ex = rate("100 rcpts/10 domains", k.name)
        if pf and ex:
            print(f"  100 rcpts/10 domains, {k.name} / postfix: {ex / pf:.2f}x (target >= 0.8x)")
    if cap.cut:
        print(f"relay_domains: --max-seconds {args.max_seconds:.0f} reached: runs skipped")
    proc.write_json(args.json, {"exedge": against.here(), "rounds": rounds, "cut_by_time": cap.cut, "runs": results})
    return 0 if all(x["complete"] for x in results) and not cap.cut else 1


if __name__ == "__main__":
    sys.exit(main())
