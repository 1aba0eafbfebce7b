"""
Exchange's Sender ID agent, done as SPF (RFC 7208): is the connecting
host allowed to send for the domain of MAIL FROM (or, for the null
sender, of the HELO name: RFC 7208 §2.3, §2.4)?

The check runs at MAIL FROM with the maintained library pyspf
(C{import spf}) over dnspython, on a small thread pool of the stage's own
(pyspf blocks; the event loop must not). Its result (pass, neutral,
softfail, fail, none, temperror, permerror) goes into C{session.notes}
("spf", "spf_reason"); a fail may be refused there (550 5.7.23, RFC 7372)
and a temperror deferred (451 4.7.24). At the final dot the message is
stamped with Received-SPF (RFC 7208 §9.1) and Authentication-Results
(RFC 8601), or silently dropped for fail_action = "Delete" (the client
still gets 250, as with Exchange's Delete action). Authenticated sessions
are not checked: like Exchange's agent, only external mail is.

Exchange's bypass lists: a sender in C{bypassed_sender_domains} is not
checked at all. Messages to C{bypassed_recipients} are not stamped or
deleted, and since recipients are not known at MAIL FROM, a refusal waits
for RCPT TO when that list is set: each recipient outside it gets the
550 5.7.23 (RFC 7208 §2.4 allows the refusal at either command), so mail
to postmaster still arrives from a domain whose SPF record is broken. A
message with both kinds of recipient is stamped rather than deleted.

Which DNS servers pyspf asks. pyspf resolves every name through
C{query.dns}, which calls the module-level function C{spf.DNSLookup(name,
qtype, strict, timeout)}; its dnspython driver asks dnspython's
process-wide default resolver, and nothing in pyspf takes a resolver per
query. Assigning our own function to C{spf.DNSLookup} would send every
other user of pyspf in the process to our servers, and copying
C{query.dns} (its cache, CNAME chains, void-lookup and time limits) would
fork the library's logic. So L{ResolverQuery}, a C{spf.query} subclass,
carries its own lookup function and overrides C{dns} to make it the
lookup of the current thread while the library's own C{dns} runs;
C{spf.DNSLookup} is replaced once, at import, by a dispatcher that uses the
thread's lookup when there is one and pyspf's original otherwise. Each
check runs start to end on one thread, so concurrent checks never see each
other's resolver, and plain C{spf.query} objects behave as before.

The resolver is a C{dns.resolver.Resolver(configure=False)} holding only
C{[server] dns_servers} (with their ports) when that is set, else the
system's configuration, as the rest of exedge does.
"""

from __future__ import annotations

import ipaddress
import socket
import threading

import attrs
import dns.exception
import dns.nameserver
import dns.resolver
import spf
from twisted.logger import Logger

from exedge.config import values as v

from .builtin import DomainSet
from .offload import StageThreads
from .stage import Stage, defer_, reject

log = Logger()

RESULTS = ("pass", "neutral", "softfail", "fail", "none", "temperror", "permerror")

# -- pyspf's DNS, per query --------------------------------------------------

_current = threading.local()
_library_lookup = spf.DNSLookup


def _dispatch(name, qtype, strict=True, timeout=20):
    """spf.DNSLookup: the running L{ResolverQuery}'s lookup on this thread, else pyspf's own."""
    lookup = getattr(_current, "lookup", None) or _library_lookup
    return lookup(name, qtype, strict, timeout)


_dispatch.exedge_dispatch = True
if not getattr(spf.DNSLookup, "exedge_dispatch", False):
    spf.DNSLookup = _dispatch


class ResolverQuery(spf.query):
    """An C{spf.query} whose DNS lookups go through C{lookup} (a C{spf.DNSLookup}-like function)."""

    def __init__(self, lookup, *args, **kwargs):
        self.lookup = lookup
        super().__init__(*args, **kwargs)

    def dns(self, name, qtype, cnames=None, ignore_void=False):
        previous = getattr(_current, "lookup", None)
        _current.lookup = self.lookup
        try:
            return super().dns(name, qtype, cnames=cnames, ignore_void=ignore_void)
        finally:
            _current.lookup = previous


