"""
Where mail for a domain goes: MX hosts by preference, through the
configured DNS servers only.

Written here because C{twisted.mail.relaymanager.MXCalculator} returns one
host, has no null MX, falls back with an ANY query and resolves MX hosts
through the system resolver instead of the configured one (research §3).
Rules (RFC 5321 §5.1, RFC 7505):

  - MX records in order of preference, equal preferences shuffled;
  - every MX host resolved through the same resolver, A and AAAA;
  - no MX records: the domain's own A/AAAA (the implicit MX);
  - a null MX ("MX 0 .") means the domain takes no mail: 5.1.10;
  - a domain that does not exist: 5.4.4;
  - a host that is this server, or a loopback or unspecified address not
    configured as a smart host, is dropped with every less preferred host
    (RFC 5321 §5.1); if it was the best, 5.4.6 routing loop: never a
    delivery to ourselves;
  - DNS timeouts and server failures are transient: the queue retries.
"""

from __future__ import annotations

import ipaddress
import random

from twisted.internet import defer
from twisted.names import dns, error as dns_error


class RoutingFailure(Exception):
    """A permanent answer about a domain: its recipients fail with C{status}."""

    def __init__(self, status: str, text: str):
        super().__init__(f"{status} {text}")
        self.status = status
        self.text = text


class TransientDNSFailure(Exception):
    """The DNS could not answer now (timeout, SERVFAIL): try again later."""


class DNSCache:
    """
    The answers of C{resolver} (A, AAAA, MX) kept for their TTL: mail to a
    thousand domains whose MX hosts are a few names asks the DNS once per
    name and TTL instead of three times per delivery attempt (MX, then A
    and AAAA of each MX host).

    Written here because C{twisted.names.cache.CacheResolver} is filled
    only by a DNS server (C{DNSServerFactory} calls its C{cacheResult};
    the one C{client.createResolver} puts in its chain is never filled),
    arms a timer per entry, and bounds neither the entries nor the TTL a
    hostile name server may give. Here entries expire when read (the
    injected clock), a TTL counts for at most C{max_ttl} seconds, and past
    C{max_entries} the oldest entry goes. Kept: an answer with records
    (their least TTL); a name with no record of the type, NODATA, and a
    name that does not exist, NXDOMAIN, for the negative TTL of the SOA
    that came with the answer (RFC 2308 §5; without an SOA, not kept), so
    a run of mail to a domain that does not exist asks once per TTL.
    Failures (SERVFAIL, timeouts) are never kept: the next attempt asks
    again.
    """

    max_entries = 10_000
    max_ttl = 3600

    def __init__(self, resolver, clock):
        self.resolver = resolver
        self.clock = clock
        self._answers: dict[tuple[str, int], tuple[float, tuple]] = {}

    def lookupMailExchange(self, name: str, timeout=None) -> defer.Deferred:
        return self._lookup(name, dns.MX, self.resolver.lookupMailExchange)

    def lookupAddress(self, name: str, timeout=None) -> defer.Deferred:
        return self._lookup(name, dns.A, self.resolver.lookupAddress)

    def lookupIPV6Address(self, name: str, timeout=None) -> defer.Deferred:
        return self._lookup(name, dns.AAAA, self.resolver.lookupIPV6Address)

    def _lookup(self, name: str, kind: int, lookup) -> defer.Deferred:
        key = (name.lower().rstrip("."), kind)
        kept = self._answers.get(key)
        if kept is not None:
            if kept[0] > self.clock.seconds():
                if isinstance(kept[1], dns.Message):
                    return defer.fail(dns_error.DNSNameError(kept[1]))     # NXDOMAIN, as the resolver says it
                return defer.succeed(kept[1])
            del self._answers[key]
        return lookup(name).addCallbacks(self._keep, self._keep_nxdomain, callbackArgs=(key,), errbackArgs=(key,))

    def _keep(self, result, key):
        self._store(key, self._ttl(result[0], result[1]), result)
        return result

    def _keep_nxdomain(self, failure, key):
        """An NXDOMAIN (its answer is the exception's argument) is kept for its SOA's negative TTL."""
        if failure.check(dns_error.DNSNameError):
            message = failure.value.args[0] if failure.value.args else None
            if isinstance(message, dns.Message):
                self._store(key, self._ttl((), message.authority), message)
        return failure

    def _store(self, key, ttl: float, value) -> None:
        if ttl > 0:
            while len(self._answers) >= self.max_entries:
                del self._answers[next(iter(self._answers))]     # the oldest (dicts keep their order)
            self._answers[key] = (self.clock.seconds() + ttl, value)

    def _ttl(self, answers, authority) -> float:
        if answers:
            return min(min(r.ttl for r in answers), self.max_ttl)
        soas = [r for r in authority if r.type == dns.SOA]
        if soas:
            return min(min(min(r.ttl, r.payload.minimum) for r in soas), self.max_ttl)
        return 0


