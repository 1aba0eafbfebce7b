"""
Built-in stages, with Exchange's Edge behaviour and replies (research
§1.8): each is an L{IStageFactory} like a drop-in plugin's.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from twisted.internet import defer, threads
from twisted.names import dns, error as dns_error
from twisted.logger import Logger
from zope.interface import implementer

from exedge.config import values as v

from .stage import ACCEPT, IStageFactory, Stage, defer_, reject

log = Logger()


class DomainSet:
    """Domains as Exchange's agents list them: "contoso.com", or "*.contoso.com" for it and its subdomains."""

    def __init__(self, domains=()):
        self.exact = {d.lower() for d in domains if not d.startswith("*.")}
        self.suffixes = tuple(d[1:].lower() for d in domains if d.startswith("*."))   # ".contoso.com"

    def __contains__(self, domain: str) -> bool:
        domain = domain.lower()
        return domain in self.exact or any(domain.endswith(w) or domain == w[1:] for w in self.suffixes)

    def __bool__(self) -> bool:
        return bool(self.exact or self.suffixes)


def _list_entry(value):
    """
    An IP list entry: "192.0.2.0/24", or { address = "...", expires = ... }
    with expires a TOML date-time or an RFC 3339 string (Exchange's
    Add-IPBlockListEntry -ExpirationTime). Gives (network, expiry or None).
    """
    if not isinstance(value, dict):
        return v.network(value), None
    unknown = set(value) - {"address", "expires", "comment"}
    if unknown or "address" not in value:
        raise ValueError(f"expected {{ address = \"...\", expires = 2026-12-31T00:00:00Z }}, got {value!r}")
    expires = value.get("expires")
    if isinstance(expires, str):
        try:
            expires = datetime.datetime.fromisoformat(expires.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"expires: not a date-time: {expires!r}") from None
    if expires is not None:
        if not isinstance(expires, datetime.datetime):
            raise ValueError(f"expires: expected a date-time such as 2026-12-31T00:00:00Z, got {expires!r}")
        if expires.tzinfo is None:
            raise ValueError(f"expires: give a time zone (Z or +hh:mm): {expires.isoformat()}")
        expires = expires.timestamp()
    return v.network(value["address"]), expires


class SenderFilter(Stage):
    """Exchange's Sender Filter agent: blocked senders, domains and *.domains."""

    name = "sender_filter"
    anti_spam = True

    def __init__(self, blocked_senders=(), blocked_domains=(), block_blank_senders=False, action="Reject"):
        self.senders = set(blocked_senders)
        self.domains = DomainSet(blocked_domains)
        self.block_blank = block_blank_senders
        self.action = action

    def _blocked(self, sender: str) -> bool:
        if not sender:
            return self.block_blank
        sender = sender.lower()
        return sender in self.senders or sender.rpartition("@")[2] in self.domains

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
        "blocked_senders": v.list_of(v.address),
        "blocked_domains": v.list_of(lambda d: v.parse_domain(d, wildcard=True)),
        "block_blank_senders": v.boolean,
        "action": v.choice("Reject", "StampStatus"),
    }
    defaults = {"blocked_senders": [], "blocked_domains": [], "block_blank_senders": False, "action": "Reject"}

    def build(self, options):
        return SenderFilter(**options)


DEFAULT_DNSBL_RESPONSE = "Recipient not authorized, your IP has been found on a block list"


def _provider(value):
    """{ zone, ip_address_match = [...] | bitmask = n, rejection_response } of a DNS list provider."""
    if not isinstance(value, dict) or "zone" not in value:
        raise ValueError(f"a provider is {{ zone = \"...\", ... }}, got {value!r}")
    unknown = set(value) - {"zone", "ip_address_match", "bitmask", "rejection_response"}
    if unknown:
        raise ValueError(f"provider {value['zone']!r}: unknown key(s) {', '.join(sorted(unknown))}")
    matches = frozenset(str(ipaddress.IPv4Address(a)) for a in value.get("ip_address_match", ()))
    bitmask = value.get("bitmask")
    if bitmask is not None and (not isinstance(bitmask, int) or not 0 < bitmask < 256):
        raise ValueError(f"provider {value['zone']!r}: bitmask is 1..255")
    return {"zone": v.parse_domain(value["zone"]), "match": matches, "bitmask": bitmask,
            "response": str(value.get("rejection_response", DEFAULT_DNSBL_RESPONSE))}


def _listed(provider, addresses) -> bool:
    """Does this answer mean "listed"? Exact 127.0.0.x codes, a bitmask of the last octet, or any 127/8."""
    for a in addresses:
        if provider["match"]:
            if a in provider["match"]:
                return True
        elif provider["bitmask"] is not None:
            if a.startswith("127.") and int(a.rsplit(".", 1)[1]) & provider["bitmask"]:
                return True
        elif a.startswith("127."):
            return True
    return False


