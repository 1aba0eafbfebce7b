"""
AUTH checked against Active Directory (or any LDAP directory) with ldap3.

ldap3's synchronous strategy runs on the auth thread pool, never on the
reactor: a slow or dead domain controller delays only the sessions that
wait for it. Each check:

  1. tries the configured servers in order (LDAPS, or StartTLS on ldap://;
     the server's certificate is validated against ca_file or the system
     trust), failing over on connection errors and timeouts;
  2. binds as the user: by the name given (a user principal name such as
     smtpgateway@fabrikam.com, as AD accepts), or in "Search" mode as the
     DN found by a service account's search (for directories that bind
     only by DN);
  3. reads the groups the user is in, nested ones included
     (LDAP_MATCHING_RULE_IN_CHAIN on AD, plain memberOf elsewhere),
     skipping referral entries, and maps them to permission groups.

A bind refused with AD's sub-codes (52e bad password, 533 disabled, 775
locked out, 532/773 password expired or must change, 701 account
expired) is a failed logon; a directory that cannot be reached or
answers something else is "try later" (454), never a refusal and never
an acceptance. Empty passwords never get here: AD takes an empty-password
simple bind as an anonymous success (the session refuses them first, and
so does this module).
"""

from __future__ import annotations

import math
import re
import ssl
import threading

from ldap3 import BASE, SIMPLE, SUBTREE, Connection, Server, Tls
from ldap3.core import exceptions as ldap_errors
from ldap3.utils.conv import escape_filter_chars
from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from zope.interface import implementer

from exedge.config.values import parse_ldap_url

from .credentials import DirectoryUnavailable, identity_for

IN_CHAIN = "1.2.840.113556.1.4.1941"   # LDAP_MATCHING_RULE_IN_CHAIN

# AD's "data XXX" in a refused bind (AcceptSecurityContext error)
AD_BIND_REASONS = {
    "525": "no such user",
    "52e": "bad user name or password",
    "530": "not permitted to log on at this time",
    "531": "not permitted to log on from this workstation",
    "532": "password expired",
    "533": "account disabled",
    "701": "account expired",
    "773": "password must be changed",
    "775": "account locked out",
}
_DATA_RE = re.compile(r"\bdata ([0-9a-f]{3}),", re.I)

# the ldap3 errors that mean "this server cannot be used now": try the next
_UNREACHABLE = (ldap_errors.LDAPSocketOpenError, ldap_errors.LDAPSocketReceiveError,
                ldap_errors.LDAPSocketSendError, ldap_errors.LDAPSessionTerminatedByServerError,
                ldap_errors.LDAPStartTLSError, ldap_errors.LDAPCommunicationError,
                ldap_errors.LDAPResponseTimeoutError)


def _first(value):
    """Without the schema (get_info=None, one round trip less) every attribute is a list."""
    return str(value[0] if isinstance(value, list) else value)


