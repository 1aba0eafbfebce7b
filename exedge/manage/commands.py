"""
The command line's verbs over the management endpoint: `exedge queue
list|flush`, `exedge reload`, `exedge status` (Postfix's postqueue -p,
postqueue -f and postfix reload). The Exchange-named cmdlets (Get-Queue,
Retry-Queue, ...) answer from the same client.
"""

from __future__ import annotations

import json
import sys

from exedge.admin.format import format_table
from exedge.admin.queue_cmdlets import QUEUE_VIEW, queue_record

from .client import EndpointError, ManagementClient, NotRunning


def _run(args, work) -> int:
    try:
        client = ManagementClient(args.config)
        return work(client)
    except NotRunning as e:
        print(f"exedge: {e}", file=sys.stderr)
        return 2
    except EndpointError as e:
        print(f"exedge: the server says ({e.status}): {e}", file=sys.stderr)
        return 1


def queue(args) -> int:
    def work(client):
        if args.action == "list":
            queues = client.queues()
            if args.json:
                print(json.dumps(queues, indent=1))
            else:
                print(format_table([queue_record(q) for q in queues], list(QUEUE_VIEW)), end="")
            return 0
        # flush: what waits for a retry goes now (postqueue -f); held queues stay held
        tried = []
        for q in client.queues():
            if q["status"] == "Retry" or (q["status"] in ("Ready", "Active") and q["message_count"]):
                client.queue_action(q["id"], "retry")
                tried.append(q["identity"])
        print(f"retried {len(tried)} queue(s)" + (": " + ", ".join(tried) if tried else ""))
        return 0

    return _run(args, work)


def reload(args) -> int:
    def work(client):
        report = client.reload()
        if args.json:
            print(json.dumps(report, indent=1))
        elif report.get("reloaded"):
            print(f"reloaded {args.config}")
            for key in ("listening_added", "listening_removed", "send_connectors_changed", "restart_needed_for"):
                if report.get(key):
                    print(f"  {key.replace('_', ' ')}: {', '.join(report[key])}")
            if report.get("items_rerouted"):
                print(f"  queued items routed again: {report['items_rerouted']}")
        else:
            print(f"the server kept its running configuration; {args.config} has problems:", file=sys.stderr)
            for problem in report.get("problems", []):
                print(f"  {problem}", file=sys.stderr)
        return 0 if report.get("reloaded") else 1

    return _run(args, work)


def status(args) -> int:
    def work(client):
        print(json.dumps(client.status(), indent=1))
        return 0

    return _run(args, work)


def add_parsers(sub) -> None:
    """The subcommands above, on the `exedge` command's parser."""
    p = sub.add_parser("queue", help="the running server's queues: list (postqueue -p), flush (postqueue -f)")
    p.add_argument("action", choices=["list", "flush"])
    p.add_argument("--config", default="etc/exedge.toml", help="the exedge configuration (default etc/exedge.toml)")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p.set_defaults(func=queue)
    p = sub.add_parser("reload", help="make the running server read its configuration again (as SIGHUP)")
    p.add_argument("--config", default="etc/exedge.toml", help="the exedge configuration (default etc/exedge.toml)")
    p.add_argument("--json", action="store_true", help="the reload's report as JSON")
    p.set_defaults(func=reload)
    p = sub.add_parser("status", help="the running server's status (version, uptime, connectors, sessions, spool)")
    p.add_argument("--config", default="etc/exedge.toml", help="the exedge configuration (default etc/exedge.toml)")
    p.set_defaults(func=status)
