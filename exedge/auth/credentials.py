"""
Who may AUTH, and as what: identities, the local credentials file, and
the twisted.cred checker over it.

An L{Identity} is what a successful check proves: the user name and the
principals the user holds (every user is an Authenticated User; members
of a directory group such as "Exchange Servers" hold that principal too).
The checker returns it as the avatar id, so the directory that knows the
groups answers in one step, and the realm only wraps it.

The local file (C{[directory] credentials_file}) is for sites without a
directory and for the embedded default. One user per line,
C{name:scrypt$N$r$p$salt$hash:Group,Group}; names are compared without
case (user principal names are case-insensitive in AD). Passwords are
hashed with scrypt from hashlib (memory-hard; OpenSSL drops the GIL while
it runs) and checked on a bounded thread pool, never on the reactor. An
unknown user costs as much as a known one, so timing does not tell which
names exist. The file is read again when it changes, so
C{exedge user add} needs no restart.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import secrets
import tempfile

import attrs
from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.internet import defer
from twisted.cred.portal import IRealm, Portal
from zope.interface import Interface, implementer

from .permissions import GROUP_PRINCIPALS, Principal

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_MAXMEM = 64 * 1024 * 1024


class IIdentity(Interface):
    """The avatar of an authenticated SMTP session."""


class DirectoryUnavailable(Exception):
    """The credentials could not be checked now (directory down): 454, never 535."""


@implementer(IIdentity)
@attrs.frozen
class Identity:
    name: str
    principals: tuple[Principal, ...] = (Principal.AuthenticatedUsers,)
    groups: tuple[str, ...] = ()      # where the principals came from, for the log


def identity_for(name: str, groups) -> Identity:
    principals = [Principal.AuthenticatedUsers]
    for group in groups:
        principal = GROUP_PRINCIPALS.get(group)
        if principal is not None and principal not in principals and principal is not Principal.Anonymous:
            principals.append(principal)
    return Identity(name, tuple(principals), tuple(groups))


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=_MAXMEM, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode("ascii")   # noqa: E731
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt)}${b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r),
                             p=int(p), maxmem=_MAXMEM, dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


@functools.cache
def _dummy() -> str:
    """
    What an unknown name's password is checked against, so that it takes as
    long as a known one's. Made at the first check, not at import: one
    scrypt is ~60 ms of every start-up otherwise (issue 14: greet at once).
    """
    return hash_password("not a password", salt=b"\0" * 16)


@attrs.frozen
class UserEntry:
    name: str
    hash: str
    groups: tuple[str, ...] = ()


class CredentialsFile:
    """The file itself: read, and rewritten atomically by C{exedge user}."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> dict[str, UserEntry]:
        users: dict[str, UserEntry] = {}
        try:
            f = open(self.path, encoding="utf-8")
        except FileNotFoundError:
            return users
        with f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.split(":")
                if len(parts) != 3 or not parts[0]:
                    raise ValueError(f"{self.path}:{number}: expected name:hash:groups")
                groups = tuple(g for g in parts[2].split(",") if g)
                users[parts[0].lower()] = UserEntry(parts[0].lower(), parts[1], groups)
        return users

    def write(self, users: dict[str, UserEntry]) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, temp = tempfile.mkstemp(dir=directory, prefix=".credentials-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("# exedge users: name:scrypt hash:groups (edit with `exedge user`)\n")
                for entry in sorted(users.values(), key=lambda e: e.name):
                    f.write(f"{entry.name}:{entry.hash}:{','.join(entry.groups)}\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(temp, 0o600)
            os.replace(temp, self.path)
        except BaseException:
            if os.path.exists(temp):
                os.unlink(temp)
            raise

    def add(self, name: str, password: str, groups=None) -> None:
        """
        Add C{name}, or set its password. C{groups}: the permission groups
        it holds besides ExchangeUsers; None keeps an existing user's (a
        password change must not silently take a server's rights away).
        """
        if not name or ":" in name or any(c.isspace() for c in name):
            raise ValueError(f"invalid user name {name!r}")
        unknown = [g for g in groups or () if g not in GROUP_PRINCIPALS or g == "AnonymousUsers"]
        if unknown:
            raise ValueError(f"unknown group(s) {', '.join(unknown)} (known: ExchangeServers, "
                             "ExchangeLegacyServers, Partners; every user is in ExchangeUsers)")
        if not password:
            raise ValueError("empty password")
        users = self.read()
        if groups is None:
            existing = users.get(name.lower())
            groups = existing.groups if existing is not None else ()
        users[name.lower()] = UserEntry(name.lower(), hash_password(password), tuple(groups))
        self.write(users)

    def remove(self, name: str) -> bool:
        users = self.read()
        if users.pop(name.lower(), None) is None:
            return False
        self.write(users)
        return True


@implementer(ICredentialsChecker)
class FileChecker:
    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, path: str, run):
        """C{run(f)}: call C{f} on the auth thread pool, a Deferred of its result."""
        self.file = CredentialsFile(path)
        self.run = run
        self._users: dict[str, UserEntry] = {}
        self._stamp = None

    def _current(self) -> dict[str, UserEntry]:
        """The users, read again if the file changed (on the thread pool)."""
        try:
            st = os.stat(self.file.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            try:
                self._users = self.file.read() if stamp else {}
            except (OSError, ValueError) as e:
                raise DirectoryUnavailable(f"credentials file: {e}") from None
            self._stamp = stamp
        return self._users

    def requestAvatarId(self, credentials):
        name = credentials.username
        password = credentials.password
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")

        def check():
            entry = self._current().get(name.lower())
            ok = verify_password(password, entry.hash if entry else _dummy())
            if not (ok and entry and password):
                raise cred_error.UnauthorizedLogin("bad user name or password")
            return identity_for(entry.name, entry.groups)

        return self.run(check)


@implementer(IRealm)
class IdentityRealm:
    """The checker already knows who the user is; the realm hands it over."""

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IIdentity not in interfaces:
            raise NotImplementedError("exedge sessions ask for IIdentity")
        return IIdentity, avatarId, lambda: None


@implementer(ICredentialsChecker)
class CramMD5Checker:
    """
    CRAM-MD5 (RFC 2195) for the accounts in [directory] cram_md5_accounts:
    the client proves it knows the secret without sending it, which needs
    the secret in clear here (read from its password_file at start-up), so
    only the accounts named there may use it. fetchmail's ODMR mode logs in
    no other way. The identity is an authenticated user's.
    """

    credentialInterfaces = (IUsernameHashedPassword,)

    def __init__(self, secrets: dict):
        self.secrets = {name.lower(): password.encode("utf-8") for name, password in secrets.items()}

    def requestAvatarId(self, credentials):
        name = credentials.username
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        secret = self.secrets.get(name.lower())
        if secret is None or not credentials.checkPassword(secret):
            return defer.fail(cred_error.UnauthorizedLogin("wrong CRAM-MD5 response or no such account"))
        return defer.succeed(identity_for(name, ()))


def portal_for(*checkers) -> Portal:
    return Portal(IdentityRealm(), [c for c in checkers if c is not None])
