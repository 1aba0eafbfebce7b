"""
The ESMTP session of a receive connector: the SMTP state machine.

exedge's own server protocol on C{basic.LineReceiver} rather than a
subclass of C{twisted.mail.smtp.ESMTP}, whose flaws reach nearly every
handler (research §1, §8): it answers pipelined asynchronous commands out
of order, runs an over-long DATA line's remainder as commands, keeps an
unbounded buffer, never disconnects for protocol errors, has no NOOP,
VRFY or HELP, ignores every MAIL/RCPT parameter and can only answer 550
when the queue write fails.

The session speaks SMTP and decides what this client may do; the rest is
in the rooms beside it, as Postfix splits smtpd:
  - L{exedge.receive.flow}: every command is answered in order; while an
    answer is pending (queue write, tarpit, a stage) no command is taken,
    and a client that does not read its replies is not read;
  - L{exedge.receive.params}: MAIL and RCPT arguments, parsed and checked;
  - L{exedge.receive.sasl}: the AUTH dialogue;
  - L{exedge.receive.data}: DATA, read in raw mode (only CRLF.CRLF ends it);
  - L{exedge.cleanup}: everything between the final dot and the 250 (our
    Received field, the stages' actions, the durable commit, the queue).
Command lines are limited to 512 octets including CRLF; an over-long line
is answered once and discarded up to its CRLF. The connector, rights and
limits are fixed when the session starts. Stages see L{Session}, a small
object this protocol keeps up to date.

Every session ends, whatever the client does: a client that closes its
sending side still gets every answer it is owed, then the server closes;
a close that the client does not let finish (a reply it does not read,
TLS's close_notify it does not answer) is aborted after L{CLOSE_GRACE}.
"""

from __future__ import annotations

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.logger import Logger
from twisted.protocols import basic
from zope.interface import implementer

from exedge.auth.permissions import Principal, Right, session_permissions
from exedge.cleanup import Trace, Transaction, with_protocol
from exedge.logs import ProtocolLog
from exedge.logs.protocol import new_session_id
from exedge.pipeline import Message
from exedge.pipeline.runner import then
from exedge.pipeline.session import Session
from exedge.queue.envelope import Recipient
from exedge.writethrough import write_through

from . import checks
from .address import is_helo_argument
from .connectors import IDataSession
from .data import DataReader
from .flow import Flow, InOrder
from .params import CommandRefused, parse_mail, parse_rcpt
from .rate import DataRate
from .partners import DomainSecurity
from .reply import Reply, bad_sequence, syntax_error, verb_reply, verdict_reply
from .sasl import AuthDialogue, mechanisms

log = Logger()

_BAD_COMMAND_BYTES = (b"\r", b"\n", b"\x00")


@attrs.define
class ServerContext:
    """What every session of one server shares."""

    server: object            # ServerConfig
    connectors: object        # ConnectorTable
    router: object            # Router
    cleanup: object           # exedge.cleanup.Cleanup: where finished messages go
    clock: object             # IReactorTime
    tls: dict = attrs.field(factory=dict)   # receive connector name -> TLS options (exedge.tls)
    portal: object = None     # twisted.cred Portal for AUTH; None: no AUTH anywhere
    client_ca: dict = attrs.field(factory=dict)   # receive connector name -> X509Store for partner certificates
    pipeline: object = None   # exedge.pipeline.Pipeline; None or empty: no stages
    metrics: object = None    # exedge.metrics.Metrics; None: not counted (protocol tests)
    protocol_log: object = None   # exedge.logs.CsvLog: Verbose connectors' protocol log files; None: none
    back_pressure: object = None  # exedge.pressure.ResourceMonitor: its level refuses MAIL FROM; None: never




