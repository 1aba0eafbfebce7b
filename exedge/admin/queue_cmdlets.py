"""
The queue cmdlets, as Exchange names them: Get-Queue, Get-Message,
Retry-Queue, Suspend-Queue, Resume-Queue, Suspend-Message, Resume-Message,
Remove-Message, Export-Message. They ask the running server through its
management endpoint (L{exedge.manage.client}); nothing here touches the
spool.

Identities are Exchange's: a queue is "3", "edge01\\3" or "Unreachable";
a message is its queue id as Get-Message shows it (Exchange's
"Server\\Queue\\Id" form is accepted too: the last part counts).
"""

from __future__ import annotations

import os
import re
from typing import Any

from exedge.manage.client import EndpointError, ManagementClient, NotRunning, queue_identity

from .cmdlets import CmdletError, Context, Param, cmdlet, result_size

_QUEUE = re.compile(r"[A-Za-z0-9]{1,32}")
_MESSAGE = re.compile(r"[0-9A-Fa-f]{14,40}")


def _queue(value: Any) -> str:
    text = queue_identity(str(value))
    if not _QUEUE.fullmatch(text):
        raise ValueError(f"{value!s} is not a queue identity (a number, or a name such as Unreachable; "
                         "Get-Queue lists them)")
    return text


def _message(value: Any) -> str:
    text = str(value).rsplit("\\", 1)[-1].strip().upper()
    if not _MESSAGE.fullmatch(text):
        raise ValueError(f"{value!s} is not a message identity (Get-Message lists them)")
    return text


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "$true", "1"):
        return True
    if text in ("false", "$false", "0"):
        return False
    raise ValueError(f"expected $true or $false, got {value!s}")


def _client(ctx: Context) -> ManagementClient:
    try:
        return ManagementClient(ctx.config_path)
    except NotRunning as e:
        raise CmdletError(str(e)) from None


def _ask(ctx: Context, work):
    try:
        return work(_client(ctx))
    except NotRunning as e:
        raise CmdletError(str(e)) from None
    except EndpointError as e:
        raise CmdletError(f"the server says: {e}") from None


def queue_record(q: dict) -> dict:
    """One queue of the endpoint's JSON as Get-Queue shows it (Exchange's property names)."""
    return {"Identity": q["identity"], "DeliveryType": q["delivery_type"], "Status": q["status"],
            "MessageCount": q["message_count"], "NextRetryTime": q["next_retry_time"],
            "NextHopDomain": q["next_hop_domain"], "NextHopConnector": q["connector"],
            "LastError": q["last_error"] or q["hold_reason"], "OldestMessage": q["oldest_message"]}


def _message_record(m: dict) -> dict:
    return {"Identity": m["identity"], "FromAddress": m["from_address"], "Status": m["status"], "Size": m["size"],
            "Subject": m["subject"], "InternetMessageId": m["message_id"],
            "Queue": m["queue"], "Recipients": [r["address"] for r in m["recipients"]],
            "RecipientStatus": [f"{r['address']}: {r['status']}" + (f" ({r['last_error']})" if r["last_error"] else "")
                                for r in m["recipients"]],
            "DateReceived": m["date_received"], "LastError": m["last_error"],
            "ReceiveConnector": m["receive_connector"], "FromIP": m["peer"]}


# Get-Queue's default columns (and `exedge queue list`'s)
QUEUE_VIEW = ("Identity", "DeliveryType", "Status", "MessageCount", "NextRetryTime", "NextHopDomain", "LastError")


@cmdlet("Get-Queue", Param("Identity", parse=_queue, position=0), view=QUEUE_VIEW,
        help="the running server's delivery queues")
def _get_queue(ctx: Context, args: dict):
    queues = _ask(ctx, lambda c: c.queues())
    wanted = args.get("Identity")
    if wanted is not None:
        queues = [q for q in queues if q["id"].lower() == wanted.lower()]
        if not queues:
            raise CmdletError(f"no queue {wanted} on this server (Get-Queue lists them)")
    return [queue_record(q) for q in queues]


