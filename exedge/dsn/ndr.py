"""
Delivery status notifications (RFC 3464): non-delivery reports, delay
notices and success notices.

A report is C{multipart/report; report-type=delivery-status} (RFC 6522):
a part for people (what failed and what the remote server said, as
Exchange's NDRs do), a C{message/delivery-status} part for programs, and
the original headers (C{text/rfc822-headers}), or the whole original
message when the sender asked for RET=FULL. It goes from the null sender to
the original sender, so it can never cause another bounce.
"""

from __future__ import annotations

import email.utils
import re
import secrets

import attrs

# a remote reply is quoted as received, up to this much (RFC 5321 replies
# are a few lines of at most 512 octets; a hostile one can be 200 KiB)
DIAGNOSTIC_MAX = 2000
_FOLD_WIDTH = 78
_MAX_LINE = 998          # RFC 5322 §2.1.1
_BEFORE_BLANKS = re.compile(r"(?<=\S)(?=[ \t]+\S)")


@attrs.frozen
class FailedRecipient:
    address: str
    orcpt: str | None
    status: str              # enhanced status code, "5.1.1"
    diagnostic: str          # the remote reply as received, "550 No such user here", or ours
    remote_mta: str = ""     # the host that refused, if any
    action: str = "failed"


def _folded(field: str) -> list[str]:
    """
    A header field as physical lines, folded before blanks (RFC 5322
    §2.2.3) so that unfolding gives back exactly C{field}: a multi-line
    reply quoted in Diagnostic-Code reads as Postfix quotes it, each of
    its lines with its own code. A run of C{_MAX_LINE} octets with no blank
    to fold at (only a hostile peer sends one) is cut.
    """
    lines = [""]
    for piece in _BEFORE_BLANKS.split(field):
        if lines[-1] and len(lines[-1]) + len(piece) > _FOLD_WIDTH:
            lines.append(piece)
        else:
            lines[-1] += piece
    return [line[:_MAX_LINE] for line in lines]


def wants_ndr(notify: tuple[str, ...]) -> bool:
    """RFC 3461: without NOTIFY, failures are reported; NOTIFY must name FAILURE otherwise."""
    return not notify or "FAILURE" in notify


def _header_block(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 2]


def _subject(headers: bytes) -> str:
    for line in headers.split(b"\r\n"):
        if line[:8].lower() == b"subject:":
            return line[8:].strip().decode("ascii", "replace")[:200]
    return ""


def wants_delay_notice(notify: tuple[str, ...]) -> bool:
    """RFC 3461 §4.1: without NOTIFY a server may act as if NOTIFY=FAILURE,DELAY (Exchange does)."""
    return not notify or "DELAY" in notify


def build_ndr(*, reporting_mta: str, original_sender: str, envid: str | None, ret: str | None,
              arrival: float, failed: list[FailedRecipient], original: bytes, now: float,
              retry_until: float | None = None) -> bytes:
    """
    The report, CRLF line ends, ready for the spool: a non-delivery report,
    or with C{retry_until} a delay notice (Action: delayed, headers only).
    """
    delayed = retry_until is not None
    success = bool(failed) and all(f.action in ("delivered", "relayed") for f in failed)
    boundary = "=_exedge_" + secrets.token_hex(12)
    headers = _header_block(original)
    subject = _subject(headers)
    date = email.utils.formatdate(now, localtime=False)
    if delayed:
        ret = "HDRS"
        kind = "Delayed"
        intro = ["Delivery to these recipients has been delayed. exedge will keep trying until",
                 f"{email.utils.formatdate(retry_until, localtime=False)}; you need not send the message again:"]
    elif success:
        ret = "HDRS"
        relayed = any(f.action == "relayed" for f in failed)
        kind = "Relayed" if relayed else "Delivered"
        intro = (["Your message was relayed to these recipients' mail system, which does not send",
                  "delivery notifications; this is the last report you will get:"] if relayed
                 else ["Your message has been delivered to these recipients:"])
    else:
        kind = "Undeliverable"
        intro = ["Delivery has failed to these recipients:"]
    human = [
        *intro,
        "",
        *[f"  {f.address}" for f in failed],
        "",
        "Diagnostic information for administrators:",
        "",
        f"Generating server: {reporting_mta}",
        "",
    ]
    for f in failed:
        human.append(f"{f.address}")
        if f.remote_mta:
            human.append(f"Remote server: {f.remote_mta}")
        human += [line.lstrip() for line in _folded(f.diagnostic[:DIAGNOSTIC_MAX])] + [""]
    status = [f"Reporting-MTA: dns; {reporting_mta}"]
    if envid:
        status.append(f"Original-Envelope-Id: {envid}")
    status.append(f"Arrival-Date: {email.utils.formatdate(arrival, localtime=False)}")
    for f in failed:
        status.append("")
        if f.orcpt:
            status.append(f"Original-Recipient: {f.orcpt}")
        status += [
            f"Final-Recipient: rfc822; {f.address}",
            f"Action: {f.action}",
            f"Status: {f.status}",
        ]
        if f.remote_mta:
            status.append(f"Remote-MTA: dns; {f.remote_mta}")
        # the reply as received, folded: RFC 3464 §2.3.6 (the Status field
        # above carries the enhanced code, the server's or our default)
        status += [*_folded(f"Diagnostic-Code: smtp; {f.diagnostic[:DIAGNOSTIC_MAX]}"),
                   f"Last-Attempt-Date: {date}"]
        if delayed:
            status.append(f"Will-Retry-Until: {email.utils.formatdate(retry_until, localtime=False)}")
    if ret == "FULL":
        returned_type, returned = "message/rfc822", original
    else:
        returned_type, returned = "text/rfc822-headers", headers
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{original_sender}>",
        f"Subject: {kind}: {subject}" if subject else f"Subject: {kind} message",
        f"Date: {date}",
        f"Message-ID: <{secrets.token_hex(16)}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-formatted message delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        *human,
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        *status,
        "",
        f"--{boundary}",
        f"Content-Type: {returned_type}",
        "",
    ]
    text = "\r\n".join(head).encode("ascii", "replace") + b"\r\n"
    body = returned if returned.endswith(b"\r\n") else returned + b"\r\n"
    return text + body + f"--{boundary}--\r\n".encode("ascii")
