"""
Permission groups become rights, exactly as Exchange maps them.

Exchange grants extended rights to security principals; a receive
connector's PermissionGroups say which principals it admits. A session
holds the principals that its connector admits *and* that the peer is:
anonymous peers are ANONYMOUS LOGON, peers inside an ExternalAuthoritative
connector's ranges are Externally Secured Servers, authenticated users
(later) are Authenticated Users, and so on. The session's rights are the
union of those principals' rights, computed once per session.
"""

from __future__ import annotations

import enum
import functools
from typing import Iterable

import attrs


class Right(enum.Flag):
    """Exchange's extended rights, under the names admins see in Get-ADPermission."""

    NONE = 0
    Submit = enum.auto()                         # ms-Exch-SMTP-Submit
    AcceptAnyRecipient = enum.auto()             # ms-Exch-SMTP-Accept-Any-Recipient (relay)
    AcceptAnySender = enum.auto()                # ms-Exch-SMTP-Accept-Any-Sender
    AcceptAuthoritativeDomainSender = enum.auto()  # ms-Exch-SMTP-Accept-Authoritative-Domain-Sender
    AcceptAuthenticationFlag = enum.auto()       # ms-Exch-SMTP-Accept-Authentication-Flag
    BypassAntiSpam = enum.auto()                 # ms-Exch-Bypass-Anti-Spam
    BypassMessageSizeLimit = enum.auto()         # ms-Exch-Bypass-Message-Size-Limit
    AcceptExch50 = enum.auto()                   # ms-Exch-SMTP-Accept-Exch50
    AcceptRoutingHeaders = enum.auto()           # ms-Exch-Accept-Headers-Routing
    AcceptOrganizationHeaders = enum.auto()      # ms-Exch-Accept-Headers-Organization
    AcceptForestHeaders = enum.auto()            # ms-Exch-Accept-Headers-Forest

    def names(self) -> list[str]:
        return [r.name for r in Right if r and r in self and r.name]


R = Right
_SERVER = (R.Submit | R.AcceptAnyRecipient | R.AcceptAnySender | R.AcceptAuthoritativeDomainSender
           | R.AcceptAuthenticationFlag | R.BypassAntiSpam | R.BypassMessageSizeLimit
           | R.AcceptExch50 | R.AcceptRoutingHeaders)


class Principal(enum.Enum):
    """The security principals behind the permission groups."""

    Anonymous = "NT AUTHORITY\\ANONYMOUS LOGON"
    AuthenticatedUsers = "NT AUTHORITY\\Authenticated Users"
    ExchangeServers = "Exchange Servers"
    ExternallySecuredServers = "MS Exchange\\Externally Secured Servers"
    ExchangeLegacyInterop = "ExchangeLegacyInterop"
    PartnerServers = "MS Exchange\\Partner Servers"


# The research table (§1.4), row by row.
RIGHTS: dict[Principal, Right] = {
    Principal.Anonymous: R.Submit | R.AcceptAnySender | R.AcceptAuthoritativeDomainSender | R.AcceptRoutingHeaders,
    Principal.AuthenticatedUsers: R.Submit | R.AcceptAnyRecipient | R.BypassAntiSpam | R.AcceptRoutingHeaders,
    Principal.ExchangeServers: _SERVER | R.AcceptOrganizationHeaders | R.AcceptForestHeaders,
    Principal.ExternallySecuredServers: _SERVER,
    Principal.ExchangeLegacyInterop: _SERVER,
    Principal.PartnerServers: R.Submit | R.AcceptRoutingHeaders,
}

# Which group admits which principal.
GROUP_PRINCIPALS: dict[str, Principal] = {
    "AnonymousUsers": Principal.Anonymous,
    "ExchangeUsers": Principal.AuthenticatedUsers,
    "ExchangeServers": Principal.ExchangeServers,
    "ExchangeLegacyServers": Principal.ExchangeLegacyInterop,
    "Partners": Principal.PartnerServers,
}


@attrs.frozen
class Permissions:
    """A session's rights and the principals they came from (for the log)."""

    rights: Right
    principals: tuple[Principal, ...]

    def __contains__(self, right: Right) -> bool:
        return right in self.rights

    def explain(self) -> str:
        return _explain(self)


@functools.lru_cache(maxsize=256)
def _explain(permissions: Permissions) -> str:
    # once per kind of session, not once per connection: it is in every connect line
    who = ", ".join(p.value for p in permissions.principals) or "no principal"
    return f"{who} -> {', '.join(permissions.rights.names()) or 'no rights'}"


def session_permissions(
    permission_groups: Iterable[str],
    auth_mechanisms: Iterable[str],
    *,
    authenticated_as: Iterable[Principal] = (),
) -> Permissions:
    """The rights of a session (see L{_permissions}); computed once per kind of session."""
    return _permissions(tuple(permission_groups), tuple(auth_mechanisms), tuple(authenticated_as))


@functools.lru_cache(maxsize=256)
def _permissions(permission_groups: tuple, auth_mechanisms: tuple, authenticated_as: tuple) -> Permissions:
    """
    The rights of a session on a connector with these groups and
    mechanisms. C{authenticated_as} names principals proven by AUTH or TLS;
    without them the peer is anonymous.
    """
    groups = set(permission_groups)
    mechanisms = set(auth_mechanisms)
    held: list[Principal] = []
    proven = set(authenticated_as)
    if "ExternalAuthoritative" in mechanisms and "ExchangeServers" in groups:
        held.append(Principal.ExternallySecuredServers)
    for group in sorted(groups):
        principal = GROUP_PRINCIPALS.get(group)
        if principal is None:
            continue
        if principal is Principal.Anonymous and not proven:
            held.append(principal)
        elif principal in proven:
            held.append(principal)
    rights = Right.NONE
    for principal in held:
        rights |= RIGHTS[principal]
    return Permissions(rights, tuple(held))