@cmdlet("Get-Message", Param("Identity", parse=_message, position=0), Param("Queue", parse=_queue),
        Param("ResultSize", parse=result_size),
        view=("Identity", "FromAddress", "Status", "Size", "Subject", "Queue", "Recipients", "LastError"),
        help="the messages in the running server's queues, oldest first (-Queue: of one queue; "
             "-ResultSize: how many, 1000 unless given, or Unlimited)")
def _get_message(ctx: Context, args: dict):
    wanted = args.get("Identity")
    if wanted is not None:
        def one(client):
            try:
                return client.message(wanted)
            except EndpointError as e:
                if e.status == 404:
                    return None            # not in the queues (the endpoint's 404), not a failure to ask
                raise

        message = _ask(ctx, one)
        if message is None:
            raise CmdletError(f"no message {wanted} in the queues (Get-Message lists them)")
        if args.get("Queue") is not None and args["Queue"].lower() not in (q.lower() for q in message["queue"]):
            raise CmdletError(f"no message {wanted} in queue {args['Queue']} (Get-Message lists them)")
        return [_message_record(message)]
    limit = args.get("ResultSize", 1000)       # Exchange's default
    page = _ask(ctx, lambda c: c.message_page(args.get("Queue"), limit))
    if page.get("truncated"):
        ctx.warn(f"{page['total']} messages; showing the first {limit} (-ResultSize Unlimited for all)")
    return [_message_record(m) for m in page["messages"]]


def _queue_verb(verb: str, done: str):
    def run(ctx: Context, args: dict):
        identity = args["Identity"]
        body = {"resubmit": args["Resubmit"]} if args.get("Resubmit") is not None else {}
        _ask(ctx, lambda c: c.queue_action(identity, verb, body))
        ctx.say(f"queue {identity}: {done}")
    return run


cmdlet("Retry-Queue", Param("Identity", parse=_queue, position=0, mandatory=True), Param("Resubmit", parse=_bool),
       help="try a queue now; -Resubmit $true routes its messages again (as after a configuration change)"
       )(_queue_verb("retry", "retried"))
cmdlet("Suspend-Queue", Param("Identity", parse=_queue, position=0, mandatory=True),
       help="start no new delivery from a queue")(_queue_verb("suspend", "suspended"))
cmdlet("Resume-Queue", Param("Identity", parse=_queue, position=0, mandatory=True),
       help="resume a suspended queue")(_queue_verb("resume", "resumed"))


def _message_verb(verb: str, done: str):
    def run(ctx: Context, args: dict):
        identity = args["Identity"]
        _ask(ctx, lambda c: c.message_action(identity, verb))
        ctx.say(f"message {identity}: {done}")
    return run


cmdlet("Suspend-Message", Param("Identity", parse=_message, position=0, mandatory=True),
       help="start no delivery of a message until resumed")(_message_verb("suspend", "suspended"))
cmdlet("Resume-Message", Param("Identity", parse=_message, position=0, mandatory=True),
       help="resume a suspended message")(_message_verb("resume", "resumed"))


@cmdlet("Remove-Message", Param("Identity", parse=_message, position=0, mandatory=True),
        Param("WithNDR", parse=_bool), Param("Confirm", parse=_bool),
        help="give up on a message's pending recipients; -WithNDR $true (Exchange's default) tells the sender")
def _remove_message(ctx: Context, args: dict):
    identity = args["Identity"]
    ndr = args.get("WithNDR", True)          # Exchange's default
    _ask(ctx, lambda c: c.message_action(identity, "remove", {"ndr": ndr}))
    ctx.say(f"message {identity}: removed " + ("with an NDR to its sender" if ndr else "without NDR"))


@cmdlet("Export-Message", Param("Identity", parse=_message, position=0, mandatory=True),
        Param("Path", mandatory=True),
        help="write a message as stored (.eml) to a new file -Path")
def _export_message(ctx: Context, args: dict):
    identity, path = args["Identity"], str(args["Path"])
    data = _ask(ctx, lambda c: c.export(identity))
    try:
        # a new file only, readable by its owner alone: it holds someone's mail
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise CmdletError(f"cannot create {path}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    ctx.say(f"message {identity}: {len(data)} bytes written to {path}")