class ConnectionFilter(Stage):
    """
    Exchange's Connection Filtering agent: IP block and allow lists, and
    DNS block and allow list providers (queried through [server].dns_servers
    when the peer connects, without holding up the banner). A blocked peer
    is refused at each RCPT (so every recipient is logged); an allowed one
    skips the remaining anti-spam stages. A provider that does not answer
    lists nobody: a DNS outage must not stop mail.
    """

    name = "connection_filter"
    anti_spam = True

    def __init__(self, ip_block_list=(), ip_allow_list=(), block_list_providers=(), allow_list_providers=(),
                 resolver=None, dns_timeout=5.0, clock=None):
        # entries are (network, expiry time or None); a bare network never expires
        self.block = tuple(e if isinstance(e, tuple) else (e, None) for e in ip_block_list)
        self.allow = tuple(e if isinstance(e, tuple) else (e, None) for e in ip_allow_list)
        self.block_providers = block_list_providers
        self.allow_providers = allow_list_providers
        self.resolver = resolver
        self.dns_timeout = dns_timeout
        self.clock = clock

    async def _query(self, provider, peer: str) -> bool:
        name = ipaddress.ip_address(peer).reverse_pointer.rsplit(".in-addr.arpa", 1)[0].rsplit(".ip6.arpa", 1)[0]
        try:
            d = self.resolver.lookupAddress(f"{name}.{provider['zone']}")
            if self.clock is not None:
                d.addTimeout(self.dns_timeout, self.clock)
            answers, _, _ = await d
        except dns_error.DomainError:
            return False                 # NXDOMAIN: not listed
        except Exception as e:
            log.warn("DNS list {zone}: no answer for {peer} ({error})", zone=provider["zone"], peer=peer,
                     error=e.__class__.__name__)
            return False
        return _listed(provider, [a.payload.dottedQuad() for a in answers if a.type == dns.A])

    async def _verdict(self, peer: str):
        """None (nothing to say), "allowed", or the rejection text of the first block list that lists the peer."""
        for provider in self.allow_providers:
            if await self._query(provider, peer):
                return "allowed"
        for provider in self.block_providers:
            if await self._query(provider, peer):
                return provider["response"].format(ip=peer, zone=provider["zone"])
        return None

    def _in(self, entries, peer: str) -> bool:
        """Is the peer in one of these (network, expiry) entries that has not expired?"""
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        now = None
        for network, expires in entries:
            if address in network:
                if expires is None:
                    return True
                if now is None:
                    now = (self.clock or _reactor()).seconds()
                if now < expires:
                    return True
        return False

    def on_connect(self, session):
        if self._in(self.allow, session.peer):
            session.notes["anti_spam_allowed"] = True
            return ACCEPT
        if (self.block_providers or self.allow_providers) and self.resolver is not None \
                and not self._in(self.block, session.peer):
            # started now, awaited at the first RCPT: the banner does not wait
            session.notes["dns_lists"] = defer.ensureDeferred(self._verdict(session.peer))
        return None

    def on_mail(self, session, sender):
        # an allow list must be known before the other anti-spam stages judge the sender
        return self._with_dns_lists(session, lambda result: ACCEPT if result == "allowed" else None)

    def on_rcpt(self, session, recipient):
        if self._in(self.block, session.peer):
            return reject(f"External client with IP address {session.peer} does not have permissions "
                          "to submit to this server", "5.7.1", 550)
        return self._with_dns_lists(session, lambda result: reject(result, "5.7.1", 550)
                                    if result and result != "allowed" else None)

    def _with_dns_lists(self, session, decide):
        """decide(the DNS lists' answer), waiting for it if the lookups started at connect are not done."""
        pending = session.notes.get("dns_lists")
        if pending is None:
            return None

        def settle(result):
            session.notes["dns_lists"] = result
            if result == "allowed":
                session.notes["anti_spam_allowed"] = True
            return decide(result)

        if not isinstance(pending, defer.Deferred):
            return settle(pending)
        if pending.called:
            return settle(pending.result)
        waiting = defer.Deferred()    # a copy to wait on: a timeout here must not cancel the lookups
        pending.addCallback(lambda result: (waiting.called or waiting.callback(result), result)[1])
        return waiting.addCallback(settle)


@implementer(IStageFactory)
class ConnectionFilterFactory:
    name = "connection_filter"
    anti_spam = True
    hooks = ("on_connect", "on_mail", "on_rcpt")
    options = {"ip_block_list": v.list_of(_list_entry), "ip_allow_list": v.list_of(_list_entry),
               "block_list_providers": v.list_of(_provider), "allow_list_providers": v.list_of(_provider),
               "dns_timeout": lambda x: float(v.parse_timespan(x))}
    defaults = {"ip_block_list": [], "ip_allow_list": [], "block_list_providers": [], "allow_list_providers": [],
                "dns_timeout": "5s"}

    def build(self, options, context=None):
        return ConnectionFilter(**options, resolver=getattr(context, "resolver", None),
                                clock=getattr(context, "clock", None))


