"""
exedge's ESMTP client: one connection to a next hop, several messages.

Written on C{basic.LineReceiver} rather than taken from
C{twisted.mail.smtp.ESMTPClient}, which dot-stuffs per 16 KiB chunk (a "."
line at a chunk boundary ends DATA early and smuggles the rest as
commands), treats any 2xx to MAIL as success with no recipients, has no
PIPELINING, SIZE or DSN parameters, and no timeout in C{sendmail}
(research §2). Here:

  - the message is dot-stuffed in one pass over the whole body, so there
    are no chunk boundaries to get wrong, and bare CR or LF are turned into
    CRLF first (never forward a smuggling vector);
  - PIPELINING (RFC 2920) sends MAIL, every RCPT and DATA in one write and
    reads the replies in order; without it, one command at a time;
  - SIZE (RFC 1870): a message over the peer's limit is refused locally
    with 5.3.4 and never sent; DSN (RFC 3461) parameters are passed on
    when offered; 8BITMIME declared when the body needs it and it is offered;
  - every recipient gets its own outcome: delivered, failed (5xx) or
    deferred (4xx, timeouts, connection trouble), with the reply quoted
    as received for the NDR's Diagnostic-Code;
  - STARTTLS when offered: a refusal is passed over in plain text unless
    TLS is required; a failed handshake is reported (C{tls_failed}) for
    the caller to try the same host in plain text; whatever came in the
    packet of the 220 is discarded, never read as if from inside TLS;
  - RFC 5321 §4.5.3.2 timeouts, from the injected clock.

The caller owns the connection attempt (endpoints, smart-host failover,
MX order); this protocol reports through L{SessionResult}. A caller that
keeps connections open for later messages (a connection cache, as Postfix's
smtp does) gives a C{source} to ask for more once the first messages are
done, and an C{on_settled} to hear of each message as soon as it is done.
"""

from __future__ import annotations

import base64
import enum
import re

import attrs
from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.protocols import basic
from twisted.python.failure import Failure

from exedge.interfaces import WireForm, crlf_only
from exedge.writethrough import write_through

log = Logger()

MAX_REPLY_LINE = 2048
MAX_REPLY_LINES = 100
_REPLY_RE = re.compile(rb"^([2-5][0-9][0-9])([ -])(.*)$")
_STATUS_RE = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s*(.*)$")


@attrs.frozen
class Timeouts:
    """RFC 5321 §4.5.3.2 values, in seconds."""

    greeting: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    other: float = 300.0

    def capped(self, limit: float) -> "Timeouts":
        """No wait longer than C{limit} (a connector's connection_inactivity_timeout)."""
        return Timeouts(*(min(getattr(self, f.name), limit) for f in attrs.fields(Timeouts)))


@attrs.frozen
class OutboundRecipient:
    address: str
    notify: tuple[str, ...] = ()
    orcpt: str | None = None
    key: object = None                # the caller's handle, carried to the result


@attrs.frozen
class OutboundMessage:
    sender: str                       # "" for the null reverse-path
    recipients: tuple[OutboundRecipient, ...]
    data: bytes                       # the message, CRLF line ends, not dot-stuffed
    ret: str | None = None
    envid: str | None = None
    key: object = None                # the caller's handle (e.g. a queue id)
    auth: str | None = None           # RFC 4954 AUTH= to pass on, xtext or "<>"


class Status(enum.Enum):
    delivered = "delivered"
    failed = "failed"
    deferred = "deferred"


@attrs.frozen
class RecipientResult:
    address: str
    status: Status
    code: int
    enhanced: str
    text: str
    key: object = None                # the OutboundRecipient's
    # the reply exactly as the next hop sent it ("550 No such user here"),
    # for the NDR's Diagnostic-Code; "" when the outcome is ours (a
    # timeout, a lost connection, a size refused before sending)
    reply: str = ""


@attrs.define
class MessageResult:
    message: OutboundMessage
    recipients: list[RecipientResult] = attrs.field(factory=list)


