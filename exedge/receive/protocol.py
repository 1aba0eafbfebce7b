"""
The ESMTP session of a receive connector.

exedge's own server protocol on C{basic.LineReceiver} rather than a
subclass of C{twisted.mail.smtp.ESMTP}, whose flaws reach nearly every
handler (research §1, §8): it answers pipelined asynchronous commands out
of order, runs an over-long DATA line's remainder as commands, keeps an
unbounded buffer, never disconnects for protocol errors, has no NOOP,
VRFY or HELP, ignores every MAIL/RCPT parameter and can only answer 550
when the queue write fails.

Here:
  - every command is answered in order: while an answer is pending
    (queue write, tarpit) the protocol is paused, and LineReceiver stops
    taking lines from its buffer until it resumes;
  - command lines are limited to 512 octets including CRLF; an over-long
    line is answered once and discarded up to its CRLF;
  - DATA is read in raw mode by L{DataReader}; the 250 is sent only after
    the spool has fsync'ed the message;
  - the connector, rights and limits are fixed when the session starts.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import functools
import itertools
import time

import attrs
from twisted.cred import error as cred_error
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, task
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.logger import Logger
from twisted.protocols import basic
from zope.interface import implementer

from exedge import tls
from exedge.auth.credentials import DirectoryUnavailable, IIdentity
from exedge.auth.permissions import Permissions, Principal, Right, session_permissions
from exedge.logs import ProtocolLog
from exedge.pipeline import Message, SessionView
from exedge.pipeline.runner import then
from exedge.queue.envelope import Envelope, Recipient
from exedge.writethrough import write_through

from .address import (
    Mailbox, SMTPError, check_notify, check_orcpt, check_xtext, is_helo_argument,
    parse_params, parse_path,
)
from .data import DataReader
from .reply import Reply, bad_sequence, syntax_error

log = Logger()

HARD_SIZE_LIMIT = 2 * 1024**3   # Exchange's ceiling, even for BypassMessageSizeLimit
_BAD_COMMAND_BYTES = (b"\r", b"\n", b"\x00")


@attrs.define
class Transaction:
    sender: Mailbox | None
    declared_size: int | None = None
    body: str | None = None
    ret: str | None = None
    envid: str | None = None
    auth: str | None = None
    recipients: list[Recipient] = attrs.field(factory=list)


@attrs.define
class ServerContext:
    """What every session of one server shares."""

    server: object            # ServerConfig
    connectors: object        # ConnectorTable
    router: object            # Router
    store: object             # IMessageStore
    sink: object              # IQueueSink
    clock: object             # IReactorTime
    tls: dict = attrs.field(factory=dict)   # receive connector name -> TLS options (exedge.tls)
    portal: object = None     # twisted.cred Portal for AUTH; None: no AUTH anywhere
    client_ca: dict = attrs.field(factory=dict)   # receive connector name -> X509Store for partner certificates
    pipeline: object = None   # exedge.pipeline.Pipeline; None or empty: no stages


_session_counter = itertools.count()
_SESSION_EPOCH = int(time.time()) & 0xFFFFFFFF


def new_session_id() -> str:
    """
    16 hex digits, as Exchange's protocol log shows them: this process's
    start second and a counter, unique across restarts and sessions without
    a random draw (a system call) per connection.
    """
    return f"{_SESSION_EPOCH:08X}{next(_session_counter) & 0xFFFFFFFF:08X}"


@functools.lru_cache(maxsize=4)
def _rfc5322_date(second: int) -> str:
    """Formatted once per second, not once per message."""
    return email.utils.formatdate(second, localtime=False)


@implementer(IPushProducer)
class _ReplyBackpressure:
    """
    Registered with the transport: when replies pile up unread in its write
    buffer, the session stops reading and stops taking commands.
    """

    def __init__(self, session: "SMTPServer"):
        self.session = session

    def pauseProducing(self) -> None:
        self.session._set_write_blocked(True)

    def resumeProducing(self) -> None:
        self.session._set_write_blocked(False)

    def stopProducing(self) -> None:
        pass


def _redirected(recipients, redirects) -> list:
    """The recipients after the pipeline's redirects; ORCPT keeps who it was addressed to."""
    out, seen = [], set()
    for r in recipients:
        targets = redirects.get(r.address.lower())
        if targets is None:
            if r.address.lower() not in seen:
                seen.add(r.address.lower())
                out.append(r)
            continue
        for target in targets:
            if target.lower() not in seen:
                seen.add(target.lower())
                out.append(Recipient(target, r.notify, r.orcpt or f"rfc822;{r.address}"))
    return out


