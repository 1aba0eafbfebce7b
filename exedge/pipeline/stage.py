"""
The stage interface: one hook per SMTP event, one vocabulary of verdicts.

Modelled on Haraka's hooks and return codes (research §3), in Twisted's
terms: a stage is an object providing L{IStage}; each hook may return a
L{Verdict}, None (continue), a Deferred, or be C{async def}. L{Stage}
gives pass-through defaults so a stage writes only the hooks it needs.
Drop-in plugins provide L{IStageFactory} (and C{IPlugin}), which says the
stage's name, whether it is an anti-spam stage and which options it takes.
"""

from __future__ import annotations

import email.parser
import email.policy

import attrs
from zope.interface import Attribute, Interface, implementer


@attrs.frozen
class Verdict:
    """
    What a stage says about an event. C{kind}: continue (ask the next
    stage), accept (skip the remaining stages for this event), reject (5xx),
    defer (4xx) or disconnect (421 and close).
    """

    kind: str
    code: int = 0
    status: str = ""
    text: str = ""

    @property
    def final(self) -> bool:
        return self.kind != "continue"


CONTINUE = Verdict("continue")
ACCEPT = Verdict("accept")


def reject(text: str, status: str = "5.7.1", code: int = 550) -> Verdict:
    return Verdict("reject", code, status, text)


def defer_(text: str, status: str = "4.7.1", code: int = 451) -> Verdict:
    return Verdict("defer", code, status, text)


def disconnect(text: str = "Closing connection", status: str = "4.7.0") -> Verdict:
    return Verdict("disconnect", 421, status, text)


class IStage(Interface):
    """An ordered step in the pipeline; every hook is optional (see L{Stage})."""

    name = Attribute("the stage's name, as [[pipeline]] stage = ... says it")
    anti_spam = Attribute("True: skipped for sessions with the BypassAntiSpam right")

    def on_connect(session):
        """A peer connected (its address is session.peer)."""

    def on_helo(session, helo):
        """HELO or EHLO with this argument."""

    def on_mail(session, sender):
        """MAIL FROM; C{sender} is "user@domain", or "" for the null sender."""

    def on_rcpt(session, recipient):
        """RCPT TO; C{recipient} is "user@domain"."""

    def on_data(session):
        """DATA, before the 354."""

    def on_message(session, message):
        """The final dot, before the message is committed: L{Message}."""

    def on_disconnect(session):
        """The connection is gone (the verdict is ignored)."""


class IStageFactory(Interface):
    """What a drop-in plugin module provides (with twisted.plugin.IPlugin)."""

    name = Attribute("the stage name used in [[pipeline]]")
    anti_spam = Attribute("is it an anti-spam stage")
    options = Attribute("dict: option name -> parser (value -> parsed value, ValueError if bad)")
    hooks = Attribute("optional: the hook names it implements, for check-config")

    def build(options):
        """An L{IStage} configured with the parsed C{options}."""


@implementer(IStage)
class Stage:
    """Pass-through defaults: subclass and write only the hooks you need."""

    name = "stage"
    anti_spam = False

    def on_connect(self, session):
        return None

    def on_helo(self, session, helo):
        return None

    def on_mail(self, session, sender):
        return None

    def on_rcpt(self, session, recipient):
        return None

    def on_data(self, session):
        return None

    def on_message(self, session, message):
        return None

    def on_disconnect(self, session):
        return None


HOOKS = ("on_connect", "on_helo", "on_mail", "on_rcpt", "on_data", "on_message", "on_disconnect")


def hooks_of(stage) -> list[str]:
    """The hooks a stage overrides (for check-config)."""
    return [h for h in HOOKS if getattr(type(stage), h, None) is not getattr(Stage, h)]


class Message:
    """
    The message at the final dot: envelope and header section. The headers
    are parsed once, on first use, and shared by every stage that asks.
    """

    def __init__(self, sender: str, recipients: list[str], header: bytes, size: int):
        self.sender = sender
        self.recipients = recipients
        self.header_bytes = header
        self.size = size
        self._headers = None

    @property
    def headers(self):
        if self._headers is None:
            self._headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
                self.header_bytes)
        return self._headers