@attrs.define
class SessionResult:
    """What one connection achieved; C{error} says why it stopped early."""

    messages: list[MessageResult] = attrs.field(factory=list)
    greeting: str = ""
    extensions: dict = attrs.field(factory=dict)
    error: str | None = None          # connection-level failure text
    error_code: int = 0               # its SMTP code when there was one (421, 554, ...)
    untried: list = attrs.field(factory=list)   # messages past the per-connection limit
    started: bool = False             # a transaction began (else: greeting, EHLO, TLS or AUTH failed)
    tls: bool = False                 # the session ran inside STARTTLS
    authenticated: bool = False
    # STARTTLS was accepted with 220, then the session ended before a
    # single reply came inside TLS: the handshake failed (or the peer hung
    # up or went silent in it), and nothing was sent to the peer inside TLS
    tls_failed: bool = False


@attrs.frozen
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def received(self) -> str:
        """
        The reply as the peer sent it, its lines joined by a space, each
        with its code ("550-5.1.1 first 550 5.1.1 last", as Postfix quotes
        a multi-line reply): nothing added, nothing taken away.
        """
        last = len(self.lines) - 1
        return " ".join(f"{self.code}{'-' if i < last else ' '}{line}" for i, line in enumerate(self.lines))

    def status(self) -> tuple[str, str]:
        """(enhanced status, text), the status defaulted from the class."""
        m = _STATUS_RE.match(self.lines[0] if self.lines else "")
        if m and m.group(1)[0] == str(self.code)[0]:
            return m.group(1), " ".join((m.group(2),) + self.lines[1:]).strip()
        return f"{str(self.code)[0]}.0.0", self.text

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


def dot_stuff(data: bytes) -> bytes:
    """
    The DATA section as sent: CRLF line ends only, every line starting with
    "." doubled (RFC 5321 §4.5.2), a final CRLF, then the end marker.
    """
    if type(data) is WireForm:
        # in wire form already, as known where it was received: the scans below
        # cost a 100 KiB message about 250 µs (bench/README.md, "Wire form")
        return data + b".\r\n"
    # the scans of a 100 KiB message cost more than the rest of this
    # function: copy only when there is something to change
    if not crlf_only(data):
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    if b"\r\n." in data:
        data = data.replace(b"\r\n.", b"\r\n..")
    return data + b".\r\n"


def _settle(result: MessageResult, recipients, reply: Reply, temporary=()) -> None:
    """The reply decides these recipients: 250 delivered, 5xx failed, else deferred."""
    enhanced, text = reply.status()
    if reply.code == 250:
        status = Status.delivered
    elif reply.code >= 500 and reply.code not in temporary:
        status = Status.failed
    else:
        status = Status.deferred
    result.recipients += [RecipientResult(r.address, status, reply.code, enhanced, text, r.key, reply.received)
                          for r in recipients]


