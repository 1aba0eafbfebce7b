#!/usr/bin/env python
"""
Start-up: how long twistd takes from exec to its first 220 on an empty
spool. With a big queue the greeting does not wait for recovery (restart.py
shows it is the same with a million queued), so this is the floor of issue
14's "restart in under 1 s whatever the queue": the interpreter, the
imports and building the server from its configuration.

Each round starts a fresh server in a new directory (restart.py's
configuration: one receive connector, nothing routed), times the greeting
and stops it by its PID; with --against, the other tree's server in the
same round, the order alternating between rounds. Medians and ranges.

    .venv/bin/python bench/startup.py                    # this tree, 10 rounds
    .venv/bin/python bench/startup.py --against HEAD~1   # both, alternating
"""

from __future__ import annotations

import argparse
import contextlib
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
import proc  # noqa: E402
import restart  # noqa: E402  (bench/restart.py: its server, configuration and greeting probe)


def greet_once(server_class: type, cap: float) -> float:
    workdir = tempfile.mkdtemp(prefix="exedge-startup-")
    server = server_class(workdir)
    try:
        with open(server.server.log_path, "ab") as log:
            t0 = time.monotonic()
            server.server.proc = subprocess.Popen(
                [harness.TWISTD, "-n", "--pidfile=", "exedge", "--config", server.server.config_path],
                cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=server.server.env)
        return server._wait_greeting(t0, cap)
    finally:
        proc.stop_pid(server.server.proc)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--against", metavar="REV", help="also exedge at this commit, alternating")
    parser.add_argument("--cap", type=float, default=30.0, help="seconds one start may take")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "startup-latest.json"))
    args = parser.parse_args()
    with (against.checkout(args.against) if args.against else contextlib.nullcontext()) as other:
        servers = [against.variant(restart.Exedge, None, against.here())]
        if other is not None:
            servers.append(against.variant(restart.Exedge, other[0], other[1]))
        times: dict[str, list[float]] = {s.name: [] for s in servers}
        for n in range(args.rounds):
            for server in (servers if n % 2 == 0 else servers[::-1]):
                times[server.name].append(greet_once(server, args.cap))
            print(f"  round {n + 1}: " + ", ".join(f"{name} {t[-1]:.3f} s" for name, t in times.items()), flush=True)
    print(f"\nseconds from exec to the first 220, empty spool; medians of {args.rounds} rounds, ranges after")
    for name, t in times.items():
        print(f"  {name:>12}  {proc.median(t):.3f}  ({min(t):.3f}-{max(t):.3f})")
    proc.write_json(args.json, {"rounds": args.rounds, "greet_s": times})
    return 0


if __name__ == "__main__":
    sys.exit(main())
