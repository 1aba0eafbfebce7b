"""
Built-in stages, with Exchange's Edge behaviour and replies (research
§1.8): each is an L{IStageFactory} like a drop-in plugin's.
"""

from __future__ import annotations

import ipaddress
import os
import time

from twisted.internet import threads
from twisted.logger import Logger
from zope.interface import implementer

from exedge.config import values as v

from .stage import ACCEPT, IStageFactory, Stage, reject

log = Logger()


def _list(parse):
    def parse_list(value):
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return tuple(parse(x) for x in value)
    return parse_list


def _bool(value):
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _choice(*choices):
    def parse(value):
        return v.parse_choice(value, choices)
    return parse


def _address(value):
    if not isinstance(value, str) or value.count("@") != 1:
        raise ValueError(f"expected user@domain, got {value!r}")
    return value.strip().lower()


def _network(value):
    try:
        return ipaddress.ip_network(str(value).strip(), strict=False)
    except ValueError:
        raise ValueError(f"expected an address or CIDR range, got {value!r}") from None


class SenderFilter(Stage):
    """Exchange's Sender Filter agent: blocked senders, domains and *.domains."""

    name = "sender_filter"
    anti_spam = True

    def __init__(self, blocked_senders=(), blocked_domains=(), block_blank_senders=False, action="Reject"):
        self.senders = set(blocked_senders)
        self.domains = {d for d in blocked_domains if not d.startswith("*.")}
        self.wildcards = tuple(d[1:] for d in blocked_domains if d.startswith("*."))   # ".contoso.com"
        self.block_blank = block_blank_senders
        self.action = action

    def _blocked(self, sender: str) -> bool:
        if not sender:
            return self.block_blank
        sender = sender.lower()
        domain = sender.rpartition("@")[2]
        return sender in self.senders or domain in self.domains or \
            any(domain.endswith(w) or domain == w[1:] for w in self.wildcards)

    def on_mail(self, session, sender):
        if not self._blocked(sender):
            return None
        if self.action == "StampStatus":
            session.notes["sender_filter"] = "blocked sender"   # the content stages and the log see it
            return None
        return reject("Sender denied", "5.1.0", 554)


@implementer(IStageFactory)
class SenderFilterFactory:
    name = "sender_filter"
    anti_spam = True
    hooks = ("on_mail",)
    options = {
        "blocked_senders": _list(_address),
        "blocked_domains": _list(lambda d: v.parse_domain(d, wildcard=True)),
        "block_blank_senders": _bool,
        "action": _choice("Reject", "StampStatus"),
    }

    def build(self, options):
        return SenderFilter(**options)


class ConnectionFilter(Stage):
    """
    Exchange's Connection Filtering agent, IP lists: a blocked peer is
    refused at each RCPT (so every recipient is logged), an allowed one
    skips the remaining anti-spam stages.
    """

    name = "connection_filter"
    anti_spam = True

    def __init__(self, ip_block_list=(), ip_allow_list=()):
        self.block = ip_block_list
        self.allow = ip_allow_list

    def _in(self, networks, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in n for n in networks)

    def on_connect(self, session):
        if self._in(self.allow, session.peer):
            session.notes["anti_spam_allowed"] = True
            return ACCEPT
        return None

    def on_rcpt(self, session, recipient):
        if self._in(self.block, session.peer):
            return reject(f"External client with IP address {session.peer} does not have permissions "
                          "to submit to this server", "5.7.1", 550)
        return None


@implementer(IStageFactory)
class ConnectionFilterFactory:
    name = "connection_filter"
    anti_spam = True
    hooks = ("on_connect", "on_rcpt")
    options = {"ip_block_list": _list(_network), "ip_allow_list": _list(_network)}

    def build(self, options):
        return ConnectionFilter(**options)


class RecipientsFile:
    """
    The local recipients list (one address per line, # comments), read
    again when it changes; the stat and the read run on a thread, at most
    every C{interval} seconds, and the old list serves meanwhile.
    """

    def __init__(self, path: str, interval: float = 5.0):
        self.path = path
        self.interval = interval
        self.addresses: frozenset = self._read()
        self._stamp = self._stat()
        self._checked = time.monotonic()
        self._reloading = False

    def _stat(self):
        try:
            st = os.stat(self.path)
            return (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            return None

    def _read(self) -> frozenset:
        with open(self.path, encoding="utf-8") as f:
            return frozenset(line.strip().lower() for line in f if line.strip() and not line.startswith("#"))

    def refresh(self) -> None:
        if self._reloading or time.monotonic() - self._checked < self.interval:
            return
        self._checked, self._reloading = time.monotonic(), True

        def reload():
            stamp = self._stat()
            return (stamp, self._read()) if stamp is not None and stamp != self._stamp else None

        def done(result):
            self._reloading = False
            if result is not None:
                self._stamp, self.addresses = result

        def failed(f):
            self._reloading = False
            log.failure("reading recipients file {path}", f, path=self.path)

        threads.deferToThread(reload).addCallbacks(done, failed)

    def __contains__(self, address: str) -> bool:
        self.refresh()
        return address.lower() in self.addresses


class RecipientFilter(Stage):
    """
    Exchange's Recipient Filter agent: blocked recipients, and recipient
    validation for Authoritative domains against the local recipients file
    (550 5.1.1 User unknown, tarpitted like every refusal to an
    unauthenticated peer, which slows directory harvesting).
    """

    name = "recipient_filter"
    anti_spam = True

    def __init__(self, blocked_recipients=(), recipients_file=None):
        self.blocked = set(blocked_recipients)
        self.known = RecipientsFile(recipients_file) if recipients_file else None

    def on_rcpt(self, session, recipient):
        address = recipient.lower()
        if address in self.blocked:
            return reject("Recipient not authorized", "5.7.1", 550)
        if self.known is not None and session.is_authoritative(address.rpartition("@")[2]) \
                and address not in self.known:
            return reject("User unknown", "5.1.1", 550)
        return None


def _readable_file(value):
    path = str(value)
    try:
        with open(path, encoding="utf-8"):
            pass
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    return path


@implementer(IStageFactory)
class RecipientFilterFactory:
    name = "recipient_filter"
    anti_spam = True
    hooks = ("on_rcpt",)
    options = {"blocked_recipients": _list(_address), "recipients_file": _readable_file}

    def build(self, options):
        return RecipientFilter(**options)


BUILTIN = {f.name: f for f in (SenderFilterFactory(), ConnectionFilterFactory(), RecipientFilterFactory())}
