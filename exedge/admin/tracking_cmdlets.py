"""
Get-MessageTrackingLog over the tracking log's files ([logs]
message_tracking_log_path of --config): read back with the csv module,
never through the server, so it answers while the server is down too.
Records carry Exchange's property names (Timestamp, EventId, Sender,
Recipients, ...), so `| Format-List` and `| Format-Table` take the names
an Exchange admin types.
"""

from __future__ import annotations

from typing import Any

from exedge.config import ConfigError
from exedge.config.loader import load_section
from exedge.logs import tracking

from .cmdlets import CmdletError, Context, Param, cmdlet, result_size

# the CSV's field -> Exchange's property name (the rest: the field in CamelCase)
_PROPERTY = {"date-time": "Timestamp", "recipient-address": "Recipients", "sender-address": "Sender",
             "message-subject": "MessageSubject", "client-ip": "ClientIp", "server-ip": "ServerIp"}


def _camel(field: str) -> str:
    return _PROPERTY.get(field) or "".join(part.capitalize() for part in field.split("-"))


def _record(row: dict) -> dict:
    record = {_camel(f): row.get(f, "") for f in tracking.FIELDS}
    recipients = [v for v in row.get("recipient-address", "").split(";") if v]
    record["Recipients"] = recipients
    # statuses are joined with ";" too, and a reply may hold one ("QUEUE.Admin; message deleted ..."):
    # split only where that gives one status per recipient, or one for all
    status = row.get("recipient-status", "")
    parts = status.split(";")
    record["RecipientStatus"] = parts if len(parts) == len(recipients) > 1 else ([status] if status else [])
    return record


def _addresses(value: Any) -> tuple:
    values = value if isinstance(value, (list, tuple)) else [value]
    return tuple(str(v).strip() for v in values if str(v).strip())


@cmdlet("Get-MessageTrackingLog", Param("Sender"), Param("Recipients", parse=_addresses),
        Param("MessageId"), Param("EventId"), Param("Start", parse=tracking.parse_time),
        Param("End", parse=tracking.parse_time), Param("ResultSize", parse=result_size),
        view=("Timestamp", "EventId", "Source", "Sender", "Recipients", "MessageSubject"),
        help="search the message tracking log ([logs] message_tracking_log_path); times are UTC unless given a zone")
def _get_message_tracking_log(ctx: Context, args: dict):
    try:
        directory = load_section(ctx.config_path, "logs").message_tracking_log_path
    except ConfigError as e:
        raise CmdletError("; ".join(str(p) for p in e.problems)) from None
    limit = args.get("ResultSize", 1000)       # Exchange's default
    records = []
    try:
        for row in tracking.search(directory, sender=args.get("Sender"), recipients=args.get("Recipients", ()),
                                   message_id=args.get("MessageId"), event_id=args.get("EventId"),
                                   start=args.get("Start"), end=args.get("End")):
            if limit is not None and len(records) >= limit:
                ctx.warn(f"more than {limit} results; showing the first (-ResultSize Unlimited for all)")
                break
            records.append(_record(row))
    except OSError as e:
        raise CmdletError(f"cannot read {directory}: {e.strerror}") from None
    return records