def _rdata(qtype: str, rdata):
    """One answer in the shape pyspf's own dnspython driver gives (spf.DNSLookup_dnspython)."""
    if qtype in ("A", "AAAA"):
        return rdata.address
    if qtype == "MX":
        return (rdata.preference, rdata.exchange)
    if qtype == "PTR":
        return rdata.target.to_text(True)
    if qtype in ("TXT", "SPF"):
        return rdata.strings
    return rdata.to_text()


def resolver_lookup(resolver: dns.resolver.Resolver):
    """A C{spf.DNSLookup}-like function asking C{resolver} only; no answer is a TempError."""

    def lookup(name, qtype, strict=True, timeout=20):
        try:
            answer = resolver.resolve(name, qtype, search=False, lifetime=max(float(timeout), 0.1))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.DNSException, OSError) as e:
            raise spf.TempError(f"DNS {e.__class__.__name__}: {e}") from None
        return [((name, qtype), _rdata(qtype, r)) for r in answer]

    return lookup


def make_resolver(servers) -> dns.resolver.Resolver:
    """Only C{servers} ((host, port) pairs) when given, else the system's configuration."""
    if servers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in servers]
    else:
        try:
            resolver = dns.resolver.Resolver()
        except dns.exception.DNSException as e:      # no resolv.conf: every check is a temperror
            log.warn("sender_id: no system DNS configuration ({error})", error=e)
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = []
    resolver.cache = dns.resolver.LRUCache(4096)     # honours TTLs; thread-safe
    return resolver


# -- the check -----------------------------------------------------------------

@attrs.frozen
class SPFResult:
    result: str           # one of RESULTS
    identity: str         # "mailfrom" | "helo"
    domain: str           # the domain checked
    sender: str           # MAIL FROM as the session gave it ("" for the null sender)
    reason: str           # the Received-SPF comment
    header: str           # the Received-SPF field value


def _printable(text: str) -> str:
    """A header field value: DNS-supplied text may hold anything."""
    return "".join(c if " " <= c <= "~" else " " for c in text)


def check(lookup, ip: str, sender: str, helo: str, receiver: str, timeout: float) -> SPFResult:
    """check_host() for MAIL FROM C{sender} (or the HELO identity for ""), blocking: run it on a thread."""
    q = ResolverQuery(lookup, i=ip, s=sender, h=helo, receiver=receiver, timeout=timeout, querytime=timeout)
    identity, domain = q.ident, q.o
    if not v.is_domain(domain.rstrip(".")):
        # RFC 7208 §4.3 (malformed domain) and §2.3 (a HELO address literal): no check, "none"
        result, q.mech, q.mechanism = "none", [], None
    else:
        try:
            result = q.check()[0]
        except Exception:
            log.failure("sender_id: SPF check of {domain} from {ip}", domain=domain, ip=ip)
            result = "temperror"
        if result not in RESULTS:           # "ambiguous" exists only in pyspf's harsh mode
            result = "permerror"
    reason = _printable(q.get_header_comment(result))
    header = _printable(q.get_header(result, receiver))
    return SPFResult(result, identity, domain.lower(), sender, reason, header)


