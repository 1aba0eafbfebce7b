"""
What the pipeline costs: durable accept rate of exedge with the default
built-in pipeline against the same exedge with an empty one, in one run.

The pipeline is the built-in stages that need no network: connection_filter
(IP block and allow lists that do not match the load), sender_filter
(blocked senders and domains that do not match), recipient_filter (a
blocked recipient that does not match) and content_restrictions (a
priority the load does not carry, a size limit it stays under), so every
message passes through every hook and is accepted. Same load generator, sizes and method
as accept_rate.py (it reuses its code); rounds alternate the two servers.

    .venv/bin/python bench/pipeline_rate.py [--messages N] [--rounds R] [--concurrency C]

Target (issue #5): the pipeline costs <= 15% of accept throughput at 1 KiB,
50 connections.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import accept_rate as ar  # noqa: E402
import harness  # noqa: E402

PIPELINE = """
[[pipeline]]
stage = "connection_filter"
priority = 10
ip_block_list = ["192.0.2.0/24", "198.51.100.7"]
ip_allow_list = ["203.0.113.0/24"]

[[pipeline]]
stage = "sender_filter"
priority = 20
blocked_senders = ["spammer@junk.example"]
blocked_domains = ["*.spam.example", "junk.example"]

[[pipeline]]
stage = "recipient_filter"
priority = 30
blocked_recipients = ["former.employee@example.com"]

[[pipeline]]
stage = "content_restrictions"
priority = 40
allowed_priorities = ["Normal", "Low"]
max_message_size = "10MB"
"""


class WithPipeline(ar.Exedge):
    name = "pipeline"

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.port = harness.free_port(ar.HOST)
        # as accept_rate's exedge: 50 senders from one address must not meet the per-source DATA limit
        internet = ar.EXEDGE_INTERNET + "max_inbound_data_sessions_per_source = 1000\n"
        config = harness.config_text(self.port, tarpit="0", internet=internet, extra=PIPELINE)
        self.server = harness.Server(workdir, config, self.port)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args(argv)
    loadgen = shutil.which("smtp-source")
    base = tempfile.mkdtemp(prefix="exedge-pipeline-bench-")
    rates = {"exedge": [], "pipeline": []}
    cpu = {"exedge": [], "pipeline": []}
    try:
        for r in range(args.rounds):
            for kind in ((ar.Exedge, WithPipeline) if r % 2 == 0 else (WithPipeline, ar.Exedge)):
                res = ar.measure(kind, base, "1KiB", args.concurrency, args.messages, loadgen,
                                 time.perf_counter() + 120, False)
                rates[kind.name].append(res["rate"])
                if res["server_cpu_us_per_msg"]:
                    cpu[kind.name].append(res["server_cpu_us_per_msg"])
                print(f"  {kind.name:9} {res['acknowledged']:5d} acked = {res['rate']:7.1f}/s, "
                      f"server CPU {res['server_cpu_us_per_msg']} us/msg"
                      + (f"  [{res['failures']} failed]" if res["failures"] else ""), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    empty, full = statistics.median(rates["exedge"]), statistics.median(rates["pipeline"])
    print(f"\n1 KiB x{args.concurrency}: empty pipeline {empty:.1f}/s, built-in pipeline {full:.1f}/s, "
          f"cost {100 * (1 - full / empty):.1f}% (target <= 15%)")
    if cpu["exedge"] and cpu["pipeline"]:
        # CPU per message is steadier than wall-clock rate on a shared machine
        c0, c1 = statistics.median(cpu["exedge"]), statistics.median(cpu["pipeline"])
        print(f"server CPU per message: empty {c0:.0f} us, built-in pipeline {c1:.0f} us, "
              f"{100 * (c1 / c0 - 1):+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