def _is_nxdomain(failure_or_exc) -> bool:
    return isinstance(failure_or_exc, (dns_error.DNSNameError, dns_error.AuthoritativeDomainError))


class MXResolver:
    def __init__(self, resolver, *, own_names=(), own_addresses=(), allowed_addresses=(), rng=random):
        self.resolver = resolver
        self.own_names = {n.lower().rstrip(".") for n in own_names}
        self.own_addresses = {ipaddress.ip_address(a) for a in own_addresses}
        self.allowed = {ipaddress.ip_address(a) for a in allowed_addresses}
        self.rng = rng

    async def _answers(self, lookup, name: str) -> list:
        try:
            answers, _, _ = await lookup(name)
        except (dns_error.DNSNameError, dns_error.AuthoritativeDomainError):
            raise
        except (dns_error.DNSServerError, dns_error.DNSQueryRefusedError, dns_error.DNSUnknownError,
                dns_error.DNSFormatError, dns_error.DNSNotImplementedError, defer.TimeoutError) as e:
            raise TransientDNSFailure(f"DNS lookup of {name} failed: {e.__class__.__name__}") from None
        return answers

    async def _addresses(self, host: str) -> list[str]:
        found = []
        for lookup, kind in ((self.resolver.lookupAddress, dns.A), (self.resolver.lookupIPV6Address, dns.AAAA)):
            try:
                answers = await self._answers(lookup, host)
            except (dns_error.DNSNameError, dns_error.AuthoritativeDomainError):
                continue
            found += [a.payload.dottedQuad() if kind == dns.A else
                      str(ipaddress.IPv6Address(a.payload.address))
                      for a in answers if a.type == kind]
        return found

    def _check(self, host: str, address: str | None = None) -> None:
        if host.lower().rstrip(".") in self.own_names:
            raise RoutingFailure("5.4.6", f"routing loop: {host} is this server")
        if address is None:
            return
        ip = ipaddress.ip_address(address)
        if ip in self.own_addresses or ((ip.is_loopback or ip.is_unspecified) and ip not in self.allowed):
            raise RoutingFailure("5.4.6", f"routing loop: {host} ({address}) is this server")

    def addresses(self, host: str) -> defer.Deferred:
        """
        Fires with the A and AAAA addresses of C{host} (a smart host named
        in the configuration), through the same resolver as MX lookups;
        fails with L{TransientDNSFailure}.
        """
        return defer.ensureDeferred(self._addresses(host))

    def targets(self, domain: str) -> defer.Deferred:
        """Fires with [(host, address)] in delivery order, or fails with
        L{RoutingFailure} / L{TransientDNSFailure}."""
        return defer.ensureDeferred(self._targets(domain))

    async def _targets(self, domain: str) -> list[tuple[str, str]]:
        try:
            answers = await self._answers(self.resolver.lookupMailExchange, domain)
        except (dns_error.DNSNameError, dns_error.AuthoritativeDomainError):
            raise RoutingFailure("5.4.4", f"{domain} does not exist (DNS NXDOMAIN)") from None
        mxs = [(a.payload.preference, str(a.payload.name)) for a in answers if a.type == dns.MX]
        if any(name in ("", ".") for _, name in mxs):
            if len(mxs) == 1:
                raise RoutingFailure("5.1.10", f"{domain} accepts no mail (null MX, RFC 7505)")
            mxs = [(p, n) for p, n in mxs if n not in ("", ".")]
        if not mxs:
            mxs = [(0, domain)]    # the implicit MX: the domain's own addresses
        by_preference: dict[int, list[str]] = {}
        for preference, name in mxs:
            by_preference.setdefault(preference, []).append(name)
        targets = []
        for preference in sorted(by_preference):
            # RFC 5321 §5.1: if we are in this group, this group and every
            # less preferred one are dropped; decided before any shuffle
            group = []
            try:
                for host in by_preference[preference]:
                    self._check(host)
                    try:
                        addresses = await self._addresses(host)
                    except TransientDNSFailure:
                        if targets or group:
                            continue    # others can take the mail; skip this host
                        raise
                    for address in addresses:
                        self._check(host, address)
                    group.append((host, addresses))
            except RoutingFailure:
                if targets:
                    break
                raise
            self.rng.shuffle(group)
            targets += [(host, address) for host, addresses in group for address in addresses]
        if not targets:
            raise TransientDNSFailure(f"no address for any mail exchanger of {domain}")
        return targets
