"""
MAIL FROM and RCPT TO, from their argument to checked values.

One place for the path and its ESMTP parameters (RFC 1870 SIZE, RFC 6152
BODY, RFC 3461 RET/ENVID/NOTIFY/ORCPT, RFC 4954 AUTH), so MAIL and RCPT
parse the same way and the session reads as the state machine it is. The
parsing of the pieces is in L{exedge.receive.address}; this module turns
each kind of mistake into the reply a client is owed. Nothing here decides
policy (who may send, relay, pass AUTH= on): the session does.
"""

from __future__ import annotations

from typing import Callable

import attrs

from .address import (
    Mailbox, SMTPError, check_notify, check_orcpt, check_xtext, parse_params, parse_path,
)
from .reply import Reply, syntax_error


class CommandRefused(Exception):
    """The command cannot be taken as written; C{reply} says why."""

    def __init__(self, reply: Reply):
        super().__init__(reply.text)
        self.reply = reply


@attrs.frozen
class MailParameters:
    size: int | None = None         # SIZE=, as declared
    body: str | None = None         # 7BIT | 8BITMIME
    ret: str | None = None          # FULL | HDRS
    envid: str | None = None
    auth: str | None = None         # AUTH=, as sent: xtext or "<>" (the session decides whether to keep it)


@attrs.frozen
class RecipientParameters:
    notify: tuple = ()
    orcpt: str | None = None


def _path(text: str, verb: str, what: str, status: str, esmtp: bool, *, allow_null: bool,
          postmaster: Callable[[], str] | None = None) -> tuple[Mailbox | None, dict]:
    try:
        if postmaster is not None and text[:12].lower() == "<postmaster>":   # RFC 5321 §4.1.1.3: no domain needed
            mailbox, rest = Mailbox("postmaster", postmaster()), text[12:]
        else:
            mailbox, rest = parse_path(text, what, allow_null=allow_null)
    except SMTPError as e:
        raise CommandRefused(Reply(e.code, e.status, e.text, tarpit=True)) from None
    except ValueError as e:
        raise CommandRefused(syntax_error(f"Bad {what} address syntax: {e}", status)) from None
    try:
        params = parse_params(rest)
    except ValueError as e:
        raise CommandRefused(syntax_error(f"Bad {verb} parameter: {e}")) from None
    if params and not esmtp:
        raise CommandRefused(Reply(555, "5.5.4", f"{verb} parameters need EHLO", protocol_error=True))
    return mailbox, params


def _unknown(verb: str, key: str) -> CommandRefused:
    return CommandRefused(Reply(555, "5.5.4", f"{verb} parameter {key} not recognized or not implemented",
                                protocol_error=True))


def parse_mail(text: str, esmtp: bool) -> tuple[Mailbox | None, MailParameters]:
    """What follows "MAIL FROM:": the sender (None for <>) and its parameters; L{CommandRefused} if bad."""
    sender, params = _path(text, "MAIL", "sender", "5.1.7", esmtp, allow_null=True)
    found: dict = {}
    try:
        for key, value in params.items():
            if key == "SIZE":
                if not value or not value.isdigit() or len(value) > 20:
                    raise ValueError("SIZE needs a number")
                found["size"] = int(value)
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    raise ValueError("BODY must be 7BIT or 8BITMIME")
                found["body"] = value.upper()
            elif key == "RET":
                if (value or "").upper() not in ("FULL", "HDRS"):
                    raise ValueError("RET must be FULL or HDRS")
                found["ret"] = value.upper()
            elif key == "ENVID":
                found["envid"] = check_xtext(value or "", 100)
            elif key == "AUTH":
                if value is None or (value != "<>" and value != check_xtext(value, 500)):
                    raise ValueError("AUTH needs xtext or <>")
                found["auth"] = value
            else:
                raise _unknown("MAIL", key)
    except ValueError as e:
        raise CommandRefused(syntax_error(f"Bad MAIL parameter: {e}")) from None
    return sender, MailParameters(**found)


def parse_rcpt(text: str, esmtp: bool, postmaster: Callable[[], str]) -> tuple[Mailbox, RecipientParameters]:
    """
    What follows "RCPT TO:": the recipient and its parameters;
    L{CommandRefused} if bad. C{postmaster()} gives the domain of a bare
    <postmaster>.
    """
    recipient, params = _path(text, "RCPT", "recipient", "5.1.3", esmtp, allow_null=False, postmaster=postmaster)
    found: dict = {}
    try:
        for key, value in params.items():
            if key == "NOTIFY":
                found["notify"] = check_notify(value or "")
            elif key == "ORCPT":
                found["orcpt"] = check_orcpt(value or "")
            else:
                raise _unknown("RCPT", key)
    except ValueError as e:
        raise CommandRefused(syntax_error(f"Bad RCPT parameter: {e}")) from None
    return recipient, RecipientParameters(**found)