@implementer(IHandshakeListener)
class SMTPServer(basic.LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 510   # RFC 5321 §4.5.3.1.4: 512 octets with the CRLF

    def __init__(self, context: ServerContext):
        self.ctx = context
        self.connector = None
        self.permissions: Permissions | None = None
        self.fqdn = ""
        self.helo: str | None = None
        self.esmtp = False
        self.txn: Transaction | None = None
        self.errors = 0
        self.incoming = None
        self.reader: DataReader | None = None
        self.plog: ProtocolLog | None = None
        self._admitted = False
        self._closing = False
        self._discarding = False
        self._overflowed = False
        self.view = None                     # what pipeline stages see of this session
        self.tls_active = False
        self.tls_info: str | None = None
        self._client_cert = None             # (verified certificate or None, why), once TLS is up     # for the Received header
        self.identity = None                 # the AUTHenticated Identity
        self.logon_failures = 0
        self._auth_step = None               # the next line belongs to an AUTH dialogue
        self._idle_call = None
        self._life_call = None
        self._prefix_length = 0              # our Received field, at the start of the spooled message

    # -- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        local, peer = self.transport.getHost(), self.transport.getPeer()
        self.peer_host = peer.host
        self.session_id = new_session_id()
        connector = self.ctx.connectors.select(local.host, local.port, peer.host)
        where = f"{local.host}:{local.port}"
        self.plog = ProtocolLog(connector.name if connector else "-", self.session_id,
                                bool(connector and connector.protocol_logging_level == "Verbose"),
                                where, f"{peer.host}:{peer.port}")
        if connector is None:
            self.plog.connect(f"no receive connector on {where} accepts {peer.host}")
            return self._refuse(Reply(554, "5.7.1", "No receive connector accepts your address; closing"))
        self.connector = connector
        if not self.ctx.connectors.admit(connector, peer.host):
            self.plog.connect("connection limit reached")
            return self._refuse(Reply(421, "4.3.2", "Service not available, too many connections; try again later"))
        self._admitted = True
        self.fqdn = connector.effective_fqdn(self.ctx.server)
        self.permissions = session_permissions(connector.permission_groups, connector.auth_mechanisms)
        # one event, not two: this runs once per message under a one-message-per-session load
        self.plog.connect(f"rights: {self.permissions.explain()}")

        self._arm_idle()
        self._life_call = self.ctx.clock.callLater(connector.connection_timeout, self._timed_out,
                                                   "Connection time limit exceeded")
        if connector.tls_mode == "Implicit":
            # TLS from the first byte; the banner once the handshake is done
            # (written before, it would count as unread replies and stop
            # the reading that the handshake needs)
            self.transport.startTLS(self.ctx.tls[connector.name])
            self.tls_active = True
            return
        self._greet()

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake is done (of STARTTLS, or of an implicit-TLS session)."""
        if self._closing or self.connector is None:
            return
        if self.connector.tls_mode == "Implicit" and not self._greeted:
            # implicit TLS: the stages see on_connect with session.tls already true
            return self._greet()
        if self.ctx.pipeline and self.view is not None:
            verdict = self.ctx.pipeline.run("on_starttls", self.view)
            if isinstance(verdict, defer.Deferred):
                self._hold()     # the client's EHLO waits for the stages' word on the handshake
                verdict.addCallback(self._tls_verdict, held=True)
                verdict.addErrback(self._broken)
            else:
                self._tls_verdict(verdict, held=False)

    def _tls_verdict(self, verdict, held: bool) -> None:
        if self._closing:
            return
        if verdict.final:
            # nothing to answer after a handshake: any refusal ends the session
            reply = self._verdict_reply(verdict)
            return self._refuse(Reply(421, "4.7.0" if verdict.kind != "disconnect" else reply.status, reply.text))
        if held:
            self._release()

    _greeted = False

    def _greet(self) -> None:
        self._greeted = True
        if self.ctx.pipeline:
            # the stages see the connection first; the banner waits for them
            self.view = SessionView(self)
            verdict = self.ctx.pipeline.run("on_connect", self.view)
            if isinstance(verdict, defer.Deferred):
                self._hold()
                verdict.addCallback(self._connect_verdict, held=True)
                verdict.addErrback(self._broken)
            else:
                self._connect_verdict(verdict, held=False)
            return
        self._banner()

    def _connect_verdict(self, verdict, held: bool) -> None:
        if self._closing:
            return
        if verdict.final:
            reply = self._verdict_reply(verdict)
            code = reply.code if verdict.kind == "reject" else 421
            return self._refuse(Reply(code, reply.status, reply.text))
        self._banner()
        if held:
            self._release()

    def _banner(self) -> None:
        # a client that does not read its replies stops being read
        self.transport.registerProducer(_ReplyBackpressure(self), True)
        banner = self.connector.banner or f"220 {self.fqdn} exedge ESMTP service ready"
        self._write((banner if banner.startswith("220") else f"220 {banner}").encode("ascii", "replace") + b"\r\n")

    def _refuse(self, reply: Reply) -> None:
        self._closing = True
        self._write(reply.encode())
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self._closing = True
        for call in (self._idle_call, self._life_call):
            if call is not None and call.active():
                call.cancel()
        if self.incoming is not None:
            self.incoming.abort()
            self.incoming = None
        if self._admitted:
            self._admitted = False
            self.ctx.connectors.release(self.connector, self.peer_host)
        if self.plog is not None:
            self.plog.disconnect()
        if self.ctx.pipeline and self.view is not None:
            self.ctx.pipeline.run("on_disconnect", self.view)   # verdict ignored; failures are logged

    def _arm_idle(self) -> None:
        self._idle_call = self.ctx.clock.callLater(self.connector.connection_inactivity_timeout,
                                                   self._timed_out, "Timeout waiting for client input", True)

    def _timed_out(self, text: str, idle: bool = False) -> None:
        if self._closing:
            return
        reply = Reply(421, "4.4.2", f"{self.fqdn} {text}, closing transmission channel")
        if self._answer_pending:
            # we are the slow party (a queue write): the client is not idle,
            # and the answer it waits for goes out before any 421
            if idle:
                self._arm_idle()
            else:
                self._close_after_answer = reply
            return
        self.plog.info(text)
        self._refuse(reply)

    def _write(self, data: bytes) -> None:
        self.plog.sent(data)
        write_through(self.transport, data)

    # -- input ---------------------------------------------------------------

    # Flow control. No command is taken from the buffer while an answer is
    # pending (queue write, tarpit) or while the client is not reading its
    # replies. The socket itself stops being read when the client is not
    # reading, when message data waits for a slow disk, or when the client
    # keeps talking past PAUSED_BUFFER_LIMIT while an answer is pending; stopping it on every queue write would cost two epoll calls
    # per message for nothing.
    PAUSED_BUFFER_LIMIT = 64 * 1024
    _answer_pending = False
    _write_blocked = False
    _disk_blocked = False
    _reading_stopped = False
    _close_after_answer: Reply | None = None

    def _flow(self) -> None:
        self.paused = self._answer_pending or self._write_blocked
        stop = self._write_blocked or self._disk_blocked or \
            (self.paused and len(self._buffer) > self.PAUSED_BUFFER_LIMIT)
        if stop != self._reading_stopped and not self._closing:
            self._reading_stopped = stop
            if stop:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _disk_drained(self) -> None:
        self._disk_blocked = False
        self._flow()

    def _hold(self) -> None:
        self._answer_pending = True
        self._flow()

    def _release(self) -> None:
        self._answer_pending = False
        self._flow()
        if not self.paused:
            self.dataReceived(b"")

    def _set_write_blocked(self, blocked: bool) -> None:
        self._write_blocked = blocked
        self._flow()
        if not self.paused:
            self.dataReceived(b"")

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.connector.connection_inactivity_timeout)
        super().dataReceived(data)
        # LineReceiver leaves its loop after lineLengthExceeded: go on with
        # what followed the over-long line (put back into the buffer)
        while self._overflowed and not self.paused and not self._closing:
            self._overflowed = False
            super().dataReceived(b"")
        self._flow()

    def lineLengthExceeded(self, data: bytes) -> None:
        end = data.find(b"\r\n")
        if end >= 0:
            self._buffer = data[end + 2:] + self._buffer
            self._overflowed = True
        elif data.endswith(b"\r"):
            self._buffer = b"\r"   # its LF may come in the next chunk and end the line
        if not self._discarding:
            self._answer(syntax_error("Line too long", "5.5.2", 500))
        self._discarding = end < 0

    def lineReceived(self, line: bytes) -> None:
        if self._closing:
            return
        if self._discarding:          # the end of an over-long line
            self._discarding = False
            return
        if self._auth_step is not None:
            step, self._auth_step = self._auth_step, None
            self.plog.received(b"(authentication data)")      # never a password in the log
            return self._answer(step(line.decode("latin-1").strip(" ")))
        if line[:5].upper() == b"AUTH ":
            self.plog.received(b" ".join(line.split(b" ")[:2]) + b" ...")
        else:
            self.plog.received(line)
        self._answer(self._command(line))

    def rawDataReceived(self, data: bytes) -> None:
        done, rest = self.reader.feed(data)
        if not done:
            if self.incoming.backlogged and not self._disk_blocked:
                # the disk is slower than the client: stop reading until it catches up
                self._disk_blocked = True
                self._flow()
                self.incoming.when_drained(self._disk_drained)
            return
        reader, self.reader = self.reader, None
        self.setLineMode(rest)   # buffered: handled once this answer is out
        self._answer(self._end_of_data(reader))

    # -- answering in order ------------------------------------------------

    def _answer(self, result) -> None:
        if isinstance(result, defer.Deferred):
            self._hold()
            result.addErrback(self._internal_error)
            result.addCallback(self._emit, resume=True)
            result.addErrback(self._broken)
        else:
            self._emit(result, resume=False)

    def _internal_error(self, failure) -> Reply:
        log.failure("session {session}: internal error", failure, session=self.session_id)
        return Reply(451, "4.3.0", "Temporary server error; please try again later")

    def _broken(self, failure) -> None:
        """A bug after the answer: never leave the session paused for ever."""
        log.failure("session {session}: dropping the connection", failure, session=self.session_id)
        self._closing = True
        self.transport.abortConnection()

    def _emit(self, reply: Reply, resume: bool) -> None:
        delay = self.connector.tarpit_interval if reply.tarpit and self._tarpitted() else 0
        if delay > 0:
            if not resume:
                self._hold()
            d = task.deferLater(self.ctx.clock, delay, self._send_reply, reply, True)
            d.addErrback(self._broken)
        else:
            self._send_reply(reply, resume)

    def _tarpitted(self) -> bool:
        return Right.AcceptAuthenticationFlag not in self.permissions

    def _send_reply(self, reply: Reply, resume: bool) -> None:
        if self._closing:
            return
        self._write(reply.encode())
        if reply.after is not None:
            reply.after()
        if self._close_after_answer is not None:
            self.plog.info(self._close_after_answer.text)
            return self._refuse(self._close_after_answer)
        if reply.protocol_error:
            self.errors += 1
            limit = self.connector.max_protocol_errors
            if limit and self.errors >= limit:
                self.plog.info(f"{self.errors} protocol errors")
                return self._refuse(Reply(421, "4.7.0", "Too many errors on this connection, closing transmission channel"))
        if reply.close:
            self._closing = True
            self.transport.loseConnection()
            return
        if resume:
            self._release()

    # -- commands ------------------------------------------------------------

    def _command(self, line: bytes):
        if any(b in line for b in _BAD_COMMAND_BYTES):
            return syntax_error("Invalid characters in command (bare CR, LF or NUL)", "5.5.2", 500)
        verb, _, arg = line.partition(b" ")
        if self.ctx.pipeline and verb.isalpha() and self.view is not None:
            stage_verb = self.ctx.pipeline.verb(self.view, verb.decode("ascii").upper())
            if stage_verb is not None:
                return then(stage_verb(arg.decode("latin-1").strip(" ")), self._verb_reply)
        handler = getattr(self, "do_" + verb.decode("ascii", "replace").upper(), None) if verb.isalpha() else None
        if handler is None:
            return syntax_error("Command unrecognized", "5.5.1", 500)
        return handler(arg.decode("latin-1").strip(" "))

    def do_EHLO(self, arg: str):
        return self._hello(arg, esmtp=True)

    def do_HELO(self, arg: str):
        return self._hello(arg, esmtp=False)

    def _hello(self, arg: str, esmtp: bool) -> Reply:
        if not arg or not is_helo_argument(arg):
            return syntax_error(f"Syntax: {'EHLO' if esmtp else 'HELO'} domain or address literal")
        self._reset()
        self.helo, self.esmtp = arg, esmtp
        if self.tls_active and self.identity is None:
            self._partner_by_certificate()
        greeting = f"{self.fqdn} Hello [{self.peer_host}]"
        reply = Reply(250, None, greeting, more=tuple(self._extensions()) if esmtp else ())
        return self._staged("on_helo", reply, (arg,), undo=lambda: setattr(self, "helo", None))

    def _extensions(self) -> list[str]:
        c = self.connector
        size = "SIZE" if Right.BypassMessageSizeLimit in self.permissions else f"SIZE {c.max_message_size}"
        ext = [size]
        if c.pipelining_enabled:
            ext.append("PIPELINING")
        if c.delivery_status_notification_enabled:
            ext.append("DSN")
        ext.append("ENHANCEDSTATUSCODES")
        if c.eight_bit_mime_enabled:
            ext.append("8BITMIME")
        if self._tls_offered():
            ext.append("STARTTLS")
        if self._auth_offered():
            ext.append("AUTH PLAIN LOGIN")
        if self.ctx.pipeline and self.view is not None:
            ext.extend(self.ctx.pipeline.ehlo_keywords(self.view))
        return ext

    # -- STARTTLS (RFC 3207) -------------------------------------------------

    def _tls_offered(self) -> bool:
        return (not self.tls_active and "Tls" in self.connector.auth_mechanisms
                and self.connector.name in self.ctx.tls)

    def do_STARTTLS(self, arg: str):
        if self.tls_active:
            return bad_sequence("TLS already active")
        if not self._tls_offered():
            return self._not_offered(arg)
        if arg:
            return syntax_error("Syntax: STARTTLS")
        if self.helo is None or not self.esmtp:
            return bad_sequence("Send EHLO first", "5.5.1")
        # whatever the client sent after STARTTLS in plain text is not
        # trusted and never read (CVE-2011-0411): LineReceiver takes its
        # next line from this buffer, so emptying it here stops it
        self.clearLineBuffer()
        self._discarding = self._overflowed = False
        return Reply(220, "2.0.0", "SMTP server ready", after=self._start_tls)

    def _start_tls(self) -> None:
        self.transport.startTLS(self.ctx.tls[self.connector.name])
        self.tls_active = True
        # RFC 3207 §4.2: the client starts over, knowing nothing
        self.helo, self.esmtp, self.txn, self.identity = None, False, None, None
        self.permissions = session_permissions(self.connector.permission_groups, self.connector.auth_mechanisms)
        self.plog.info("STARTTLS: TLS negotiation started")

    # -- AUTH (RFC 4954) -------------------------------------------------------

    def _auth_offered(self) -> bool:
        mechs = self.connector.auth_mechanisms
        if "BasicAuth" not in mechs or self.ctx.portal is None:
            return False
        return self.tls_active or "BasicAuthRequireTLS" not in mechs

    def do_AUTH(self, arg: str):
        mechs = self.connector.auth_mechanisms
        if not self._auth_offered():
            if "BasicAuthRequireTLS" in mechs and self.ctx.portal is not None and not self.tls_active:
                return Reply(538, "5.7.11", "Encryption required for requested authentication mechanism",
                             protocol_error=True, tarpit=True)
            return self._not_offered(arg)
        if self.helo is None or not self.esmtp:
            return bad_sequence("Send EHLO first")
        if self.identity is not None:
            return bad_sequence("Already authenticated")
        if self.txn is not None:
            return bad_sequence("AUTH not permitted during a mail transaction")
        mechanism, _, initial = arg.partition(" ")
        if not mechanism:
            return syntax_error("Syntax: AUTH mechanism [initial-response]")
        mechanism, initial = mechanism.upper(), initial.strip(" ")
        if mechanism == "PLAIN":
            if initial:
                return self._auth_plain(initial)
            self._auth_step = self._auth_plain
            return Reply(334, None, "")
        if mechanism == "LOGIN":
            if initial:
                return self._auth_login_user(initial)
            self._auth_step = self._auth_login_user
            return Reply(334, None, "VXNlcm5hbWU6")          # "Username:"
        return Reply(504, "5.5.4", "Unrecognized authentication type", protocol_error=True, tarpit=True)

    @staticmethod
    def _decode(text: str):
        """The client's base64 response, or the Reply that ends the dialogue."""
        if text == "*":
            return Reply(501, "5.0.0", "Authentication cancelled")
        if text == "=":
            return b""                                       # RFC 4954: an empty initial response
        try:
            return base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            return syntax_error("Cannot decode the authentication response (not base64)", "5.5.2")

    def _auth_plain(self, text: str):
        data = self._decode(text)
        if isinstance(data, Reply):
            return data
        parts = data.split(b"\0")
        if len(parts) != 3:
            return syntax_error("Malformed PLAIN response (authzid NUL authcid NUL password)", "5.5.2")
        authzid, user, password = parts
        if authzid and authzid != user:
            return self._auth_failed()                       # no acting for another user
        return self._auth_check(user, password)

    def _auth_login_user(self, text: str):
        user = self._decode(text)
        if isinstance(user, Reply):
            return user
        self._auth_step = functools.partial(self._auth_login_password, user)
        return Reply(334, None, "UGFzc3dvcmQ6")              # "Password:"

    def _auth_login_password(self, user: bytes, text: str):
        password = self._decode(text)
        if isinstance(password, Reply):
            return password
        return self._auth_check(user, password)

    def _auth_check(self, user: bytes, password: bytes):
        try:
            user_text, password_text = user.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            return self._auth_failed()
        if not user_text or not password_text:
            # an empty password is an anonymous bind that AD answers with
            # success: never let it reach the directory
            return self._auth_failed()
        d = self.ctx.portal.login(UsernamePassword(user_text, password_text), None, IIdentity)
        d.addCallbacks(self._authenticated, self._auth_error, errbackArgs=(user_text,))
        return d

    def _authenticated(self, result):
        _, identity, _ = result
        self.identity = identity
        self.logon_failures = 0
        self.permissions = session_permissions(self.connector.permission_groups, self.connector.auth_mechanisms,
                                               authenticated_as=identity.principals)
        self.plog.info(f"authenticated as {identity.name}; rights: {self.permissions.explain()}")
        reply = Reply(235, "2.7.0", "Authentication successful")
        return self._staged("on_auth", reply, (identity.name,), undo=self._unauthenticate)

    def _unauthenticate(self) -> None:
        """A stage refused the authenticated user: back to the rights of an anonymous session."""
        self.identity = None
        self.permissions = session_permissions(self.connector.permission_groups, self.connector.auth_mechanisms)

    def _auth_error(self, failure, user: str):
        if failure.check(cred_error.UnauthorizedLogin):
            # checkers give the reason alone (IUsernamePassword checkers know the name we log)
            self.plog.info(f"authentication failed for {user}: {failure.getErrorMessage()}")
            return self._auth_failed()
        if not failure.check(DirectoryUnavailable):
            log.failure("session {session}: checking credentials", failure, session=self.session_id)
        self.plog.info(f"authentication for {user} could not be checked: {failure.getErrorMessage()}")
        return Reply(454, "4.7.0", "Temporary authentication failure")

    def _auth_failed(self):
        """535 after auth_tarpit_interval; past max_logon_failures, 421 and close."""
        self.logon_failures += 1
        limit = self.connector.max_logon_failures
        if limit and self.logon_failures >= limit:
            reply = Reply(421, "4.7.0", "Too many failed authentication attempts, closing transmission channel",
                          close=True)
        else:
            reply = Reply(535, "5.7.8", "Authentication credentials invalid")
        delay = self.connector.auth_tarpit_interval
        if delay <= 0:
            return reply
        return task.deferLater(self.ctx.clock, delay, lambda: reply)

    def do_MAIL(self, arg: str) -> Reply:
        if self.helo is None:
            return bad_sequence("Send hello first", "5.5.2")
        if self.txn is not None:
            return bad_sequence("Sender already specified")
        if not arg[:5].upper() == "FROM:":
            return syntax_error("Syntax: MAIL FROM:<address> [parameters]")
        if Right.Submit not in self.permissions:
            return Reply(530, "5.7.1", "Client was not authenticated", tarpit=True)
        try:
            sender, ptext = parse_path(arg[5:], "sender", allow_null=True)
        except SMTPError as e:
            return Reply(e.code, e.status, e.text, tarpit=True)
        except ValueError as e:
            return syntax_error(f"Bad sender address syntax: {e}", "5.1.7")
        try:
            params = parse_params(ptext)
        except ValueError as e:
            return syntax_error(f"Bad MAIL parameter: {e}")
        if params and not self.esmtp:
            return Reply(555, "5.5.4", "MAIL parameters need EHLO", protocol_error=True)
        txn = Transaction(sender)
        try:
            for key, value in params.items():
                if key == "SIZE":
                    if not value or not value.isdigit() or len(value) > 20:
                        raise ValueError("SIZE needs a number")
                    txn.declared_size = int(value)
                elif key == "BODY":
                    if (value or "").upper() not in ("7BIT", "8BITMIME"):
                        raise ValueError("BODY must be 7BIT or 8BITMIME")
                    txn.body = value.upper()
                elif key == "RET":
                    if (value or "").upper() not in ("FULL", "HDRS"):
                        raise ValueError("RET must be FULL or HDRS")
                    txn.ret = value.upper()
                elif key == "ENVID":
                    txn.envid = check_xtext(value or "", 100)
                elif key == "AUTH":
                    txn.auth = self._mail_auth(value)
                else:
                    return Reply(555, "5.5.4", f"MAIL parameter {key} not recognized or not implemented",
                                 protocol_error=True)
        except ValueError as e:
            return syntax_error(f"Bad MAIL parameter: {e}")
        limit = self._size_limit()
        if txn.declared_size is not None and txn.declared_size > limit:
            return Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        refusal = self._domain_secure(sender)
        if refusal is not None:
            return refusal
        # the spoofing check is for anonymous peers: an authenticated user
        # sending as an address of ours is the normal case (Exchange leaves
        # Send-As to the mailbox side; here the identity is in the log)
        if sender is not None and not sender.is_literal and self.identity is None \
                and self.ctx.router.is_authoritative(sender.domain) \
                and Right.AcceptAuthoritativeDomainSender not in self.permissions:
            return Reply(550, "5.7.1", "Client does not have permissions to send as this sender", tarpit=True)
        self.txn = txn
        return self._staged("on_mail", Reply(250, "2.1.0", "Sender OK"), (str(sender) if sender else "",),
                            undo=lambda: setattr(self, "txn", None))

    def _client_certificate(self):
        """The client's certificate verified against the partner CA, once per session: (cert or None, why)."""
        if self._client_cert is None:
            store = self.ctx.client_ca.get(self.connector.name)
            self._client_cert = (tls.verified_client_certificate(self.transport, store) if store is not None
                                 else (None, "no partner CA for this connector"))
        return self._client_cert

    def _partner_by_certificate(self) -> None:
        r"""
        A client whose certificate verifies against the partner CA and names
        a domain-secure partner is that partner's server: it holds
        MS Exchange\Partner Servers (the Partners permission group), as a
        domain-secured session does in Exchange. Decided at the first EHLO
        inside TLS, when the handshake is done.
        """
        if not self.connector.tls_receive_domain_secure_list or "Partners" not in self.connector.permission_groups:
            return      # without the Partners group the peer stays what it was (anonymous)
        cert, _ = self._client_certificate()
        partners = [d for d in self.connector.tls_receive_domain_secure_list
                    if cert is not None and tls.names_domain(cert, d)]
        if not partners:
            return
        self.permissions = session_permissions(self.connector.permission_groups, self.connector.auth_mechanisms,
                                               authenticated_as=(Principal.PartnerServers,))
        self.plog.info(f"domain secure partner {', '.join(partners)}; rights: {self.permissions.explain()}")

    def _domain_secure(self, sender) -> Reply | None:
        """
        Mail from a partner domain (tls_receive_domain_secure_list) must come
        over TLS from a client whose certificate verifies against the
        partner CA and names that domain (Exchange's domain security).
        """
        secure = self.connector.tls_receive_domain_secure_list
        if sender is None or sender.is_literal or sender.domain.lower() not in secure:
            return None
        if not self.tls_active:
            self.plog.info(f"domain secure: {sender.domain} without TLS")
            return Reply(451, "4.7.1", f"Mail from {sender.domain} must use TLS with a client certificate",
                         tarpit=True)
        cert, why = self._client_certificate()
        if cert is None or not tls.names_domain(cert, sender.domain):
            why = why or f"client certificate names {', '.join(tls.certificate_names(cert)) or 'nothing'}, " \
                         f"not {sender.domain}"
            self.plog.info(f"domain secure: {sender.domain} refused: {why}")
            return Reply(550, "5.7.1", f"Domain secure: {why}", tarpit=True)
        return None

    def _mail_auth(self, value: str | None) -> str | None:
        """
        RFC 4954 §5: the AUTH= of MAIL is passed on only when this session
        may vouch for it: servers we trust (the authentication flag) pass
        theirs on; for an authenticated user it is that user; from anyone
        else it is dropped (never an error: the parameter is advisory).
        """
        if value is None or (value != "<>" and value != check_xtext(value, 500)):
            raise ValueError("AUTH needs xtext or <>")
        if Right.AcceptAuthenticationFlag in self.permissions:
            return value
        if self.identity is not None:
            return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}"
                           for c in self.identity.name)
        return None

    def _size_limit(self) -> int:
        if Right.BypassMessageSizeLimit in self.permissions:
            return HARD_SIZE_LIMIT
        return self.connector.max_message_size

    def do_RCPT(self, arg: str) -> Reply:
        if self.txn is None:
            return bad_sequence("Need MAIL before RCPT")
        if not arg[:3].upper() == "TO:":
            return syntax_error("Syntax: RCPT TO:<address> [parameters]")
        path = arg[3:].lstrip(" ")
        try:
            if path[:12].lower() == "<postmaster>":   # RFC 5321 §4.1.1.3: no domain needed
                mailbox = Mailbox("postmaster", self._postmaster_domain())
                ptext = path[12:]
            else:
                mailbox, ptext = parse_path(path, "recipient", allow_null=False)
        except SMTPError as e:
            return Reply(e.code, e.status, e.text, tarpit=True)
        except ValueError as e:
            return syntax_error(f"Bad recipient address syntax: {e}", "5.1.3")
        try:
            params = parse_params(ptext)
        except ValueError as e:
            return syntax_error(f"Bad RCPT parameter: {e}")
        if params and not self.esmtp:
            return Reply(555, "5.5.4", "RCPT parameters need EHLO", protocol_error=True)
        notify: tuple = ()
        orcpt = None
        try:
            for key, value in params.items():
                if key == "NOTIFY":
                    notify = check_notify(value or "")
                elif key == "ORCPT":
                    orcpt = check_orcpt(value or "")
                else:
                    return Reply(555, "5.5.4", f"RCPT parameter {key} not recognized or not implemented",
                                 protocol_error=True)
        except ValueError as e:
            return syntax_error(f"Bad RCPT parameter: {e}")
        if len(self.txn.recipients) >= self.connector.max_recipients_per_message:
            return Reply(452, "4.5.3", "Too many recipients")
        refusal = self._relay_check(mailbox)
        if refusal is not None:
            return refusal
        address = f"{mailbox.local}@{mailbox.domain}"
        self.txn.recipients.append(Recipient(address, notify, orcpt))
        return self._staged("on_rcpt", Reply(250, "2.1.5", "Recipient OK"), (address,),
                            undo=self.txn.recipients.pop)

    def _postmaster_domain(self) -> str:
        for domain in self.ctx.router.accepted_domains:
            if domain.domain_type == "Authoritative" and not domain.is_wildcard:
                return domain.domain_name
        return self.fqdn.lower()

    def _relay_check(self, mailbox: Mailbox) -> Reply | None:
        """Closed by default: without the relay right only accepted domains, and no routing tricks."""
        if Right.AcceptAnyRecipient in self.permissions:
            return None
        trick = mailbox.routing_trick()
        if trick is None and self.ctx.router.accepted_domain(mailbox.domain) is not None:
            return None
        self.plog.info(f"relay refused for {mailbox}" + (f" ({trick})" if trick else ""))
        return Reply(550, "5.7.54", "Unable to relay recipient in non-accepted domain", tarpit=True)

    def do_DATA(self, arg: str) -> Reply:
        if arg:
            return syntax_error("Syntax: DATA")
        if self.txn is None:
            return bad_sequence("Need MAIL command")
        if not self.txn.recipients:
            return Reply(554, "5.5.1", "No valid recipients", protocol_error=True)
        if self.ctx.pipeline:
            return then(self.ctx.pipeline.run("on_data", self.view),
                        lambda v: self._verdict_reply(v) if v.final else self._start_data())
        return self._start_data()

    def _start_data(self) -> Reply:
        self.incoming = self.ctx.store.begin()
        received = self._received_header(self.incoming.queue_id)
        self._prefix_length = len(received)
        self.incoming.write(received)
        c = self.connector
        self.reader = DataReader(self.incoming.write, max_size=self._size_limit(),
                                 max_header_size=c.max_header_size, max_hop_count=c.max_hop_count)
        self.setRawMode()
        return Reply(354, None, "Start mail input; end with <CRLF>.<CRLF>")

    # -- the pipeline ----------------------------------------------------------

    def _staged(self, hook: str, reply: Reply, args: tuple, undo=None):
        """C{reply} once the stages agree with it; their verdict's reply (and C{undo}) if not."""
        if not self.ctx.pipeline:
            return reply

        def decide(verdict):
            if not verdict.final:
                return reply
            if undo is not None:
                undo()
            return self._verdict_reply(verdict)

        return then(self.ctx.pipeline.run(hook, self.view, *args), decide)

    def _verb_reply(self, verdict) -> Reply:
        """A stage verb's answer: its own positive reply, or the refusal."""
        if verdict.kind == "ok":
            first, *more = (verdict.text or "OK").split("\n")
            return Reply(verdict.code or 250, verdict.status or None, first, more=tuple(more))
        if not verdict.final:
            return Reply(250, "2.0.0", "OK")
        return self._verdict_reply(verdict)

    def _verdict_reply(self, verdict) -> Reply:
        if verdict.kind == "disconnect":
            return Reply(421, verdict.status or "4.7.0", verdict.text or "Closing connection", close=True)
        default = (550, "5.7.1") if verdict.kind == "reject" else (451, "4.7.1")
        self.plog.info(f"pipeline: {verdict.kind} {verdict.code or default[0]} {verdict.text}")
        return Reply(verdict.code or default[0], verdict.status or default[1], verdict.text or "Refused",
                     tarpit=verdict.kind == "reject")

    def _received_header(self, queue_id: str) -> bytes:
        # RFC 3848: ESMTPS with TLS, ESMTPA authenticated, ESMTPSA both
        protocol = "ESMTP" if self.esmtp else "SMTP"
        if self.esmtp and (self.tls_active or self.identity is not None):
            protocol += ("S" if self.tls_active else "") + ("A" if self.identity is not None else "")
        now = _rfc5322_date(int(self.ctx.clock.seconds()))
        using = ""
        if self.tls_active:
            if self.tls_info is None:
                verified = self._client_certificate()[0] if self.connector.name in self.ctx.client_ca else None
                self.tls_info = tls.describe(self.transport, verified) or "TLS"
            using = f"\t({self.tls_info})\r\n"
        return (
            f"Received: from {self.helo} ([{self.peer_host}])\r\n"
            f"\tby {self.fqdn} (exedge, receive connector \"{self.connector.name}\")\r\n"
            f"{using}"
            f"\twith {protocol} id {queue_id};\r\n"
            f"\t{now}\r\n"
        ).encode("ascii", "replace")

    def _end_of_data(self, reader: DataReader):
        txn, self.txn = self.txn, None
        incoming, self.incoming = self.incoming, None
        if reader.error is not None:
            incoming.abort()
            code, status, text = reader.error
            self.plog.info(f"message refused: {code} {status} {text}")
            return Reply(code, status, text)
        if self.ctx.pipeline:
            message = Message(str(txn.sender) if txn.sender else "", [r.address for r in txn.recipients],
                              reader.header, reader.size, read=lambda: self._client_bytes(incoming),
                              queue_id=incoming.queue_id)
            run = self.ctx.pipeline.run
            verdict = then(run("on_headers", self.view, message),
                           lambda v: v if v.final else run("on_message", self.view, message))
            return then(verdict, self._message_verdict, message, txn, incoming, reader)
        return self._commit(txn, incoming, reader.size)

    def _client_bytes(self, incoming):
        """What the client sent, as stages see it: the spooled bytes after our Received field."""
        skip = self._prefix_length
        return incoming.read_back().addCallback(lambda data: data[skip:])

    def _message_verdict(self, verdict, message, txn, incoming, reader):
        if verdict.final:
            incoming.abort()
            return self._verdict_reply(verdict)
        if message.deleted is not None:
            # the stage's "delete": the client is told 250, nobody gets it (Exchange's SilentDelete)
            incoming.abort()
            self.plog.info(f"message deleted by the pipeline: {message.deleted}")
            return Reply(250, "2.6.0", f"<{incoming.queue_id}> Queued mail for delivery")
        if message.quarantined is not None:
            mailbox = self.ctx.server.quarantine_mailbox
            if mailbox is None:
                incoming.abort()
                self.plog.info(f"quarantine without a quarantine_mailbox, refused: {message.quarantined}")
                return Reply(550, "5.7.1", "Message rejected as spam by content filtering", tarpit=True)
            message.add_header("X-Exedge-Quarantine-Reason", message.quarantined[:200])
            message.add_header("X-Exedge-Original-Recipients", ", ".join(r.address for r in txn.recipients))
            txn.recipients = [Recipient(mailbox)]
            self.plog.info(f"message quarantined to {mailbox}: {message.quarantined}")
        elif message.redirects:
            txn.recipients = _redirected(txn.recipients, message.redirects)
            self.plog.info("recipients redirected by the pipeline: " +
                           ", ".join(f"{k} -> {', '.join(v)}" for k, v in message.redirects.items()))
        notes = message.notes
        if not message.edited:
            return self._commit(txn, incoming, reader.size, notes)
        prefix = self._prefix_length
        d = incoming.rewrite(message.edit(prefix))
        d.addCallbacks(lambda length: self._commit(txn, incoming, length - prefix, notes), self._rewrite_failed,
                       errbackArgs=(incoming,))
        return d

    def _rewrite_failed(self, failure, incoming) -> Reply:
        incoming.abort()
        return self._queue_failed(failure, incoming.queue_id)

    def _commit(self, txn, incoming, size: int, notes=None):
        envelope = Envelope(
            sender=str(txn.sender) if txn.sender else "",
            recipients=tuple(txn.recipients),
            ret=txn.ret, envid=txn.envid, auth=txn.auth, body=txn.body,
            size=size, receive_connector=self.connector.name,
            peer=f"{self.peer_host}:{self.transport.getPeer().port}",
            helo=self.helo or "", received_at=self.ctx.clock.seconds(), notes=notes or {},
        )
        d = incoming.commit(envelope)
        d.addCallbacks(self._queued, self._queue_failed, errbackArgs=(incoming.queue_id,))
        return d

    def _queued(self, stored) -> Reply:
        # no log line of its own: the Verbose protocol log has the 250 with
        # the queue id, and per-message lines cost a formatted, flushed write
        try:
            self.ctx.sink.submit(stored)
        except Exception:
            # the message is on disk: it is acknowledged, and start-up recovery queues it
            log.failure("queueing {queue_id} failed; it waits in the spool for a restart",
                        queue_id=stored.queue_id)
        if self.ctx.pipeline and self.view is not None:
            self.ctx.pipeline.run("on_queued", self.view, stored.queue_id)   # verdict ignored
        return Reply(250, "2.6.0", f"<{stored.queue_id}> Queued mail for delivery")

    def _queue_failed(self, failure, queue_id: str) -> Reply:
        log.failure("queue write failed for {queue_id}", failure, queue_id=queue_id)
        return Reply(451, "4.3.0", "Could not write the message to the queue; try again later")

    def do_RSET(self, arg: str) -> Reply:
        if arg:
            return syntax_error("Syntax: RSET")
        self._reset()
        return Reply(250, "2.0.0", "Resetting")

    def _reset(self) -> None:
        self.txn = None

    def do_NOOP(self, arg: str) -> Reply:
        return Reply(250, "2.0.0", "OK")

    def do_QUIT(self, arg: str) -> Reply:
        return Reply(221, "2.0.0", f"{self.fqdn} Service closing transmission channel", close=True)

    def do_VRFY(self, arg: str) -> Reply:
        if not arg:
            return syntax_error("Syntax: VRFY address")
        return Reply(252, "2.1.5", "Cannot VRFY user, but will accept message and attempt delivery")

    def do_HELP(self, arg: str) -> Reply:
        return Reply(214, "2.0.0", "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")

    def _not_offered(self, arg: str) -> Reply:
        return Reply(502, "5.5.1", "Command not implemented", protocol_error=True, tarpit=True)

    do_EXPN = do_TURN = do_ETRN = do_ATRN = do_BDAT = _not_offered
