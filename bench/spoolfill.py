"""
Fill a spool with N committed messages, quickly, through exedge's own spool
code: the envelope and footer of L{exedge.queue.spool.envelope_footer}, the
ids of L{new_queue_id}, the files written and renamed into queue/ by
L{exedge.queue.commit_worker.write_group}, as the commit worker does. What
is skipped is the fsync of each file (a million fsyncs would take longer
than the benchmark): the group's renames are made durable by the
directory fsync of write_group, and one sync(2) at the end puts everything
on disk before the server is started, so a kill -9 afterwards finds what a
running server would have left.

Run as its own process with C{PYTHONPATH} set to the exedge tree being
measured, so that each commit (bench/restart.py --against) writes its own
spool format:

    PYTHONPATH=TREE python bench/spoolfill.py SPOOL_DIR N [--domain held.test] [--size 1024]

Prints one JSON line: messages written and seconds taken.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from exedge.durable import DirectorySync
from exedge.queue.commit_worker import write_group
from exedge.queue.envelope import Envelope, Recipient
from exedge.queue.spool import envelope_footer, new_queue_id

GROUP = 1000


def message(index: int, size: int, domain: str) -> bytes:
    head = (f"Received: from client.bench.test ([127.0.0.1]) by edge01.example.com; "
            f"Thu, 01 Jan 2026 00:00:00 +0000\r\n"
            f"From: <bench@sender.test>\r\nTo: <held{index % 100}@{domain}>\r\n"
            f"Subject: queued #{index}\r\nMessage-ID: <q{index}@sender.test>\r\n"
            f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n\r\n").encode("ascii")
    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n"
    body = line * max((size - len(head)) // len(line), 1)
    return head + body


def fill(spool_dir: str, count: int, domain: str, size: int) -> int:
    incoming = os.path.join(spool_dir, "incoming")
    queue = os.path.join(spool_dir, "queue")
    for d in ("incoming", "queue", "state", "corrupt"):
        os.makedirs(os.path.join(spool_dir, d), exist_ok=True)
    sync = DirectorySync(queue)
    now = time.time()
    written = 0
    for start in range(0, count, GROUP):
        requests = []
        for i in range(start, min(start + GROUP, count)):
            data = message(i, size, domain)
            envelope = Envelope(sender="bench@sender.test",
                                recipients=(Recipient(f"held{i % 100}@{domain}"),),
                                size=len(data), receive_connector="From Internet", peer="127.0.0.1:40000",
                                helo="client.bench.test", received_at=now, message_id=f"<q{i}@sender.test>",
                                subject=f"queued #{i}", session="08DBENCH00000000")
            requests.append((new_queue_id(), data + envelope_footer(envelope), False))
        results = write_group(incoming, queue, sync, requests, lambda fds: [None] * len(fds))
        bad = [r for r in results if isinstance(r, OSError)]
        if bad:
            raise SystemExit(f"spoolfill: {bad[0]}")
        written += len(results)
    os.sync()
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Fill an exedge spool with N queued messages.")
    parser.add_argument("spool_dir")
    parser.add_argument("count", type=int)
    parser.add_argument("--domain", default="held.test")
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args(argv)
    if not 0 <= args.count <= 10_000_000 or not 64 <= args.size <= 10 * 1024 * 1024:
        parser.error("count 0..10,000,000 and size 64..10 MiB")
    t0 = time.monotonic()
    n = fill(args.spool_dir, args.count, args.domain, args.size)
    print(json.dumps({"messages": n, "seconds": round(time.monotonic() - t0, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