@implementer(ICredentialsChecker)
class DirectoryChecker:
    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, config, run, service_account=None):
        """
        C{config}: the [directory] section; C{run(f)}: C{f} on the auth
        thread pool, as a Deferred; C{service_account}: (user, password)
        for Search mode (L{exedge.auth.secrets}).
        """
        self.config = config
        self.run = run
        self.tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=config.ca_file or None)
        self.servers = [(url,) + parse_ldap_url(url) for url in config.servers]
        self._local = threading.local()     # per auth thread: open connections by server URL
        self.group_permissions = {k.lower(): v for k, v in config.group_permissions.items()}
        self.service_account = service_account

    def requestAvatarId(self, credentials):
        name, password = credentials.username, credentials.password
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        return self.run(lambda: self.check(name, password))

    # -- blocking: the auth thread pool ----------------------------------------

    def _pooled(self, url: str, server, secure: bool) -> Connection:
        """
        This thread's open connection to C{url}: each check binds again on
        it (LDAP allows a new bind on an open connection), so a login costs
        a bind and a search, not a TCP and TLS handshake with the DC too.
        """
        pool = self._connections()
        conn = pool.get(url)
        if conn is None or conn.closed:
            conn = pool[url] = self._connection(server, secure, None, None)
        return conn

    def _connections(self) -> dict:
        """This auth thread's open connections, by server URL."""
        if not hasattr(self._local, "connections"):
            self._local.connections = {}
        return self._local.connections

    def _discard(self, url: str) -> None:
        conn = self._connections().pop(url, None)
        if conn is not None:
            try:
                conn.unbind()
            except Exception:
                pass

    def _connection(self, server, secure: bool, user: str, password: str) -> Connection:
        conn = Connection(server, user=user, password=password, authentication=SIMPLE,
                          receive_timeout=max(1, math.ceil(self.config.timeout)),   # ldap3 packs it as an int
                          raise_exceptions=False, read_only=True)
        conn.open()
        if not secure and not conn.start_tls():
            conn.unbind()
            raise ldap_errors.LDAPStartTLSError(f"StartTLS refused: {conn.result}")
        return conn

    def check(self, name: str, password: str):
        if not name or not password:
            raise cred_error.UnauthorizedLogin("empty user name or password")
        return self._on_any_server(lambda url, server, secure: self._check_on(url, server, secure, name, password))

    def _on_any_server(self, work):
        """
        C{work(url, server, secure)} on the first server that answers, in
        the configured order; DirectoryUnavailable when none does.
        """
        problems = []
        for url, host, port, secure in self.servers:
            # a fresh Server for a new connection: ldap3 remembers an address
            # that failed as unavailable, and a directory that is back must be used
            server = Server(host, port=port, use_ssl=secure, tls=self.tls,
                            connect_timeout=self.config.timeout, get_info=None)
            for attempt in (1, 2):
                pooled = url in self._connections()
                try:
                    return work(url, server, secure)
                except _UNREACHABLE as e:
                    self._discard(url)
                    if attempt == 2 or not pooled:
                        problems.append(f"{url}: {e.__class__.__name__}: {e}")
                        break
                    # a pooled connection the DC had closed: once more on a new one
        raise DirectoryUnavailable("no directory server answered: " + "; ".join(problems))

    def _check_on(self, url: str, server, secure: bool, name: str, password: str):
        bind_name = name
        if self.config.bind_mode == "Search":
            bind_name = self._find_dn(server, secure, name)
        conn = self._pooled(url, server, secure)
        # a new bind on the open connection (not ldap3's rebind(), which
        # binds back as the previous user when this one is refused)
        conn.user, conn.password = bind_name, password
        if not conn.bind():
            if conn.result.get("result") is None or conn.closed:
                raise ldap_errors.LDAPSessionTerminatedByServerError("connection closed during bind")
            self._refused(conn.result, name)
        user_dn = self._user_dn(conn, name) if self.config.bind_mode == "Upn" else bind_name
        groups = self._groups(conn, user_dn) if user_dn else []
        permission_groups = []
        for group in groups:
            mapped = self.group_permissions.get(group.lower())
            if mapped and mapped not in permission_groups:
                permission_groups.append(mapped)
        return identity_for(name.lower(), permission_groups)

    def _refused(self, result: dict, name: str):
        code, message = result.get("result"), result.get("message") or ""
        if code == 49:   # invalidCredentials, with AD's reason in "data XXX"
            m = _DATA_RE.search(message)
            reason = AD_BIND_REASONS.get(m.group(1).lower(), "refused") if m else "bad user name or password"
            raise cred_error.UnauthorizedLogin(reason)
        if code in (34, 32):   # invalidDNSyntax / noSuchObject: not a name this directory binds with
            raise cred_error.UnauthorizedLogin(f"not a valid bind name here ({result.get('description')})")
        raise DirectoryUnavailable(f"bind for {name} answered {code} {result.get('description')}: {message}")

    def _entries(self, conn) -> list:
        # AD returns searchResRef referrals among the entries: skip them
        return [e for e in conn.response or () if e.get("type") == "searchResEntry"]

    def _user_dn(self, conn, name: str) -> str | None:
        conn.search(self.config.base_dn, f"(userPrincipalName={escape_filter_chars(name)})", SUBTREE,
                    attributes=["distinguishedName"], size_limit=2)
        found = self._entries(conn)
        return found[0]["dn"] if len(found) == 1 else None

    def _find_dn(self, server, secure: bool, name: str) -> str:
        """Search mode: the service account finds the user's DN."""
        account, password = self.service_account
        conn = self._connection(server, secure, account, password)
        try:
            if not conn.bind():
                raise DirectoryUnavailable(f"service account {account} cannot bind: {conn.result.get('description')}")
            value = escape_filter_chars(name)
            conn.search(self.config.base_dn,
                        f"(|(userPrincipalName={value})(sAMAccountName={value})(uid={value})(mail={value}))",
                        SUBTREE, attributes=["distinguishedName"], size_limit=2)
            found = self._entries(conn)
        finally:
            conn.unbind()
        if len(found) != 1:
            raise cred_error.UnauthorizedLogin("no such user" if not found else "ambiguous name")
        return found[0]["dn"]

    def _groups(self, conn, user_dn: str) -> list[str]:
        """Every group the user is in, nested ones too where the directory can say so."""
        conn.search(self.config.base_dn,
                    f"(&(objectClass=group)(member:{IN_CHAIN}:={escape_filter_chars(user_dn)}))",
                    SUBTREE, attributes=["cn"])
        names = [_first(e["attributes"].get("cn")) for e in self._entries(conn) if e["attributes"].get("cn")]
        if names or conn.result.get("result") == 0:
            return names
        # not AD (no matching rule): direct memberships from memberOf
        conn.search(user_dn, "(objectClass=*)", BASE, attributes=["memberOf"])
        groups = []
        for entry in self._entries(conn):
            for dn in entry["attributes"].get("memberOf") or ():
                first = dn.split(",", 1)[0]
                groups.append(first.split("=", 1)[1] if "=" in first else first)
        return groups


class DirectoryRecipients(DirectoryChecker):
    """
    Recipient lookup for the recipient filter (Exchange's Recipient Lookup
    against AD): is there an object whose mail or proxyAddresses is this
    address? AD compares both case-insensitively, and "smtp:" matches the
    primary "SMTP:" as well. Runs as the service account, on a thread.
    """

    def known(self, address: str) -> bool:
        """Blocking: True / False, or DirectoryUnavailable when no server answers."""
        return self._on_any_server(lambda url, server, secure: self._known_on(url, server, secure, address))

    def _known_on(self, url: str, server, secure: bool, address: str) -> bool:
        conn = self._connections().get(url)
        if conn is None or conn.closed:
            account, password = self.service_account
            conn = self._connections()[url] = self._connection(server, secure, account, password)
            if not conn.bind():
                self._discard(url)
                raise DirectoryUnavailable(f"service account {account} cannot bind: "
                                           f"{conn.result.get('description')}")
        value = escape_filter_chars(address)
        conn.search(self.config.base_dn, f"(|(mail={value})(proxyAddresses=smtp:{value}))", SUBTREE,
                    attributes=["distinguishedName"], size_limit=1)
        if conn.closed:
            raise ldap_errors.LDAPSessionTerminatedByServerError("connection closed during search")
        code = conn.result.get("result")
        if code not in (0, 4):           # success, or sizeLimitExceeded: more than one match is still known
            raise DirectoryUnavailable(f"recipient search answered {code} {conn.result.get('description')}")
        return bool(self._entries(conn))