class SMTPClient(basic.LineReceiver):
    """
    Deliver C{messages} over one connection; C{result} fires with a
    L{SessionResult} once the session ends, whatever happened.
    """

    delimiter = b"\n"             # tolerate a peer's bare LF; CR stripped below
    MAX_LENGTH = MAX_REPLY_LINE

    def __init__(self, messages, *, helo: str, clock, timeouts: Timeouts = Timeouts(),
                 max_messages: int | None = None, source=None, on_settled=None,
                 tls=None, tls_required: bool = False, credentials=None, auth_requires_tls: bool = True,
                 peer: str = "", protocol_log=None):
        """
        C{source(room)}: asked for more messages whenever these are done and
        the per-connection limit leaves C{room} (None: no limit); returns a
        Deferred firing with a list, empty to end the session. It is
        cancelled if the connection is lost while it waits, and must then
        keep what it had meant to give.

        C{on_settled(MessageResult)}: called for each message once every one
        of its recipients has an outcome, in a session that got past EHLO.

        C{tls}: client TLS options for STARTTLS when offered (None: never);
        with C{tls_required}, a peer without it ends the session before any
        mail. C{credentials}: (user, password) for AUTH PLAIN or LOGIN, sent
        only inside TLS unless C{auth_requires_tls} is false. A certificate
        that fails validation ends the handshake, so nothing (credentials
        least of all) is ever written to an unverified peer. C{peer}: the
        next hop as the log names it ("mx1.contoso.com", "10.0.0.5:2525").
        C{protocol_log(local, remote)}: the session's
        L{exedge.logs.ProtocolLog} (a Verbose send connector's), made once
        connected; None: no protocol log.
        """
        self.peer = peer
        self.protocol_log = protocol_log
        self.plog = None
        self.tls = tls
        self.tls_required = tls_required
        self.credentials = credentials
        self.auth_requires_tls = auth_requires_tls
        self.queue = list(messages)
        self.source = source
        self.on_settled = on_settled
        self._feeding = None
        self._reported = 0
        self.helo = helo
        self.clock = clock
        self.timeouts = timeouts
        self.max_messages = max_messages
        self.result = defer.Deferred()
        self.session = SessionResult()
        self._lines: list[str] = []
        self._waiting: list = []        # (what, on_reply, timeout) in the order replies are due
        self._timer = None
        self._done = False
        self._sent = 0
        self._current: list[MessageResult] = []
        self._handshaking = False       # STARTTLS accepted, no reply yet from inside TLS

    @property
    def tls_optional(self) -> bool:
        """
        May this session do without TLS? Not when TLS is required for the
        hop, nor when credentials may only be sent inside it. A caller
        whose STARTTLS handshake failed may then try the same host again
        in plain text (L{SessionResult.tls_failed}).
        """
        return not self.tls_required and not (self.credentials is not None and self.auth_requires_tls)

    # -- plumbing ------------------------------------------------------------

    def connectionMade(self) -> None:
        if self.protocol_log is not None:
            local, remote = self.transport.getHost(), self.transport.getPeer()
            self.plog = self.protocol_log(f"{getattr(local, 'host', '')}:{getattr(local, 'port', '')}",
                                          f"{getattr(remote, 'host', '')}:{getattr(remote, 'port', '')}")
            self.plog.connect(self.peer)
        self._expect("greeting", self._on_greeting, self.timeouts.greeting)

    def _send(self, line: str, shown: str | None = None) -> None:
        """Write one command; C{shown} is what the protocol log says instead (never a credential)."""
        data = line.encode("ascii") + b"\r\n"
        if self.plog is not None:
            self.plog.sent((shown or line).encode("ascii", "replace"))
        write_through(self.transport, data)

    def _expect(self, what: str, on_reply, timeout: float) -> None:
        self._waiting.append((what, on_reply, timeout))
        self._arm(timeout)

    def _arm(self, timeout: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self.clock.callLater(timeout, self._timed_out)

    def _timed_out(self) -> None:
        what = self._waiting[0][0] if self._waiting else "reply"
        self._fail_session(f"timeout waiting for the {what} reply", 0)
        self.transport.abortConnection()

    def lineReceived(self, line: bytes) -> None:
        if self._done:
            return
        self._handshaking = False       # a line came through TLS: the handshake is done
        line = line.rstrip(b"\r")
        if b"\r" in line or b"\x00" in line:
            return self._protocol_error("bare CR or NUL in a reply")
        m = _REPLY_RE.match(line)
        if not m or not self._waiting:
            return self._protocol_error(f"unexpected line {line[:80]!r}")
        code, more, text = int(m.group(1)), m.group(2) == b"-", m.group(3).decode("utf-8", "replace")
        self._lines.append(text)
        if len(self._lines) > MAX_REPLY_LINES:
            return self._protocol_error("reply too long")
        if more:
            return
        if self.plog is not None:
            self.plog.received(line)
        reply, self._lines = Reply(code, tuple(self._lines)), []
        _, on_reply, _ = self._waiting.pop(0)
        if self._waiting:
            self._arm(self._waiting[0][2])     # the wait RFC 5321 gives the next reply due
        elif self._timer is not None and self._timer.active():
            self._timer.cancel()
        on_reply(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._handshaking = False
        self._protocol_error("reply line too long")

    def _protocol_error(self, why: str) -> None:
        self._fail_session(f"protocol error: {why}", 0)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        if self.plog is not None:
            self.plog.disconnect()
            self.plog = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._feeding is not None:
            self._feeding.cancel()     # the source keeps what it was about to give
        if not self._done:
            why = "connection lost"
            if reason is not None and not reason.check(error.ConnectionDone):
                why = f"connection lost: {reason.getErrorMessage()}"
            self._fail_session(why, 0)

    def _fail_session(self, why: str, code: int) -> None:
        """
        Stop: every recipient not yet answered for is deferred. Before any
        transaction that is every message (the caller may try another
        host); after, messages not yet begun go back untried.
        """
        if self._done:
            return
        self.session.error, self.session.error_code = why, code
        self.session.tls_failed = self._handshaking
        waiting = self.queue if not self.session.started else []
        for message in self._current + waiting:
            self._defer_rest(message, 451, "4.4.2", why)
        if self.session.started:
            self.session.untried += self.queue
        self._current, self.queue = [], []
        self._finish()

    def _defer_rest(self, entry, code: int, enhanced: str, text: str) -> None:
        result = entry if isinstance(entry, MessageResult) else self._result_for(entry)
        answered = {(r.key, r.address) for r in result.recipients}
        for rcpt in result.message.recipients:
            if (rcpt.key, rcpt.address) not in answered:
                result.recipients.append(RecipientResult(rcpt.address, Status.deferred, code, enhanced, text,
                                                         rcpt.key))

    def _result_for(self, message: OutboundMessage) -> MessageResult:
        result = MessageResult(message)
        self.session.messages.append(result)
        return result

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.session.started:
            self._report()
        self.result.callback(self.session)

    def _report(self) -> None:
        """Tell the caller of each message that is done and not yet told of."""
        while self.on_settled is not None and self._reported < len(self.session.messages):
            self._reported += 1
            self.on_settled(self.session.messages[self._reported - 1])

    def _ask_source(self) -> None:
        room = None if self.max_messages is None else self.max_messages - self._sent
        self._feeding = d = defer.maybeDeferred(self.source, room)

        def fed(messages):
            self._feeding = None
            if not messages:
                self.source = None       # nothing more: end the session
            self.queue.extend(messages)
            self._next_message()

        def failed(f):
            self._feeding = None
            if not f.check(defer.CancelledError):
                self.source = None
                self._quit_after(f"asking for more messages: {f.getErrorMessage()}", 0)

        d.addCallbacks(fed, failed)

    # -- the dialogue ----------------------------------------------------------

    def _on_greeting(self, reply: Reply) -> None:
        self.session.greeting = str(reply)
        if reply.code != 220:
            return self._quit_after(f"greeting: {reply}", reply.code)
        self._send(f"EHLO {self.helo}")
        self._expect("EHLO", self._on_ehlo, self.timeouts.other)

    def _on_ehlo(self, reply: Reply) -> None:
        if reply.code == 250:
            self.session.extensions = {}
            for line in reply.lines[1:]:
                keyword, _, value = line.partition(" ")
                self.session.extensions[keyword.upper()] = value.strip()
            return self._secure()
        if 500 <= reply.code < 600:
            self._send(f"HELO {self.helo}")
            return self._expect("HELO", self._on_helo, self.timeouts.other)
        self._quit_after(f"EHLO: {reply}", reply.code)

    def _on_helo(self, reply: Reply) -> None:
        if reply.code != 250:
            return self._quit_after(f"HELO: {reply}", reply.code)
        self._secure()

    # -- STARTTLS and AUTH, before any mail ------------------------------------

    def _secure(self) -> None:
        ext = self.session.extensions
        if self.tls is not None and not self.session.tls:
            if "STARTTLS" in ext:
                self._send("STARTTLS")
                return self._expect("STARTTLS", self._on_starttls, self.timeouts.other)
            if self.tls_required:
                return self._quit_after("the next hop does not offer STARTTLS and TLS is required", 0)
        if self.credentials is not None and not self.session.authenticated:
            return self._authenticate()
        self._next_message()

    def _on_starttls(self, reply: Reply) -> None:
        if reply.code != 220:
            if not self.tls_optional:
                return self._quit_after(f"STARTTLS refused: {reply}", reply.code)
            # opportunistic: go on in plain text on this connection (Postfix at level "may")
            log.info("{peer}: STARTTLS refused ({reply}); TLS is not required for this hop, going on in "
                     "plain text", peer=self.peer or self.transport.getPeer(), reply=str(reply))
            self.tls = None
            return self._secure()
        # whatever came with the 220 was sent before TLS: never read it as
        # if it came inside (a plaintext reply injected by a man in the middle)
        self.clearLineBuffer()
        self.transport.startTLS(self.tls)
        self.session.tls = True
        self._handshaking = True
        # RFC 3207: start over; what the server offers may differ inside TLS
        self._send(f"EHLO {self.helo}")
        self._expect("EHLO", self._on_ehlo, self.timeouts.other)

    def _authenticate(self) -> None:
        if self.auth_requires_tls and not self.session.tls:
            return self._quit_after("credentials are sent only inside TLS, and this session has none", 0)
        user, password = self.credentials
        mechanisms = self.session.extensions.get("AUTH", "").upper().split()
        b64 = lambda text: base64.b64encode(text.encode("utf-8")).decode("ascii")   # noqa: E731
        if "PLAIN" in mechanisms:
            self._send("AUTH PLAIN " + b64(f"\0{user}\0{password}"), shown="AUTH PLAIN (credentials)")
            return self._expect("AUTH", self._on_auth, self.timeouts.other)
        if "LOGIN" in mechanisms:
            def password_step(reply):
                if reply.code != 334:
                    return self._on_auth(reply)
                self._send(b64(password), shown="(authentication data)")
                self._expect("AUTH", self._on_auth, self.timeouts.other)

            def user_step(reply):
                if reply.code != 334:
                    return self._on_auth(reply)
                self._send(b64(user), shown="(authentication data)")
                self._expect("AUTH", password_step, self.timeouts.other)

            self._send("AUTH LOGIN")
            return self._expect("AUTH", user_step, self.timeouts.other)
        self._quit_after("the next hop offers no AUTH PLAIN or LOGIN", 0)

    def _on_auth(self, reply: Reply) -> None:
        if reply.code != 235:
            return self._quit_after(f"AUTH as {self.credentials[0]}: {reply}", reply.code)
        self.session.authenticated = True
        self._next_message()

    def _quit_after(self, why: str, code: int) -> None:
        self._send("QUIT")
        self._fail_session(why, code)
        self.transport.loseConnection()

    def _next_message(self) -> None:
        self._report()
        at_limit = self.max_messages is not None and self._sent >= self.max_messages
        if not self.queue and not at_limit and self.source is not None:
            return self._ask_source()
        if not self.queue or at_limit:
            # messages beyond the per-connection limit go back to the caller, untried
            self.session.untried, self.queue = self.queue, []
            self._send("QUIT")
            self._finish()
            self.transport.loseConnection()
            return
        message = self.queue.pop(0)
        self.session.started = True
        result = self._result_for(message)
        self._current = [result]
        self._sent += 1
        ext = self.session.extensions
        size_limit = ext.get("SIZE", "")
        if size_limit.isdigit() and int(size_limit) and len(message.data) > int(size_limit):
            for rcpt in message.recipients:
                result.recipients.append(RecipientResult(
                    rcpt.address, Status.failed, 552, "5.3.4",
                    f"message size {len(message.data)} exceeds the next hop's limit of {size_limit}", rcpt.key))
            return self._next_message()
        self._transaction(message, result)

    def _transaction(self, message: OutboundMessage, result: MessageResult) -> None:
        ext = self.session.extensions
        params = []
        if "SIZE" in ext:
            params.append(f"SIZE={len(message.data)}")
        if "8BITMIME" in ext and not message.data.isascii():   # C speed, not a loop per byte
            params.append("BODY=8BITMIME")
        dsn = "DSN" in ext
        if dsn and message.ret:
            params.append(f"RET={message.ret}")
        if dsn and message.envid:
            params.append(f"ENVID={message.envid}")
        if self.session.authenticated and "AUTH" in ext:
            # RFC 4954 §5: only over an authenticated session; <> when we cannot vouch
            params.append(f"AUTH={message.auth or '<>'}")
        commands = [("MAIL", f"MAIL FROM:<{message.sender}>" + "".join(" " + p for p in params))]
        for rcpt in message.recipients:
            rparams = ""
            if dsn and rcpt.notify:
                rparams += " NOTIFY=" + ",".join(rcpt.notify)
            if dsn and rcpt.orcpt:
                rparams += " ORCPT=" + rcpt.orcpt
            commands.append(("RCPT", f"RCPT TO:<{rcpt.address}>{rparams}"))
        state = {"mail": None, "accepted": []}

        def on_mail(reply):
            state["mail"] = reply

        def on_rcpt(rcpt):
            def handle(reply):
                if state["mail"] is not None and state["mail"].code != 250:
                    return      # the MAIL failure decides for everyone
                if reply.code in (250, 251):
                    state["accepted"].append(rcpt)
                else:
                    # RFC 5321 §4.5.3.1.10: 552 to RCPT means too many recipients, i.e. try later
                    _settle(result, [rcpt], reply, temporary=(552,))
            return handle

        def after_envelope(data_reply=None):
            mail = state["mail"]
            if mail.code != 250:
                _settle(result, message.recipients, mail)
                return self._reset_then_next()
            if not state["accepted"]:
                return self._reset_then_next()
            if data_reply is None:
                self._send("DATA")
                return self._expect("DATA", on_data, self.timeouts.data_init)
            on_data(data_reply)

        def on_data(reply):
            if reply.code != 354:
                _settle(result, state["accepted"], reply)
                return self._reset_then_next()
            write_through(self.transport, dot_stuff(message.data))
            if self.plog is not None:
                self.plog.sent(b"(message data, %d octets)" % len(message.data))
            self._expect("end of data", on_end, self.timeouts.data_end)

        def on_end(reply):
            _settle(result, state["accepted"], reply)
            self._current = []
            if reply.code == 250:
                return self._next_message()
            self._reset_then_next()

        if "PIPELINING" in ext:
            # MAIL, every RCPT and DATA in one write; replies come back in order
            lines = [c for _, c in commands] + ["DATA"]
            if self.plog is not None:
                for line in lines:
                    self.plog.sent(line.encode("ascii", "replace"))
            write_through(self.transport, "".join(line + "\r\n" for line in lines).encode("ascii"))
            self._waiting.append(("MAIL", on_mail, self.timeouts.mail))
            for rcpt in message.recipients:
                self._waiting.append(("RCPT", on_rcpt(rcpt), self.timeouts.rcpt))
            self._waiting.append(("DATA", lambda reply: self._pipelined_data(reply, state, after_envelope),
                                  self.timeouts.data_init))
            self._arm(self.timeouts.mail)
        else:
            def step(i):
                if i == 0:
                    self._send(commands[0][1])
                    return self._expect("MAIL", lambda r: (on_mail(r), step(1) if r.code == 250 else after_envelope()),
                                        self.timeouts.mail)
                if i <= len(message.recipients):
                    self._send(commands[i][1])
                    handler = on_rcpt(message.recipients[i - 1])
                    return self._expect("RCPT", lambda r: (handler(r), step(i + 1)), self.timeouts.rcpt)
                after_envelope()
            step(0)

    def _pipelined_data(self, reply: Reply, state: dict, after_envelope) -> None:
        if state["mail"].code == 250 and state["accepted"]:
            return after_envelope(reply)
        # the envelope failed; a 354 here means the server wants data we will not send
        if reply.code == 354:
            write_through(self.transport, b".\r\n")   # an empty message, then reset
            return self._expect("end of data", lambda _: after_envelope(), self.timeouts.data_end)
        after_envelope()

    def _reset_then_next(self) -> None:
        self._current = []
        self._send("RSET")
        self._expect("RSET", lambda reply: self._next_message() if reply.code == 250
                     else self._quit_after(f"RSET: {reply}", reply.code), self.timeouts.other)
