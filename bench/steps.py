"""
Where one message's time goes at one connection: the time a client waits
for each reply, exedge against a private Postfix (or exedge at another
commit), in the same setups as bench/relay_rate.py (relay to an
smtp-sink smart host, or accept only).

relay_rate.py says how many messages a second; this says which step of a
session takes the time: the TCP connection and greeting, EHLO, MAIL, RCPT,
DATA (to its 354), the data and final dot (to its 250: the commit), QUIT
(to its 221), and the close. The client is written here, one message per
connection, one command at a time, TCP_NODELAY, so that each figure is one
round trip; its own cost is the same for both servers. Rounds alternate
which server goes first; each figure is the median over the messages of a
round, then the median and range over the rounds.

Needs the Debian package postfix and root (tests/postfix.py), as
relay_rate.py. Binds 127.0.0.1 only; every process is stopped by PID.

    .venv/bin/python bench/steps.py                       # relay and accept, 3 rounds of 800
    .venv/bin/python bench/steps.py --mode relay --against HEAD~1
    .venv/bin/python bench/steps.py --mode relay --size 102400    # 100 KiB messages
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import against  # noqa: E402
import proc  # noqa: E402
import relay_rate  # noqa: E402  (its Exedge, Postfix and Sink)

STEPS = ("connect+greet", "EHLO", "MAIL", "RCPT", "DATA", "data+dot", "QUIT", "close", "whole")
MAX_REPLY_LINES = 100
HEADER = b"From: bench@source.test\r\nTo: rcpt@relay.test\r\nSubject: steps\r\n\r\n"


def body(size: int) -> bytes:
    """About C{size} octets of ordinary text: a header, then lines of 70 octets as smtp-source's."""
    filler = b" of a message, ordinary text of the length smtp-source sends, and more"
    lines = max(1, (size - len(HEADER)) // 70)
    return HEADER + b"".join((b"line %06d" % i + filler)[:68] + b"\r\n" for i in range(lines))


BODY = body(1024)


def _reply(f) -> bytes:
    """One reply, its last line (bounded: a server that never ends a reply fails the run)."""
    for _ in range(MAX_REPLY_LINES):
        line = f.readline(4096)
        if not line:
            raise ConnectionError("connection closed before a reply")
        if line[3:4] != b"-":
            return line
    raise ConnectionError("a reply of too many lines")


def one_message(port: int, waits: dict, message: bytes = BODY) -> None:
    """One session: each reply's wait appended to C{waits[step]}."""
    now = time.perf_counter
    start = now()
    with socket.create_connection((relay_rate.HOST, port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")

        def step(name: str, data: bytes, expect: bytes, since: float | None = None) -> None:
            t = now() if since is None else since
            if data:
                s.sendall(data)
            line = _reply(f)
            waits[name].append(now() - t)
            if not line.startswith(expect):
                raise ConnectionError(f"{name}: {line!r}")

        step("connect+greet", b"", b"220", since=start)     # from before the connect to the 220
        step("EHLO", b"EHLO client.source.test\r\n", b"250")
        step("MAIL", b"MAIL FROM:<bench@source.test>\r\n", b"250")
        step("RCPT", b"RCPT TO:<rcpt@relay.test>\r\n", b"250")
        step("DATA", b"DATA\r\n", b"354")
        step("data+dot", message + b".\r\n", b"250")
        step("QUIT", b"QUIT\r\n", b"221")
        t = now()
        f.close()
    waits["close"].append(now() - t)
    waits["whole"].append(now() - start)


def run_one(kind, mode: str, count: int, size: int = 1024) -> dict:
    message = body(size)
    with relay_rate.running(kind, mode, prefix="steps") as (server, _):
        warm = {name: [] for name in STEPS}
        for _ in range(min(100, count)):
            one_message(server.port, warm, message)
        waits = {name: [] for name in STEPS}
        for _ in range(count):
            one_message(server.port, waits, message)
        return {"server": kind.name, "mode": mode, "messages": count, "size": len(message),
                "us": {name: 1e6 * proc.median(values) for name, values in waits.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=800, help="messages per round (after 100 to warm up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", action="append", choices=relay_rate.MODES, default=[])
    parser.add_argument("--size", type=int, default=1024, metavar="OCTETS",
                        help="message size (default 1024; 102400 for relay_rate's 100 KiB)")
    parser.add_argument("--against", metavar="REV", help="compare with exedge at this git commit instead of Postfix")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "steps-latest.json"))
    args = parser.parse_args(argv)
    with proc.interruptible():
        if args.against:
            with against.checkout(args.against) as (tree, rev):
                return compare(args, against.variant(relay_rate.Exedge, tree, f"exedge@{rev}"), relay_rate.Exedge)
        return compare(args, relay_rate.Postfix, relay_rate.Exedge)


def compare(args, Base, Exedge) -> int:
    missing = [b for b in ("smtp-sink", "postfix") if not shutil.which(b)]
    if missing or os.geteuid() != 0:
        print(f"steps: needs root and the Debian package postfix (missing: {', '.join(missing) or 'root'})")
        return 2
    results = []
    for mode in (args.mode or relay_rate.MODES):
        runs = {Exedge.name: [], Base.name: []}
        for r in range(args.rounds):
            for kind in ((Exedge, Base) if r % 2 == 0 else (Base, Exedge)):
                res = run_one(kind, mode, args.messages, args.size)
                results.append(res)
                runs[kind.name].append(res)
                print(f"  {mode:6} {kind.name:18} " + "  ".join(f"{n} {res['us'][n]:.0f}" for n in STEPS) + " us",
                      flush=True)
        print(f"\n{mode}: median (range) over {args.rounds} round(s) of each step's median wait, us")
        print(f"{'step':>14} {Base.name[:18]:>18} {Exedge.name[:18]:>18} {'exedge - base':>14}")
        for name in STEPS:
            b = [r["us"][name] for r in runs[Base.name]]
            e = [r["us"][name] for r in runs[Exedge.name]]
            print(f"{name:>14} {proc.median(b):>8.0f} ({min(b):.0f}-{max(b):.0f}) "
                  f"{proc.median(e):>8.0f} ({min(e):.0f}-{max(e):.0f}) {proc.median(e) - proc.median(b):>+10.0f}")
        print()
    proc.write_json(args.json, {"exedge": against.here(), "base": Base.name, "rounds": args.rounds, "runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
