"""
The AUTH dialogue (RFC 4954) for PLAIN and LOGIN, and CRAM-MD5 (RFC 2195)
where the portal can check it, against a twisted.cred portal.

Its own module, as Postfix keeps smtpd_sasl_proto.c beside smtpd.c: the
session decides whether AUTH may start (offered, after EHLO, not during a
transaction) and what an authenticated identity may do; this dialogue
reads the client's base64 responses, asks the portal, and counts the
failures that Exchange's receive connectors limit (max_logon_failures,
auth_tarpit_interval). A password never reaches a log.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time

from twisted.cred import error as cred_error
from twisted.cred.credentials import (
    CramMD5Credentials, IUsernameHashedPassword, IUsernamePassword, UsernamePassword,
)
from twisted.internet import task
from twisted.logger import Logger

from exedge.auth.credentials import DirectoryUnavailable, IIdentity

from .reply import Reply, syntax_error

log = Logger()

USERNAME_PROMPT = "VXNlcm5hbWU6"        # base64 "Username:"
PASSWORD_PROMPT = "UGFzc3dvcmQ6"        # base64 "Password:"


def decode(text: str):
    """The client's base64 response, or the Reply that ends the dialogue."""
    if text == "*":
        return Reply(501, "5.0.0", "Authentication cancelled")
    if text == "=":
        return b""                                       # RFC 4954: an empty initial response
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return syntax_error("Cannot decode the authentication response (not base64)", "5.5.2")


class AuthDialogue:
    """
    One session's AUTH exchanges. C{authenticated(identity)} is the
    session's: it takes the identity and gives the reply (at once or as a
    Deferred). C{note(text)} is the session's protocol log.
    """

    def __init__(self, portal, clock, *, max_failures: int, tarpit: float, note, session_id: str,
                 authenticated, host: str = "localhost", outcome=None):
        self.portal = portal
        self.outcome = outcome or (lambda kind: None)     # "success", "failure", "unavailable": for the metrics
        self.host = host
        self.clock = clock
        self.max_failures = max_failures
        self.tarpit = tarpit
        self.note = note
        self.session_id = session_id
        self.authenticated = authenticated
        self.failures = 0
        self._step = None              # what the client's next line answers

    @property
    def expecting(self) -> bool:
        """Is the client's next line a response of this dialogue (not a command)?"""
        return self._step is not None

    def begin(self, mechanism: str, initial: str):
        """AUTH C{mechanism} [C{initial}]: the reply, at once or as a Deferred."""
        if mechanism not in mechanisms(self.portal):
            return Reply(504, "5.5.4", "Unrecognized authentication type", protocol_error=True, tarpit=True)
        if mechanism == "PLAIN":
            if initial:
                return self._plain(initial)
            self._step = self._plain
            return Reply(334, None, "")
        if mechanism == "LOGIN":
            if initial:
                return self._login_user(initial)
            self._step = self._login_user
            return Reply(334, None, USERNAME_PROMPT)
        if mechanism == "CRAM-MD5":
            if initial:
                return syntax_error("CRAM-MD5 takes no initial response", "5.5.2")
            credentials = CramMD5Credentials(self.host)
            # an unpredictable challenge (Twisted's own draws from random())
            credentials.challenge = f"<{secrets.token_hex(8)}.{int(time.time())}@{self.host}>".encode("ascii")
            self._step = lambda text: self._cram_md5(credentials, text)
            return Reply(334, None, base64.b64encode(credentials.challenge).decode("ascii"))
        return Reply(504, "5.5.4", "Unrecognized authentication type", protocol_error=True, tarpit=True)

    def respond(self, text: str):
        """The client's next line in the dialogue."""
        step, self._step = self._step, None
        return step(text)

    def _plain(self, text: str):
        data = decode(text)
        if isinstance(data, Reply):
            return data
        parts = data.split(b"\0")
        if len(parts) != 3:
            return syntax_error("Malformed PLAIN response (authzid NUL authcid NUL password)", "5.5.2")
        authzid, user, password = parts
        if authzid and authzid != user:
            return self._failed()                       # no acting for another user
        return self._check(user, password)

    def _login_user(self, text: str):
        user = decode(text)
        if isinstance(user, Reply):
            return user
        self._step = lambda text: self._login_password(user, text)
        return Reply(334, None, PASSWORD_PROMPT)

    def _login_password(self, user: bytes, text: str):
        password = decode(text)
        if isinstance(password, Reply):
            return password
        return self._check(user, password)

    def _cram_md5(self, credentials, text: str):
        data = decode(text)
        if isinstance(data, Reply):
            return data
        parts = data.split(b" ")
        if len(parts) != 2 or not parts[0] or len(parts[1]) != 32:
            return syntax_error("Malformed CRAM-MD5 response (user SP hex digest)", "5.5.2")
        credentials.setResponse(data)
        try:
            user = parts[0].decode("utf-8")
        except UnicodeDecodeError:
            return self._failed()
        d = self.portal.login(credentials, None, IIdentity)
        d.addCallbacks(self._succeeded, self._error, errbackArgs=(user,))
        return d

    def _check(self, user: bytes, password: bytes):
        try:
            user_text, password_text = user.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            return self._failed()
        if not user_text or not password_text:
            # an empty password is an anonymous bind that AD answers with
            # success: never let it reach the directory
            return self._failed()
        d = self.portal.login(UsernamePassword(user_text, password_text), None, IIdentity)
        d.addCallbacks(self._succeeded, self._error, errbackArgs=(user_text,))
        return d

    def _succeeded(self, result):
        _, identity, _ = result
        self.failures = 0
        self.outcome("success")
        return self.authenticated(identity)

    def _error(self, failure, user: str):
        if failure.check(cred_error.UnauthorizedLogin):
            # checkers give the reason alone (IUsernamePassword checkers know the name we log)
            self.note(f"authentication failed for {user}: {failure.getErrorMessage()}")
            return self._failed()
        if not failure.check(DirectoryUnavailable):
            log.failure("session {session}: checking credentials", failure, session=self.session_id)
        self.note(f"authentication for {user} could not be checked: {failure.getErrorMessage()}")
        self.outcome("unavailable")
        return Reply(454, "4.7.0", "Temporary authentication failure")

    def _failed(self):
        """535 after auth_tarpit_interval; past max_logon_failures, 421 and close."""
        self.failures += 1
        self.outcome("failure")
        if self.max_failures and self.failures >= self.max_failures:
            reply = Reply(421, "4.7.0", "Too many failed authentication attempts, closing transmission channel",
                          close=True)
        else:
            reply = Reply(535, "5.7.8", "Authentication credentials invalid")
        if self.tarpit <= 0:
            return reply
        return task.deferLater(self.clock, self.tarpit, lambda: reply)


def mechanisms(portal) -> list[str]:
    """The SASL mechanisms this portal can check: PLAIN and LOGIN with passwords, CRAM-MD5 with held secrets."""
    if portal is None:
        return []
    found = portal.listCredentialsInterfaces()
    return (["PLAIN", "LOGIN"] if IUsernamePassword in found else []) + \
        (["CRAM-MD5"] if IUsernameHashedPassword in found else [])