class SenderId(Stage):
    """
    Exchange's Sender ID agent as SPF: checked at MAIL FROM, acted on there
    (Reject) or at the final dot (StampStatus, Delete).
    """

    name = "sender_id"
    anti_spam = True

    def __init__(self, fail_action="StampStatus", temp_error_action="StampStatus", dns_timeout=20.0, threads=4,
                 bypassed_recipients=(), bypassed_sender_domains=(),
                 dns_servers=(), fqdn=None, lookup=None, run=None):
        self.fail_action = fail_action
        self.temp_error_action = temp_error_action
        self.bypassed_recipients = frozenset(a.lower() for a in bypassed_recipients)
        self.bypassed_senders = DomainSet(bypassed_sender_domains)
        self.dns_timeout = dns_timeout
        self.fqdn = fqdn or socket.getfqdn()
        self._servers = tuple(dns_servers)
        self._lookup = lookup              # tests give one; else made from the resolver on first use
        # tests give one; else the stage's thread pool (the system resolver blocks)
        self._run = run if run is not None else StageThreads("exedge-sender-id", threads)
        self._lock = threading.Lock()

    def _dns(self):
        with self._lock:                   # on a pool thread: the system resolver reads resolv.conf
            if self._lookup is None:
                self._lookup = resolver_lookup(make_resolver(self._servers))
            return self._lookup

    def _in_thread(self, f, *args):
        return self._run(f, *args)

    def _checked(self, ip, sender, helo):
        return check(self._dns(), ip, sender, helo, self.fqdn, self.dns_timeout)

    def on_mail(self, session, sender):
        for note in ("spf", "spf_reason", "spf_check", "spf_refusal"):
            session.notes.pop(note, None)
        if session.authenticated_as is not None:
            return None
        if sender and sender.rpartition("@")[2] in self.bypassed_senders:
            return None           # Exchange's BypassedSenderDomains: not checked, not stamped
        try:
            ip = str(ipaddress.ip_address(session.peer))
        except ValueError:
            return None
        if not sender and not session.helo:
            return None
        d = self._in_thread(self._checked, ip, sender, session.helo or "")
        return d.addCallback(self._judge, session, ip)

    def _judge(self, found: SPFResult, session, ip):
        session.notes["spf"] = found.result
        session.notes["spf_reason"] = found.reason
        session.notes["spf_check"] = found
        refusal = None
        if found.result == "fail" and self.fail_action == "Reject":
            refusal = reject(f"SPF validation failed: {found.domain} does not designate {ip} as a permitted sender",
                             "5.7.23", 550)
        elif found.result == "temperror" and self.temp_error_action == "Reject":
            refusal = defer_(f"SPF validation error: temporary DNS error checking {found.domain}", "4.7.24", 451)
        if refusal is not None and self.bypassed_recipients:
            # some recipients take this sender anyway: refuse the others one by one at RCPT
            session.notes["spf_refusal"] = refusal
            return None
        return refusal

    def on_rcpt(self, session, recipient):
        refusal = session.notes.get("spf_refusal")
        if refusal is None or recipient.lower() in self.bypassed_recipients:
            return None
        return refusal

    def on_message(self, session, message):
        found = session.notes.get("spf_check")
        if found is None or session.authenticated_as is not None or found.sender != message.sender:
            return None
        bypassed = [r for r in message.recipients if r.lower() in self.bypassed_recipients]
        if bypassed and len(bypassed) == len(message.recipients):
            return None           # Exchange's BypassedRecipients: not stamped, not deleted
        if found.result == "fail" and self.fail_action == "Delete" and not bypassed:
            message.delete(f"SPF fail: {found.domain} does not designate {session.peer} as a permitted sender")
            return None
        # RFC 8601 §5: results that claim to be ours did not come from us (all incoming ones go then:
        # Message.remove_header removes by name)
        if any(_authserv_id(value) == self.fqdn.lower()
               for value in message.headers.get_all("Authentication-Results") or ()):
            message.remove_header("Authentication-Results")
        message.add_header("Authentication-Results", f"{self.fqdn}; spf={found.result} "
                           f"smtp.{found.identity}={_pvalue(found.domain)}")
        message.add_header("Received-SPF", found.header)
        message.annotate("spf", found.result)
        return None


def _pvalue(domain: str) -> str:
    """An RFC 8601 property value: the domain, or a quoted string for what is not one (an address literal)."""
    if v.is_domain(domain.rstrip(".")):
        return domain
    return '"' + domain.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _authserv_id(value: str) -> str:
    return str(value).split(";", 1)[0].strip().split()[0].lower() if str(value).strip() else ""
