"""
The message tracking log: Exchange's record of each message's life, and
its search (C{exedge Get-MessageTrackingLog}).

Who writes what (event ids are Exchange's):

  - RECEIVE  cleanup committed a message from SMTP (source SMTP), or one
             exedge made (source DSN for reports)
  - DSN      the bouncer queued a report about this message (reference:
             the report's queue id; message-info: failed, delayed,
             delivered or relayed)
  - SEND     delivered to a next hop over SMTP (server-hostname: the host)
  - DELIVER  dropped into a drop directory
  - FAIL     a recipient failed for good (an NDR follows, DSN)
  - DEFER    a transient failure: the recipients wait for a retry
  - REDIRECT a pipeline stage redirected recipients (related-recipient-address: the original)
  - DROP     a pipeline stage deleted the message, or an admin removed it
             without NDR (Remove-Message -WithNDR $false): nobody gets it
  - RESUBMIT routed again: Retry-Queue -Resubmit, the Unreachable queue
             retried, a reload that changed the recipients' send connector
  - POISONMESSAGE: not written (poison-message detection is not built);
    the id is reserved.

One row per event, recipients (and their statuses) joined with ";" as
Exchange writes multi-valued fields. The subject is written unless
C{[logs] message_tracking_log_subject_logging_enabled = false}.
"""

from __future__ import annotations

import csv
import datetime
import os
import re

from twisted.logger import Logger
from zope.interface import implementer

from exedge.interfaces import IMessageTracking

from .csvlog import CsvLog

FIELDS = (
    "date-time", "client-ip", "client-hostname", "server-ip", "server-hostname", "source-context",
    "connector-id", "source", "event-id", "internal-message-id", "message-id", "network-message-id",
    "recipient-address", "recipient-status", "total-bytes", "recipient-count", "related-recipient-address",
    "reference", "message-subject", "sender-address", "return-path", "message-info", "directionality",
)
log = Logger()

LOG_TYPE = "Message Tracking Log"
PREFIX = "MSGTRK"
EVENT_IDS = ("RECEIVE", "SUBMIT", "SEND", "DELIVER", "FAIL", "DSN", "DEFER", "EXPAND", "REDIRECT",
             "RESUBMIT", "DROP", "POISONMESSAGE")


def _optional(value) -> str:
    return "" if value is None else str(value)


@implementer(IMessageTracking)
class MessageTrackingLog:
    """Writes L{exedge.interfaces.TrackingEvent}s as rows of C{file} (a L{CsvLog} of L{FIELDS})."""

    def __init__(self, file: CsvLog, subjects: bool = True):
        self.file = file
        self.subjects = subjects

    def track(self, event) -> None:
        try:
            self._write(event)
        except Exception:
            # the interface's promise: a message's flow never fails for its log line
            log.failure("message tracking: event {event_id} of {queue_id} not written",
                        event_id=event.event_id, queue_id=event.internal_message_id)

    def _write(self, event) -> None:
        self.file.write((
            event.client_ip, event.client_hostname, event.server_ip, event.server_hostname, event.source_context,
            event.connector_id, event.source, event.event_id, event.internal_message_id, event.message_id, "",
            ";".join(event.recipients), ";".join(event.recipient_status), _optional(event.total_bytes),
            _optional(event.recipient_count), event.related_recipient_address, event.reference,
            event.subject if self.subjects else "", event.sender, event.return_path, event.message_info,
            event.directionality,
        ))


# -- search ----------------------------------------------------------------------

def parse_time(text: str) -> datetime.datetime:
    """
    "2026-12-07 09:00", "2026-12-07T09:00:00Z", "2026-12-07" (UTC unless
    a zone is given, as the log is written), as an aware datetime.
    """
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"not a date and time: {text!r} (e.g. \"2026-12-07 09:00\" or ISO 8601)") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.timezone.utc)


def _files(directory: str) -> list[str]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    pattern = re.compile(re.escape(PREFIX) + r"(\d{8})-(\d+)\.LOG")
    found = []
    for n in names:
        m = pattern.fullmatch(n)
        if m:
            found.append((m.group(1), int(m.group(2)), os.path.join(directory, n)))
    return [path for _, _, path in sorted(found)]


def _rows(path: str):
    """The rows of one file as dicts, by its own #Fields line (a file of another version still reads)."""
    fields = None

    def data(f):
        nonlocal fields
        for line in f:
            if line.startswith("#"):
                if line.startswith("#Fields:"):
                    fields = [n.strip() for n in line[len("#Fields:"):].split(",")]
                continue
            yield line

    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.reader(data(f)):
            if fields is not None and row:
                yield dict(zip(fields, row))


def search(directory: str, sender=None, recipients=(), message_id=None, event_id=None, start=None, end=None):
    """
    The tracking log's rows (dicts by field name) in C{directory} that
    match every criterion given: C{sender} and C{recipients} as addresses
    (case-insensitive; a row matches when one of its recipients is one of
    C{recipients}), C{message_id} with or without its angle brackets,
    C{event_id} (case-insensitive), C{start} <= date-time < C{end}
    (aware datetimes). Oldest first.
    """
    sender = sender.lower() if sender is not None else None
    wanted = {r.lower() for r in recipients}
    mid = message_id.strip().strip("<>").lower() if message_id else None
    event = event_id.upper() if event_id else None
    for path in _files(directory):
        for row in _rows(path):
            if sender is not None and row.get("sender-address", "").lower() != sender:
                continue
            if wanted and not wanted & {r.lower() for r in row.get("recipient-address", "").split(";")}:
                continue
            if mid is not None and row.get("message-id", "").strip().strip("<>").lower() != mid:
                continue
            if event is not None and row.get("event-id", "").upper() != event:
                continue
            if start is not None or end is not None:
                try:
                    when = parse_time(row.get("date-time", ""))
                except ValueError:
                    continue
                if start is not None and when < start or end is not None and when >= end:
                    continue
            yield row
