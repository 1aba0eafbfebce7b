"""
The restrictions a session applies to MAIL and RCPT, as Postfix keeps
smtpd_check.c beside smtpd.c: each a function of what it needs (the
mailbox, the session's rights, the accepted domains), giving the refusal
or None, so the state machine reads as the order in which they apply.
"""

from __future__ import annotations

from exedge.auth.permissions import Principal, Right
from exedge.pressure import HIGH, MEDIUM

from .address import Mailbox
from .reply import Reply

HARD_SIZE_LIMIT = 2 * 1024**3   # Exchange's ceiling, even for BypassMessageSizeLimit


def size_limit(connector, permissions) -> int:
    """The largest message this session may send."""
    if Right.BypassMessageSizeLimit in permissions:
        return HARD_SIZE_LIMIT
    return connector.max_message_size


def relay_refusal(mailbox: Mailbox, permissions, router, note) -> Reply | None:
    """Closed by default: without the relay right only accepted domains, and no routing tricks."""
    if Right.AcceptAnyRecipient in permissions:
        return None
    trick = mailbox.routing_trick()
    if trick is None and router.accepted_domain(mailbox.domain) is not None:
        return None
    note(f"relay refused for {mailbox}" + (f" ({trick})" if trick else ""))
    return Reply(550, "5.7.54", "Unable to relay recipient in non-accepted domain", tarpit=True)


def spoofing_refusal(sender: Mailbox | None, permissions, router, authenticated: bool) -> Reply | None:
    """
    An anonymous peer may not send as one of our own domains without
    AcceptAuthoritativeDomainSender. An authenticated user sending as an
    address of ours is the normal case (Exchange leaves Send-As to the
    mailbox side; the identity is in the log).
    """
    if sender is None or sender.is_literal or authenticated:
        return None
    if router.is_authoritative(sender.domain) and Right.AcceptAuthoritativeDomainSender not in permissions:
        return Reply(550, "5.7.1", "Client does not have permissions to send as this sender", tarpit=True)
    return None


def passed_auth(value: str | None, permissions, identity) -> str | None:
    """
    RFC 4954 §5: the AUTH= of MAIL is passed on only when this session
    may vouch for it: servers we trust (the authentication flag) pass
    theirs on; for an authenticated user it is that user; from anyone
    else it is dropped (never an error: the parameter is advisory).
    """
    if value is None:
        return None
    if Right.AcceptAuthenticationFlag in permissions:
        return value
    if identity is not None:
        return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}" for c in identity.name)
    return None


def postmaster_domain(router, fqdn: str) -> str:
    """The domain of a bare RCPT TO:<postmaster>: our first Authoritative domain, else our name."""
    for domain in router.accepted_domains:
        if domain.domain_type == "Authoritative" and not domain.is_wildcard:
            return domain.domain_name
    return fqdn.lower()


def back_pressure_refusal(monitor, permissions, authenticated: bool) -> Reply | None:
    """
    Exchange's back pressure at MAIL FROM (C{monitor}: the server's
    L{exedge.pressure.ResourceMonitor}, or None). High refuses every new
    transaction; Medium refuses anonymous ones (Internet mail: no AUTH,
    and no principal but ANONYMOUS LOGON, so not an externally secured or
    partner server), which keeps internal and authenticated flow going
    longest. 452 as Postfix answers for queue_minfree: the client keeps
    the message and tries again later.
    """
    if monitor is None:
        return None
    level = monitor.level
    if level >= HIGH or level == MEDIUM and not authenticated and \
            all(p is Principal.Anonymous for p in permissions.principals):
        return Reply(452, "4.3.1", "Insufficient system resources")
    return None


def storage_refusal(monitor, size: int | None) -> Reply | None:
    """
    RFC 1870 §6.1: a SIZE= the server cannot take now, though it is under
    the fixed maximum (that is 552, checked before), gets 452: more than
    the spool's file system holds above back pressure's High threshold
    (L{exedge.pressure.ResourceMonitor.room}). Postfix's reply for the
    same check; the client tries again later rather than sending the
    whole body to be refused after the final dot.
    """
    if monitor is None or size is None:
        return None
    room = monitor.room()
    if room is not None and size > room:
        return Reply(452, "4.3.1", "Insufficient system storage")
    return None
