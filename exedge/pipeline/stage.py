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

import attrs
from zope.interface import Attribute, Interface, implementer

from .message import Message

__all__ = ["Message", "Verdict", "IStage", "IStageFactory", "Stage"]  # Message: stages import it from here


@attrs.frozen
class Verdict:
    """
    What a stage says about an event. C{kind}: continue (ask the next
    stage), accept (skip the remaining stages for this event), reject (5xx),
    defer (4xx) or disconnect (421 and close).
    """

    kind: str            # continue | accept | reject | defer | disconnect | ok (a verb's positive answer)
    code: int = 0
    status: str = ""
    text: str = ""
    # a verb's positive answer that hands the connection over once it is
    # written (ATRN, TURN): called then, it gives the protocol that takes
    # the connection from there (the session forwards everything to it)
    turn: object = attrs.field(default=None, eq=False, repr=False)

    @property
    def final(self) -> bool:
        return self.kind != "continue"


CONTINUE = Verdict("continue")
ACCEPT = Verdict("accept")


def reject(text: str, status: str = "5.7.1", code: int = 550) -> Verdict:
    return Verdict("reject", code, status, text)


def defer_(text: str, status: str = "4.7.1", code: int = 451) -> Verdict:
    return Verdict("defer", code, status, text)


def ok(text: str = "OK", status: str = "2.0.0", code: int = 250) -> Verdict:
    """The positive answer of a stage's own SMTP verb (L{IStage.verbs})."""
    return Verdict("ok", code, status, text)


def turn(text: str, protocol_factory, status: str = "2.0.0", code: int = 250) -> Verdict:
    """
    A verb's positive answer after which the connection carries another
    protocol (ATRN and TURN reverse the roles of client and server):
    C{protocol_factory()} is called once the answer is written.
    """
    return Verdict("ok", code, status, text, turn=protocol_factory)


def disconnect(text: str = "Closing connection", status: str = "4.7.0") -> Verdict:
    return Verdict("disconnect", 421, status, text)


class IStage(Interface):
    """An ordered step in the pipeline; every hook is optional (see L{Stage})."""

    name = Attribute("the stage's name, as [[pipeline]] stage = ... says it")
    anti_spam = Attribute("True: skipped for sessions with the BypassAntiSpam right")
    needs_queue = Attribute("optional, default False: the stage asks the queue manager (ETRN, ATRN), so with "
                            "receive workers its connectors' sessions run in the main process")

    def on_connect(session):
        """A peer connected (its address is session.peer)."""

    def on_helo(session, helo):
        """HELO or EHLO with this argument."""

    def on_starttls(session):
        """The TLS handshake after STARTTLS (or of an implicit-TLS connector) is done."""

    def on_auth(session, user):
        """AUTH succeeded for C{user}, before the 235; a reject becomes the AUTH reply."""

    def on_mail(session, sender):
        """MAIL FROM; C{sender} is "user@domain", or "" for the null sender."""

    def on_rcpt(session, recipient):
        """RCPT TO; C{recipient} is "user@domain"."""

    def on_data(session):
        """DATA, before the 354."""

    def on_headers(session, message):
        """
        The header section has been read (L{Message}; its body is not
        read). SMTP cannot answer before the final dot, so the verdict is
        the reply to the final dot, as Exchange's OnEndOfHeaders.
        """

    def on_message(session, message):
        """The final dot, before the message is committed: L{Message}, with its actions."""

    def on_queued(session, queue_id):
        """The message is on disk and acknowledged (the verdict is ignored)."""

    def on_route(message, recipient, route):
        """
        Routing chose C{route} (L{exedge.routing.router.Route}) for
        C{recipient}; return None to keep it, another Route to override it,
        or a reject verdict to bounce that recipient. C{message} is the
        envelope (L{exedge.queue.envelope.Envelope}).
        """

    def on_disconnect(session):
        """The connection is gone (the verdict is ignored)."""


class IStageFactory(Interface):
    """What a drop-in plugin module provides (with twisted.plugin.IPlugin)."""

    name = Attribute("the stage name used in [[pipeline]]")
    anti_spam = Attribute("is it an anti-spam stage")
    options = Attribute("dict: option name -> parser (value -> parsed value, ValueError if bad)")
    defaults = Attribute("optional: option name -> its default as written in TOML (None: not set), for "
                         "exedge check-config --defaults and -n; each must parse with its option's parser")
    hooks = Attribute("optional: the hook names it implements, for check-config")
    needs_body = Attribute("optional, default False: does on_message read the body (for check-config)")

    def build(options):
        """An L{IStage} configured with the parsed C{options}."""


@implementer(IStage)
class Stage:
    """Pass-through defaults: subclass and write only the hooks you need."""

    name = "stage"
    anti_spam = False
    verbs: dict = {}             # "VERB": method(session, argument) -> Verdict (ok/reject/defer)
    ehlo_keywords: tuple = ()    # advertised in the EHLO reply of the sessions the stage runs in
    # asks the queue itself (ETRN, ATRN): with receive workers, the sessions of
    # its connectors run in the main process, where the queue is
    needs_queue = False

    def on_connect(self, session):
        return None

    def on_helo(self, session, helo):
        return None

    def on_mail(self, session, sender):
        return None

    def on_rcpt(self, session, recipient):
        return None

    def on_starttls(self, session):
        return None

    def on_auth(self, session, user):
        return None

    def on_data(self, session):
        return None

    def on_headers(self, session, message):
        return None

    def on_message(self, session, message):
        return None

    def on_queued(self, session, queue_id):
        return None

    def on_disconnect(self, session):
        return None

    def on_route(self, message, recipient, route):
        return None


HOOKS = ("on_connect", "on_helo", "on_starttls", "on_auth", "on_mail", "on_rcpt", "on_data", "on_headers",
         "on_message", "on_queued", "on_disconnect", "on_route")


def hooks_of(stage) -> list[str]:
    """The hooks a stage overrides (for check-config)."""
    return [h for h in HOOKS if getattr(type(stage), h, None) is not getattr(Stage, h)]


