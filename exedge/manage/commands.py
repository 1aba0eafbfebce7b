"""
The command line's verbs over the management endpoint: `exedge queue
list|flush`, `exedge reload`, `exedge status` (Postfix's postqueue -p,
postqueue -f and postfix reload). The Exchange-named cmdlets (Get-Queue,
Retry-Queue, ...) answer from the same client.
"""

from __future__ import annotations

import json
import sys

from .client import EndpointError, ManagementClient, NotRunning


def table(rows: list[dict], columns: list[str]) -> str:
    """Rows as a left-aligned text table, Format-Table's way: a header, a rule, one line per row."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = [" ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(),
             " ".join("-" * w for w in widths)]
    lines += [" ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return value.get("address", "") or json.dumps(value)
    text = str(value)
    # a name or an error from the network must not drive the terminal
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


QUEUE_COLUMNS = ["Identity", "DeliveryType", "Status", "MessageCount", "NextRetryTime", "NextHopDomain", "LastError"]


def queue_rows(queues: list[dict]) -> list[dict]:
    return [{"Identity": q["identity"], "DeliveryType": q["delivery_type"], "Status": q["status"],
             "MessageCount": q["message_count"], "NextRetryTime": q["next_retry_time"],
             "NextHopDomain": q["next_hop_domain"], "LastError": q["last_error"] or q["hold_reason"]}
            for q in queues]


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
                print(table(queue_rows(queues), QUEUE_COLUMNS))
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
