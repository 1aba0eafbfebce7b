"""
The session as stages see it.

A small object that the receive protocol owns and keeps up to date as the
session goes on (aiosmtpd's handlers get such a session and envelope, not
the protocol): plain values, and a C{notes} dict that lives as long as the
session, for stages to leave facts for later hooks (the SPF result, an
allow list's word). Stages read it; only the protocol writes it, so no
stage can change what the session may do, and nothing here reaches into
the protocol.
"""

from __future__ import annotations

from typing import Callable

import attrs

from exedge.auth.permissions import Permissions, Right


@attrs.define(eq=False)
class Session:
    peer: str = ""                                  # the client's IP address
    connector: str = ""                             # the receive connector's name
    helo: str | None = None                         # the HELO/EHLO argument, once given
    tls: bool = False                               # TLS is up (STARTTLS, or an implicit-TLS connector)
    authenticated_as: str | None = None             # the AUTH identity's name
    sender: str | None = None                       # MAIL FROM of the transaction ("" is never here: None)
    recipients: list[str] = attrs.field(factory=list)   # RCPT TO of the transaction, accepted so far
    permissions: Permissions | None = None          # the session's rights now
    notes: dict = attrs.field(factory=dict)
    authoritative: Callable[[str], bool] = attrs.field(default=lambda domain: False, repr=False)

    def is_authoritative(self, domain: str) -> bool:
        """Is C{domain} one of ours (an Authoritative accepted domain)?"""
        return self.authoritative(domain)

    def has_right(self, right: Right) -> bool:
        """Does the session hold this right (exedge.auth.permissions.Right)?"""
        return self.permissions is not None and right in self.permissions

    @property
    def bypass_anti_spam(self) -> bool:
        return bool(self.notes.get("anti_spam_allowed")) or self.has_right(Right.BypassAntiSpam)