class RecipientsFile:
    """
    The local recipients list (one address per line, # comments), read
    again when it changes; the stat and the read run on a thread, at most
    every C{interval} seconds, and the old list serves meanwhile.
    """

    def __init__(self, path: str, interval: float = 5.0, clock=None):
        self.path = path
        self.interval = interval
        self.clock = clock or _reactor()
        self.addresses: frozenset = self._read()
        self._stamp = self._stat()
        self._checked = self.clock.seconds()
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
        if self._reloading or self.clock.seconds() - self._checked < self.interval:
            return
        self._checked, self._reloading = self.clock.seconds(), True

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


class DirectoryLookup:
    """
    Recipient lookups against the directory ([directory] servers with a
    service_account), on threads, with answers kept briefly (a known
    address for C{known_ttl}, an unknown one for C{unknown_ttl}) so a
    dictionary attack costs the directory one search per address a minute.
    """

    MAX_CACHED = 50000

    def __init__(self, config, clock, known_ttl=300.0, unknown_ttl=60.0):
        from exedge.auth.directory import DirectoryRecipients
        from exedge.auth.secrets import load_secrets
        service = load_secrets(config).directory_service
        self.directory = DirectoryRecipients(config.directory, threads.deferToThread, service)
        self.clock = clock
        self.ttl = {True: known_ttl, False: unknown_ttl}
        self.cache: dict[str, tuple[bool, float]] = {}

    def known(self, address: str):
        """True/False now when cached, else a Deferred of it (DirectoryUnavailable when it cannot say)."""
        hit = self.cache.get(address)
        now = self.clock.seconds()
        if hit is not None and hit[1] > now:
            return hit[0]
        d = threads.deferToThread(self.directory.known, address)
        d.addCallback(self._keep, address)
        return d

    def _keep(self, known: bool, address: str) -> bool:
        if len(self.cache) >= self.MAX_CACHED:
            self.cache.clear()              # bounded: a harvest cannot grow it without limit
        self.cache[address] = (known, self.clock.seconds() + self.ttl[known])
        return known


class RecipientFilter(Stage):
    """
    Exchange's Recipient Filter agent: blocked recipients, and recipient
    validation for Authoritative domains against the directory or the
    local recipients file (550 5.1.1 User unknown, tarpitted like every
    refusal to an unauthenticated peer, which slows directory harvesting).
    A directory that cannot answer defers the recipient (451 4.4.3):
    accepting would mean bouncing later to a forged sender.
    """

    name = "recipient_filter"
    anti_spam = True

    def __init__(self, blocked_recipients=(), recipients_file=None, directory=None, clock=None):
        self.blocked = set(blocked_recipients)
        self.known = RecipientsFile(recipients_file, clock=clock) if recipients_file else None
        self.directory = directory

    def on_rcpt(self, session, recipient):
        address = recipient.lower()
        if address in self.blocked:
            return reject("Recipient not authorized", "5.7.1", 550)
        if (self.known is None and self.directory is None) or not session.is_authoritative(address.rpartition("@")[2]):
            return None
        if self.known is not None and address in self.known:
            return None
        if self.directory is None:
            return reject("User unknown", "5.1.1", 550)
        found = self.directory.known(address)
        if isinstance(found, defer.Deferred):
            return found.addCallbacks(self._decide, self._unavailable)
        return self._decide(found)

    @staticmethod
    def _decide(known: bool):
        return None if known else reject("User unknown", "5.1.1", 550)

    @staticmethod
    def _unavailable(failure):
        log.warn("recipient lookup failed: {error}", error=failure.getErrorMessage())
        return defer_("Recipient address lookup failed; try again later", "4.4.3", 451)


@implementer(IStageFactory)
class RecipientFilterFactory:
    name = "recipient_filter"
    anti_spam = True
    hooks = ("on_rcpt",)
    options = {"blocked_recipients": v.list_of(v.address), "recipients_file": v.readable_file,
               "recipient_lookup": v.choice("None", "Directory"),
               "lookup_cache": lambda x: float(v.parse_timespan(x))}
    defaults = {"blocked_recipients": [], "recipients_file": None, "recipient_lookup": "None", "lookup_cache": "5m"}

    def build(self, options, context=None):
        lookup = options.pop("recipient_lookup", "None")
        ttl = options.pop("lookup_cache", 300.0)
        directory = None
        if lookup == "Directory":
            config = context.config
            if not config.directory.servers or config.directory.service_account is None:
                raise ValueError('recipient_lookup = "Directory" needs [directory] servers and service_account')
            directory = DirectoryLookup(config, getattr(context, "clock", None) or _reactor(), ttl, min(ttl, 60.0))
        return RecipientFilter(**options, directory=directory, clock=getattr(context, "clock", None))


def _reactor():
    """The clock of a stage built without one (a test, a script): the reactor's, never time.time()."""
    from twisted.internet import reactor
    return reactor


BUILTIN = {f.name: f for f in (SenderFilterFactory(), ConnectionFilterFactory(), RecipientFilterFactory())}