@implementer(IHandshakeListener, IHalfCloseableProtocol, IDataSession)
class SMTPServer(basic.LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 510   # RFC 5321 §4.5.3.1.4: 512 octets with the CRLF
    CLOSE_GRACE = Flow.CLOSE_GRACE

    flow: Flow | None = None

    def __init__(self, context: ServerContext):
        self.ctx = context
        # what the stages see, kept up to date here: the HELO name, TLS, the
        # rights, the identity's name, the transaction's sender and recipients
        self.session = Session(authoritative=context.router.is_authoritative)
        self.connector = None
        self.fqdn = ""
        self.esmtp = False
        self._txn: Transaction | None = None
        self._identity = None                # the AUTHenticated Identity
        self.errors = 0
        self.draft = None                    # the message being received (exedge.cleanup.Draft)
        self.reader: DataReader | None = None
        self.plog: ProtocolLog | None = None
        self.replies: InOrder | None = None
        self.sasl: AuthDialogue | None = None
        self._admitted = False
        self._data_slot = False              # counted in ConnectorTable.admit_data (from the 354 to the data's end)
        self._rate: DataRate | None = None   # while in DATA with a min_inbound_data_rate: the slot's credit
        self._closing = False
        self._discarding = False
        self._overflowed = False
        self._greeted = False
        self._stages_on = False              # the stages have seen on_connect
        self.security: DomainSecurity | None = None
        self._idle_call = None
        self._life_call = None
        self._close_after_answer: Reply | None = None
        self._input_ended = False            # the client closed its sending side
        self._turned = None                  # the protocol this connection was turned over to (ATRN)
        self._handshaken = False             # the TLS handshake (STARTTLS or implicit) is done

    @property
    def paused(self) -> bool:
        """LineReceiver takes no line from its buffer while this is true."""
        flow = self.flow
        return flow is not None and flow.paused

    @paused.setter
    def paused(self, value) -> None:
        pass              # the flow decides; LineReceiver's own producer methods are never called

    @property
    def txn(self) -> Transaction | None:
        return self._txn

    @txn.setter
    def txn(self, txn: Transaction | None) -> None:
        self._txn = txn
        self.session.sender = str(txn.sender) if txn is not None and txn.sender is not None else None
        self.session.recipients = [r.address for r in txn.recipients] if txn is not None else []

    @property
    def identity(self):
        return self._identity

    @identity.setter
    def identity(self, identity) -> None:
        self._identity = identity
        self.session.authenticated_as = identity.name if identity is not None else None

    # -- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        local, peer = self.transport.getHost(), self.transport.getPeer()
        self.peer_host = peer.host
        self.session_id = new_session_id()
        self.flow = Flow(self.transport, self.ctx.clock, buffered=lambda: len(self._buffer),
                         take_more=lambda: self.dataReceived(b""), note=lambda text: self.plog.info(text))
        self.replies = InOrder(self.flow, self.ctx.clock, send=self._send_reply, delay_of=self._tarpit_delay,
                               on_error=self._internal_error, on_broken=self._broken)
        connector = self.ctx.connectors.select(local.host, local.port, peer.host)
        where = f"{local.host}:{local.port}"
        self.plog = ProtocolLog(connector.name if connector else "-", self.session_id,
                                bool(connector and connector.protocol_logging_level == "Verbose"),
                                where, f"{peer.host}:{peer.port}", file=self.ctx.protocol_log)
        if connector is None:
            self.plog.connect(f"no receive connector on {where} accepts {peer.host}")
            return self._refuse(Reply(554, "5.7.1", "No receive connector accepts your address; closing"))
        self.connector = connector
        self.session.peer, self.session.connector = peer.host, connector.name
        if not self.ctx.connectors.admit(connector, peer.host):
            self.plog.connect("connection limit reached")
            return self._refuse(Reply(421, "4.3.2", "Service not available, too many connections; try again later"))
        self._admitted = True
        if self.ctx.metrics is not None:
            self.ctx.metrics.session_opened(connector.name)
        self.security = DomainSecurity(connector, self.ctx.client_ca.get(connector.name), self.transport,
                                       self.plog.info)
        self.fqdn = connector.effective_fqdn(self.ctx.server)
        self.session.permissions = session_permissions(connector.permission_groups, connector.auth_mechanisms)
        # one event, not two: this runs once per message under a one-message-per-session load
        self.plog.connect(f"rights: {self.session.permissions.explain()}")

        self._arm_idle()
        self._life_call = self.ctx.clock.callLater(connector.connection_timeout, self._timed_out,
                                                   "Connection time limit exceeded")
        if connector.tls_mode == "Implicit":
            # TLS from the first byte; the banner once the handshake is done
            # (written before, it would count as unread replies and stop
            # the reading that the handshake needs)
            self.transport.startTLS(self.ctx.tls[connector.name])
            self.session.tls = True
            return
        self._greet()

    def _count_auth(self, outcome: str) -> None:
        if self.ctx.metrics is not None:
            self.ctx.metrics.auth.labels(self.connector.name, outcome).inc()

    def _count_tls(self, outcome: str) -> None:
        if self.ctx.metrics is not None and self.connector is not None:
            self.ctx.metrics.tls.labels(self.connector.name, "receive", outcome).inc()

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake is done (of STARTTLS, or of an implicit-TLS session)."""
        self._handshaken = True
        self._count_tls("ok")
        if self._closing or self.connector is None:
            return
        if self.connector.tls_mode == "Implicit" and not self._greeted:
            # implicit TLS: the stages see on_connect with session.tls already true
            return self._greet()
        if self._stages_on:
            verdict = self.ctx.pipeline.run("on_starttls", self.session)
            if isinstance(verdict, defer.Deferred):
                self.flow.hold()     # the client's EHLO waits for the stages' word on the handshake
                verdict.addCallback(self._tls_verdict, held=True)
                verdict.addErrback(self._broken)
            else:
                self._tls_verdict(verdict, held=False)

    def _tls_verdict(self, verdict, held: bool) -> None:
        if self._closing:
            return
        if verdict.final:
            # nothing to answer after a handshake: any refusal ends the session
            reply = verdict_reply(verdict, self.plog.info)
            return self._refuse(Reply(421, "4.7.0" if verdict.kind != "disconnect" else reply.status, reply.text))
        if held:
            self.flow.release()

    def _greet(self) -> None:
        self._greeted = True
        if self.ctx.pipeline:
            # the stages see the connection first; the banner waits for them
            self._stages_on = True
            verdict = self.ctx.pipeline.run("on_connect", self.session)
            if isinstance(verdict, defer.Deferred):
                self.flow.hold()
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
            reply = verdict_reply(verdict, self.plog.info)
            code = reply.code if verdict.kind == "reject" else 421
            return self._refuse(Reply(code, reply.status, reply.text))
        self._banner()
        if held:
            self.flow.release()

    def _banner(self) -> None:
        # a client that does not read its replies stops being read
        self.flow.watch_replies()
        banner = self.connector.banner or f"220 {self.fqdn} exedge ESMTP service ready"
        self._write((banner if banner.startswith("220") else f"220 {banner}").encode("ascii", "replace") + b"\r\n")

    def _refuse(self, reply: Reply) -> None:
        if not self._tls_pending:
            self._write(reply.encode())
        self._close()

    @property
    def _tls_pending(self) -> bool:
        """TLS has started and its handshake is not done: nothing can be said to the client."""
        return self.session.tls and not self._handshaken

    def _close(self) -> None:
        """
        End the session: no more reading or answering, and the connection
        closed after what was written (aborted if it does not go: L{Flow.end});
        at once while a TLS handshake is pending (Twisted's TLS layer would
        keep the bytes and the connection for ever).
        """
        if self.flow.ending:
            return
        self._closing = True
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        if self.reader is not None:
            self._drop_message()         # a timeout in the data phase: no final dot can come now
        if self._tls_pending:
            return self._abort("TLS handshake not done; connection aborted")
        self.flow.end()

    def _abort(self, why: str | None) -> None:
        """Drop the connection now, whatever is still unsent (the slot is freed in connectionLost)."""
        self._closing = True
        self.flow.abort(why)

    def readConnectionLost(self) -> None:
        """
        IHalfCloseableProtocol: the client closed its sending side but may
        still read. Exim sends the final dot and QUIT, then does this: every
        command already received is answered, in order, and then the session
        closes (L{_input_done}). Plain TCP only: Twisted's TLS layer takes
        the end of input for the end of the connection.
        """
        if self._turned is not None:
            # the site, the turned session's server, has finished sending: its session is over
            return self.transport.abortConnection()
        if self._closing:
            return
        self._input_ended = True
        self.flow.end_of_input()
        self._input_done()

    def writeConnectionLost(self) -> None:
        """IHalfCloseableProtocol: our sending side closed (we never close it alone)."""

    def _input_done(self) -> None:
        """
        After the client's end of input, once every command it sent has been
        answered: close. An unfinished command line or message is dropped,
        unanswered (no final dot: nothing is queued).
        """
        if not self._input_ended or self._closing or self.paused or self._busyReceiving:
            return
        if self.reader is not None:
            self.plog.info("client closed its side in the middle of the message data; message discarded")
            self._drop_message()
            self.txn = None
        elif self._buffer or self._discarding:
            self.plog.info("client closed its side in the middle of a command line; not answered")
        self._close()

    def connectionLost(self, reason=None) -> None:
        if self._turned is not None:
            self._turned.connectionLost(reason)
        self._closing = True
        if self.session.tls and not self._handshaken:
            self._count_tls("failed")
        self.flow.lost()
        for call in (self._idle_call, self._life_call):
            if call is not None and call.active():
                call.cancel()
        self._drop_message()
        if self._admitted:
            self._admitted = False
            self.ctx.connectors.release(self.connector, self.peer_host)
            if self.ctx.metrics is not None:
                self.ctx.metrics.session_closed(self.connector.name)
        if self.plog is not None:
            self.plog.disconnect()
        if self._stages_on:
            self.ctx.pipeline.run("on_disconnect", self.session)   # verdict ignored; failures are logged

    def _arm_idle(self) -> None:
        self._idle_call = self.ctx.clock.callLater(self.connector.connection_inactivity_timeout,
                                                   self._timed_out, "Timeout waiting for client input", True)

    def _timed_out(self, text: str, idle: bool = False) -> None:
        if self._closing:
            if not idle:
                # the session's time is up and its close has not finished:
                # connection_timeout bounds the whole connection
                self._abort(f"{text} while closing; connection aborted")
            return
        reply = Reply(421, "4.4.2", f"{self.fqdn} {text}, closing transmission channel")
        if self.flow.answer_pending:
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

    def dataReceived(self, data: bytes) -> None:
        if self._turned is not None:
            return self._turned.dataReceived(data)
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
        self.flow.update()
        if self._input_ended:
            self._input_done()

    def lineLengthExceeded(self, data: bytes) -> None:
        end = data.find(b"\r\n")
        if end >= 0:
            self._buffer = data[end + 2:] + self._buffer
            self._overflowed = True
        elif data.endswith(b"\r"):
            self._buffer = b"\r"   # its LF may come in the next chunk and end the line
        if not self._discarding:
            self.replies.answer(syntax_error("Line too long", "5.5.2", 500))
        self._discarding = end < 0

    def lineReceived(self, line: bytes) -> None:
        if self._closing:
            return
        if self._discarding:          # the end of an over-long line
            self._discarding = False
            return
        if self.sasl is not None and self.sasl.expecting:
            self.plog.received(b"(authentication data)")      # never a password in the log
            return self.replies.answer(self.sasl.respond(line.decode("latin-1").strip(" ")))
        if line[:5].upper() == b"AUTH ":
            self.plog.received(b" ".join(line.split(b" ")[:2]) + b" ...")
        else:
            self.plog.received(line)
        self.replies.answer(self._command(line))

    def rawDataReceived(self, data: bytes) -> None:
        if self._rate is not None:
            self._rate.read(len(data), self.ctx.clock.seconds())
        done, rest = self.reader.feed(data)
        if not done:
            if self.draft.backlogged:
                # the disk is slower than the client: stop reading until it catches up
                self.flow.wait_for_disk(self.draft)
            return
        reader, self.reader = self.reader, None
        self.setLineMode(rest)   # buffered: handled once this answer is out
        self.replies.answer(self._end_of_data(reader))

    # -- answering -----------------------------------------------------------

    def _internal_error(self, failure) -> Reply:
        log.failure("session {session}: internal error", failure, session=self.session_id)
        return Reply(451, "4.3.0", "Temporary server error; please try again later")

    def _broken(self, failure) -> None:
        """A bug after the answer: never leave the session paused for ever."""
        log.failure("session {session}: dropping the connection", failure, session=self.session_id)
        self._abort(None)

    def _tarpit_delay(self, reply: Reply) -> float:
        """Errors wait tarpit_interval for peers we do not trust (without the authentication flag)."""
        if Right.AcceptAuthenticationFlag not in self.session.permissions:
            return self.connector.tarpit_interval
        return 0

    def _send_reply(self, reply: Reply) -> bool:
        """Write C{reply}; whether the session goes on."""
        if self._closing:
            return False
        self._write(reply.encode())
        if reply.after is not None:
            reply.after()
            if self._turned is not None:
                return False             # the connection carries another session now
        if self._close_after_answer is not None:
            self.plog.info(self._close_after_answer.text)
            self._refuse(self._close_after_answer)
            return False
        if reply.protocol_error:
            self.errors += 1
            limit = self.connector.max_protocol_errors
            if limit and self.errors >= limit:
                self.plog.info(f"{self.errors} protocol errors")
                self._refuse(Reply(421, "4.7.0", "Too many errors on this connection, closing transmission channel"))
                return False
        if reply.close:
            self._close()
            return False
        return True

    # -- commands ------------------------------------------------------------

    def _command(self, line: bytes):
        if any(b in line for b in _BAD_COMMAND_BYTES):
            return syntax_error("Invalid characters in command (bare CR, LF or NUL)", "5.5.2", 500)
        verb, _, arg = line.partition(b" ")
        if self._stages_on and verb.isalpha():
            stage_verb = self.ctx.pipeline.verb(self.session, verb.decode("ascii").upper())
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
        before = (self._txn, self.session.helo, self.esmtp)
        self.txn = None
        self.session.helo, self.esmtp = arg, esmtp
        if self.session.tls and self._identity is None:
            partners = self.security.partners()
            if partners:
                self.session.permissions = session_permissions(self.connector.permission_groups,
                                                       self.connector.auth_mechanisms,
                                                       authenticated_as=(Principal.PartnerServers,))
                self.plog.info(f"domain secure partner {', '.join(partners)}; rights: {self.session.permissions.explain()}")
        greeting = f"{self.fqdn} Hello [{self.peer_host}]"
        reply = Reply(250, None, greeting, more=tuple(self._extensions()) if esmtp else ())
        # RFC 5321 §4.1.4: a refused EHLO leaves the session as it was (its transaction and greeting)
        return self._staged("on_helo", reply, (arg,), undo=lambda: self._unhello(*before))

    def _unhello(self, txn, helo, esmtp) -> None:
        self.txn, self.session.helo, self.esmtp = txn, helo, esmtp

    def _extensions(self) -> list[str]:
        c = self.connector
        size = "SIZE" if Right.BypassMessageSizeLimit in self.session.permissions else f"SIZE {c.max_message_size}"
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
            ext.append("AUTH " + " ".join(mechanisms(self.ctx.portal)))
        if self._stages_on:
            ext.extend(self.ctx.pipeline.ehlo_keywords(self.session))
        return ext

    # -- STARTTLS (RFC 3207) -------------------------------------------------

    def _tls_offered(self) -> bool:
        return (not self.session.tls and "Tls" in self.connector.auth_mechanisms
                and self.connector.name in self.ctx.tls)

    def do_STARTTLS(self, arg: str):
        if self.session.tls:
            return bad_sequence("TLS already active")
        if not self._tls_offered():
            return self._not_offered(arg)
        if arg:
            return syntax_error("Syntax: STARTTLS")
        if self.session.helo is None or not self.esmtp:
            return bad_sequence("Send EHLO first", "5.5.1")
        # whatever the client sent after STARTTLS in plain text is not
        # trusted and never read (CVE-2011-0411): LineReceiver takes its
        # next line from this buffer, so emptying it here stops it
        self.clearLineBuffer()
        self._discarding = self._overflowed = False
        return Reply(220, "2.0.0", "SMTP server ready", after=self._start_tls)

    def _start_tls(self) -> None:
        self.transport.startTLS(self.ctx.tls[self.connector.name])
        self.session.tls = True
        # RFC 3207 §4.2: the client starts over, knowing nothing
        self.session.helo, self.esmtp, self.txn, self.identity = None, False, None, None
        self.session.permissions = session_permissions(self.connector.permission_groups, self.connector.auth_mechanisms)
        self.plog.info("STARTTLS: TLS negotiation started")

    # -- AUTH (RFC 4954; the dialogue is exedge.receive.sasl) ---------------------

    def _auth_offered(self) -> bool:
        mechs = self.connector.auth_mechanisms
        if "BasicAuth" not in mechs or self.ctx.portal is None:
            return False
        return self.session.tls or "BasicAuthRequireTLS" not in mechs

    def do_AUTH(self, arg: str):
        mechs = self.connector.auth_mechanisms
        if not self._auth_offered():
            if "BasicAuthRequireTLS" in mechs and self.ctx.portal is not None and not self.session.tls:
                return Reply(538, "5.7.11", "Encryption required for requested authentication mechanism",
                             protocol_error=True, tarpit=True)
            return self._not_offered(arg)
        if self.session.helo is None or not self.esmtp:
            return bad_sequence("Send EHLO first")
        if self._identity is not None:
            return bad_sequence("Already authenticated")
        if self._txn is not None:
            return bad_sequence("AUTH not permitted during a mail transaction")
        mechanism, _, initial = arg.partition(" ")
        if not mechanism:
            return syntax_error("Syntax: AUTH mechanism [initial-response]")
        if self.sasl is None:
            c = self.connector
            self.sasl = AuthDialogue(self.ctx.portal, self.ctx.clock, max_failures=c.max_logon_failures,
                                     tarpit=c.auth_tarpit_interval, note=self.plog.info,
                                     session_id=self.session_id, authenticated=self._authenticated, host=self.fqdn,
                                     outcome=self._count_auth)
        return self.sasl.begin(mechanism.upper(), initial.strip(" "))

    def _authenticated(self, identity):
        self.identity = identity
        self.session.permissions = session_permissions(self.connector.permission_groups, self.connector.auth_mechanisms,
                                               authenticated_as=identity.principals)
        self.plog.info(f"authenticated as {identity.name}; rights: {self.session.permissions.explain()}")
        reply = Reply(235, "2.7.0", "Authentication successful")
        return self._staged("on_auth", reply, (identity.name,), undo=self._unauthenticate)

    def _unauthenticate(self) -> None:
        """A stage refused the authenticated user: back to the rights of an anonymous session."""
        self.identity = None
        self.session.permissions = session_permissions(self.connector.permission_groups, self.connector.auth_mechanisms)

    # -- the mail transaction ------------------------------------------------

    def do_MAIL(self, arg: str) -> Reply:
        if self.session.helo is None:
            return bad_sequence("Send hello first", "5.5.2")
        if self._txn is not None:
            return bad_sequence("Sender already specified")
        if not arg[:5].upper() == "FROM:":
            return syntax_error("Syntax: MAIL FROM:<address> [parameters]")
        if Right.Submit not in self.session.permissions:
            return Reply(530, "5.7.1", "Client was not authenticated", tarpit=True)
        refusal = checks.back_pressure_refusal(self.ctx.back_pressure, self.session.permissions,
                                               self._identity is not None)
        if refusal is not None:
            return self._pressure_refused(refusal, "back pressure: new mail refused")
        try:
            sender, params = parse_mail(arg[5:], self.esmtp)
        except CommandRefused as e:
            return e.reply
        if params.size is not None and params.size > checks.size_limit(self.connector, self.session.permissions):
            return Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        refusal = checks.storage_refusal(self.ctx.back_pressure, params.size)
        if refusal is not None:
            return self._pressure_refused(refusal, f"SIZE={params.size} more than the spool can take now: refused")
        refusal = self.security.check_sender(sender, self.session.tls) or \
            checks.spoofing_refusal(sender, self.session.permissions, self.ctx.router, self._identity is not None)
        if refusal is not None:
            return refusal
        self.txn = Transaction(sender, params.size, params.body, params.ret, params.envid,
                               checks.passed_auth(params.auth, self.session.permissions, self._identity))
        return self._staged("on_mail", Reply(250, "2.1.0", "Sender OK"), (str(sender) if sender else "",),
                            undo=lambda: setattr(self, "txn", None))

    def do_RCPT(self, arg: str) -> Reply:
        if self._txn is None:
            return bad_sequence("Need MAIL before RCPT")
        if not arg[:3].upper() == "TO:":
            return syntax_error("Syntax: RCPT TO:<address> [parameters]")
        try:
            mailbox, params = parse_rcpt(arg[3:].lstrip(" "), self.esmtp,
                                         lambda: checks.postmaster_domain(self.ctx.router, self.fqdn))
        except CommandRefused as e:
            return e.reply
        if len(self._txn.recipients) >= self.connector.max_recipients_per_message:
            return Reply(452, "4.5.3", "Too many recipients")
        refusal = checks.relay_refusal(mailbox, self.session.permissions, self.ctx.router, self.plog.info)
        if refusal is not None:
            return refusal
        address = f"{mailbox.local}@{mailbox.domain}"
        self._txn.recipients.append(Recipient(address, params.notify, params.orcpt))
        self.session.recipients.append(address)
        return self._staged("on_rcpt", Reply(250, "2.1.5", "Recipient OK"), (address,),
                            undo=self._drop_last_recipient)

    def _drop_last_recipient(self) -> None:
        self._txn.recipients.pop()
        self.session.recipients.pop()

    def do_DATA(self, arg: str) -> Reply:
        if arg:
            return syntax_error("Syntax: DATA")
        if self._txn is None:
            return bad_sequence("Need MAIL command")
        if not self._txn.recipients:
            return Reply(554, "5.5.1", "No valid recipients", protocol_error=True)
        if self._stages_on:
            return then(self.ctx.pipeline.run("on_data", self.session),
                        lambda v: verdict_reply(v, self.plog.info) if v.final else self._start_data())
        return self._start_data()

    def _start_data(self) -> Reply:
        if self._closing:
            # a stage's on_data answered after the session ended: no message, no slot (nobody hears this)
            return Reply(421, "4.4.2", "Session closing")
        limit = self.ctx.connectors.admit_data(self.connector, self.peer_host, self)
        if limit is not None:
            # RFC 5321 leaves the transaction as it was after a refused DATA
            # (only the end of data, RSET, HELO/EHLO and STARTTLS clear it):
            # the client may send DATA again later, or RSET
            self.plog.info(f"{limit} reached: DATA refused")
            self._count_data_refused("source_limit" if limit.endswith("_per_source") else "connector_limit")
            return Reply(451, "4.3.2", "Too many messages arriving at once; try again later")
        self._data_slot = True
        if self.connector.min_inbound_data_rate:
            self._rate = DataRate(self.connector.min_inbound_data_rate, self.ctx.clock.seconds())
        identity = self._identity
        trace = Trace(helo=self.session.helo, peer_host=self.peer_host, peer_port=self.transport.getPeer().port,
                      by=self.fqdn, connector=self.connector.name, session=self.session_id,
                      protocol=with_protocol(self.esmtp, self.session.tls, identity is not None),
                      tls=self.security.describe() if self.session.tls else None)
        self.draft = self.ctx.cleanup.open(trace, note=self.plog.info)
        c = self.connector
        self.reader = DataReader(self.draft.write, max_size=checks.size_limit(c, self.session.permissions),
                                 max_header_size=c.max_header_size, max_hop_count=c.max_hop_count)
        self.setRawMode()
        return Reply(354, None, "Start mail input; end with <CRLF>.<CRLF>")

    def _end_of_data(self, reader: DataReader):
        self._data_over(finished=True)
        txn, self.txn = self._txn, None
        draft, self.draft = self.draft, None
        if reader.error is not None:
            draft.abort()
            code, status, text = reader.error
            self.plog.info(f"message refused: {code} {status} {text}")
            return Reply(code, status, text)
        # the reader refused bare CR and LF: its data is in wire form unless a line began with "."
        wire_form = not reader.dot_lines
        if not self._stages_on:
            return then(self.ctx.cleanup.commit(txn, None, draft, header=reader.header, wire_form=wire_form),
                        self._receipt)
        message = Message(str(txn.sender) if txn.sender else "", [r.address for r in txn.recipients],
                          reader.header, reader.size, read=draft.client_bytes, queue_id=draft.queue_id)
        run = self.ctx.pipeline.run
        verdict = then(run("on_headers", self.session, message),
                       lambda v: v if v.final else run("on_message", self.session, message))
        return then(verdict, self._message_verdict, txn, message, draft, reader.header, wire_form)

    def _message_verdict(self, verdict, txn, message, draft, header=b"", wire_form=False):
        if verdict.final:
            draft.abort()
            return verdict_reply(verdict, self.plog.info)
        return then(self.ctx.cleanup.commit(txn, message, draft, header=header, wire_form=wire_form),
                    self._receipt)

    def _receipt(self, receipt) -> Reply:
        # no log line of its own: cleanup wrote the one line per message
        # (queue id, session id, sender, size, Message-ID) when it queued it
        if receipt.queued and self._stages_on:
            self.ctx.pipeline.run("on_queued", self.session, receipt.queue_id)   # verdict ignored
        return Reply(receipt.code, receipt.status, receipt.text, tarpit=receipt.tarpit)

    def _data_over(self, finished: bool = False) -> None:
        """The data phase has ended, however it ended (C{finished}: at the final dot): the DATA slot is free again."""
        self._rate = None
        if self._data_slot:
            self._data_slot = False
            self.ctx.connectors.release_data(self.connector, self.peer_host, self, finished)

    def _pressure_refused(self, refusal: Reply, note: str) -> Reply:
        """A MAIL FROM refused for back pressure (its level, or SIZE= against free space): logged and counted."""
        self.plog.info(note)
        if self.ctx.metrics is not None:
            self.ctx.metrics.pressure_refused.labels(self.connector.name).inc()
        return refusal

    def _count_data_refused(self, reason: str) -> None:
        if self.ctx.metrics is not None:
            self.ctx.metrics.data_refused.labels(self.connector.name, reason).inc()

    # -- IDataSession: the connector table may evict a slow session in DATA ---------

    def data_credit(self) -> float:
        """
        The data-rate credit of this session's slot; infinite when it may
        not be evicted: no rate applies, the session is ending anyway, or
        the server stopped reading it while the disk catches up (then the
        slowness is ours, not the client's).
        """
        if self._rate is None or self._closing or self.flow.disk_blocked:
            return float("inf")
        return self._rate.credit(self.ctx.clock.seconds())

    def evict_slow(self) -> None:
        """
        A newcomer's DATA needs this session's slot and this client has
        sent below min_inbound_data_rate: 421 (as Postfix answers its own
        smtpd_min_data_rate deadline: 4.4.2, RFC 3463's "bad connection ...
        time-out, or inadequate connection quality"), the message dropped
        (nothing partial stays in the spool), the connection closed, and
        the slot given back before this returns.
        """
        rate = self._rate
        if rate is not None:
            seconds = self.ctx.clock.seconds() - rate.since
            self.plog.info(f"data rate below min_inbound_data_rate ({self.connector.min_inbound_data_rate} octets/s): "
                           f"{rate.octets} octets in {seconds:.0f} s; evicted for another session's DATA, "
                           "message discarded")
        self._count_data_refused("evicted_slow")
        if not self._closing:
            self._refuse(Reply(421, "4.4.2", f"{self.fqdn} Data rate too low, closing connection"))
        self._drop_message()          # at once, also if a close was already under way
        self.txn = None

    def _drop_message(self) -> None:
        """The data phase ends without a final dot (end of input, timeout, lost connection): nothing is queued."""
        self.reader = None
        if self.draft is not None:
            self.draft.abort()
            self.draft = None
        self._data_over()

    def do_RSET(self, arg: str) -> Reply:
        if arg:
            return syntax_error("Syntax: RSET")
        self.txn = None
        return Reply(250, "2.0.0", "Resetting")

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

    # -- the pipeline ----------------------------------------------------------

    def _verb_reply(self, verdict) -> Reply:
        """A stage verb's answer; one that turns the connection over (ATRN) does so once it is written."""
        reply = verb_reply(verdict, self.plog.info)
        if verdict.turn is not None and verdict.kind == "ok":
            reply = attrs.evolve(reply, after=lambda: self._turn(verdict.turn()))
        return reply

    def _turn(self, protocol) -> None:
        """
        ATRN or TURN: from now on this connection carries a session in the
        other direction (C{protocol}, our SMTP client); this session only
        forwards to it what arrives, and ends with the connection. The
        client's own timeouts bound it; when its C{result} fires, the
        connection is closed with the same grace as any session's end.
        """
        self.plog.info("the connection is turned round: we deliver, the client receives")
        for call in (self._idle_call, self._life_call):
            if call is not None and call.active():
                call.cancel()
        self.flow.close()                # no more reading decisions of ours: the client's producer
        self._turned = protocol
        pending, self._buffer = self._buffer, b""
        protocol.makeConnection(self.transport)
        if pending:
            protocol.dataReceived(pending)
        # when the turned session is over, the connection goes as ours would:
        # closed, and aborted if the site does not let it go (close_notify unanswered)
        result = getattr(protocol, "result", None)
        if isinstance(result, defer.Deferred):
            result.addBoth(lambda outcome: (self.flow.end(), outcome)[1])

    def _staged(self, hook: str, reply: Reply, args: tuple, undo=None):
        """C{reply} once the stages agree with it; their verdict's reply (and C{undo}) if not."""
        if not self._stages_on:
            return reply

        def decide(verdict):
            if not verdict.final:
                return reply
            if undo is not None:
                undo()
            return verdict_reply(verdict, self.plog.info)

        return then(self.ctx.pipeline.run(hook, self.session, *args), decide)

