"""
A commit worker that commits the first requests it reads, then exits
without answering: the crash that leaves a renamed file in queue/ for a
commit the server never acknowledged (tests/test_commit_worker.py).
"""

import os
import sys

from exedge.queue import commit_worker as wire
from exedge.durable import DirectorySync

if __name__ == "__main__":
    spool_dir = sys.argv[1]
    buffer = bytearray()
    requests = []
    while not requests:
        data = os.read(0, wire.READ_SIZE)
        if not data:
            sys.exit(0)
        buffer += data
        requests = wire.take_requests(buffer)
    queue_dir = os.path.join(spool_dir, "queue")
    wire.commit(os.path.join(spool_dir, "incoming"), queue_dir, DirectorySync(queue_dir), requests)
    with open(os.path.join(spool_dir, "renamed-by-worker"), "w") as f:   # for the test to check
        f.write("\n".join(sorted(os.listdir(queue_dir))))
    os._exit(9)
