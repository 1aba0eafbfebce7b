#!/usr/bin/env python
"""
The machine's fsync rate: how many write+fsync pairs per second a file
system takes, in a temporary directory on it (by default next to the
spool the benchmarks use: the system's temp directory). Every durable
server's single-connection rate is bounded by it, so bench/README.md
records it beside the results.

    .venv/bin/python bench/fsync_rate.py [--dir DIR] [--seconds 5] [--size 1024]

Two figures: fsync of one file rewritten in place (the disk's flush
latency) and create+write+fsync+rename+directory fsync of a new file each
time (what a commit of one message costs, as exedge's commit worker and
Postfix's cleanup do it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time


def in_place(directory: str, size: int, seconds: float) -> tuple[int, float]:
    fd = os.open(os.path.join(directory, "f"), os.O_WRONLY | os.O_CREAT, 0o600)
    data, n, t0 = b"x" * size, 0, time.monotonic()
    try:
        while time.monotonic() - t0 < seconds and n < 1_000_000:
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            n += 1
    finally:
        os.close(fd)
    return n, time.monotonic() - t0


def commits(directory: str, size: int, seconds: float) -> tuple[int, float]:
    tmp, final = os.path.join(directory, "tmp"), os.path.join(directory, "queue")
    os.makedirs(tmp)
    os.makedirs(final)
    dfd = os.open(final, os.O_RDONLY | os.O_DIRECTORY)
    data, n, t0 = b"x" * size, 0, time.monotonic()
    try:
        while time.monotonic() - t0 < seconds and n < 1_000_000:
            name = f"m{n}"
            fd = os.open(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            os.rename(os.path.join(tmp, name), os.path.join(final, name))
            os.fsync(dfd)
            n += 1
    finally:
        os.close(dfd)
    return n, time.monotonic() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="write+fsync per second on a file system")
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="fsync-rate-", dir=args.dir)
    try:
        n, t = in_place(work, args.size, min(args.seconds, 60))
        print(f"{args.dir}: write+fsync in place: {n / t:.0f}/s ({1000 * t / n:.2f} ms each)")
        n, t = commits(work, args.size, min(args.seconds, 60))
        print(f"{args.dir}: create+write+fsync+rename+dir fsync: {n / t:.0f}/s ({1000 * t / n:.2f} ms each)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
