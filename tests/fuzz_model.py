"""
The session fuzzer's parts, shared by the Hypothesis state machine
(tests/test_fuzz_session.py) and the long campaign (tests/fuzz_campaign.py):

  - a grammar of what a client (kind, careless or hostile) sends: every
    verb, odd HELO names, valid and hostile paths, every ESMTP parameter,
    AUTH PLAIN/LOGIN/CRAM-MD5 with good and bad base64, DATA bodies with
    dot-stuffing, bare CR/LF, NULs, long lines and 8-bit bytes, raw bytes.
    It draws through a L{Draw}: Hypothesis's (shrinkable) or a seeded
    C{random.Random} (fast, for the campaign);
  - an L{Oracle}: the session's framing mirrored from the client's side
    (RFC 5321 lines of at most 512 octets, DATA up to CRLF.CRLF, AUTH
    responses, STARTTLS's discarded buffer). It pairs each complete command
    line with its reply and checks the session's promises: exactly one
    reply per command, in order (a positive reply only ever answers the
    verb it belongs to), a transaction never sees state from the one
    before (RCPT or DATA outside a transaction get 503, a queued message
    has exactly its own transaction's recipients and the bytes its client
    sent), no message with bare CR or LF is queued, and a session that
    closes says 221 or 421 last;
  - a L{Driver}: one session on a L{StringSession}'s server, bytes
    delivered in the chunks the grammar cut them into, the fake clock
    advanced through tarpits, and the session's end checked (no timer
    left but bounded ones, no draft left in the spool, its connection
    slot given back, no failure logged).

Written here rather than found: no SMTP fuzzer knows exedge's promises
(one reply per command in order, state per transaction); the protocol
itself is exedge's, on Twisted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import random
import re
import secrets

from twisted.internet import defer, task

from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from exedge.auth.credentials import CramMD5Checker, CredentialsFile, FileChecker, UserEntry, portal_for
from exedge.config import loads
from exedge.pipeline import Entry, Pipeline, Stage, defer_, disconnect, reject
from exedge.receive import checks
from exedge.receive.data import DataReader
from exedge.testing import StringSession
from harness import config_text

PORT = 2525
MAX_COMMAND = 510            # LineReceiver.MAX_LENGTH: 512 octets with the CRLF
USER, PASSWORD = "fuzz@example.com", "pw-fuzz"
CRAM_USER, CRAM_SECRET = "fetch@example.com", "cram-secret"


class Violation(AssertionError):
    """The session broke one of its promises."""


# -- drawing ----------------------------------------------------------------------


class RandomDraw:
    """The grammar's choices from a seeded C{random.Random}: fast, reproducible by seed."""

    def __init__(self, rnd):
        self.rnd = rnd

    def choice(self, seq):
        return seq[self.rnd.randrange(len(seq))]

    def integer(self, lo: int, hi: int) -> int:
        return self.rnd.randint(lo, hi)

    def boolean(self, p: float = 0.5) -> bool:
        return self.rnd.random() < p

    def binary(self, lo: int, hi: int) -> bytes:
        return self.rnd.randbytes(self.rnd.randint(lo, hi))


class HypothesisDraw:
    """The grammar's choices from Hypothesis's C{st.data()}: shrinkable."""

    def __init__(self, data):
        from hypothesis import strategies as st
        self.data, self.st = data, st

    def choice(self, seq):
        return self.data.draw(self.st.sampled_from(seq))

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def boolean(self, p: float = 0.5) -> bool:
        # p is a hint for the random grammar; Hypothesis explores both sides
        return self.data.draw(self.st.booleans())

    def binary(self, lo: int, hi: int) -> bytes:
        return self.data.draw(self.st.binary(min_size=lo, max_size=hi))


# -- the grammar ------------------------------------------------------------------

HELO_NAMES = [b"client.test", b"[127.0.0.1]", b"[IPv6:::1]", b"host_with_underscore.test", b"mx.example.com.",
              b"x" * 300 + b".test", b"a" * 64 + b".test", b"bad..domain", b"-x.test", b"[999.1.1.1]", b"[IPv6:zz]",
              b"m\xc3\xbcnchen.test", b"\xff\xfe", b"", b" ", b"a b", b"client.test  ", b"[127.0.0.1", b"localhost"]
LOCALS = [b"alice", b"bob", b"a.b+tag", b'"quoted local"', b'"a\\"b"', b"x" * 70, b"", b"a..b", b".dot",
          b"postmaster", b"\xc3\xbcser", b"a b", b"a@b", b"%", b"\x00"]
DOMAINS = [b"example.com", b"EXAMPLE.com", b"sender.test", b"partner.test", b"[127.0.0.1]", b"[IPv6:::1]",
           b"sub.example.com", b"x" * 260, b"", b"bad_domain", b"a..b", b"\xc3\xa9.test", b"example.com."]
MAIL_PARAMS = [b"SIZE=1000", b"SIZE=99999999999999", b"SIZE=", b"SIZE=abc", b"SIZE=0", b"BODY=8BITMIME",
               b"BODY=7BIT", b"BODY=BINARYMIME", b"BODY", b"SMTPUTF8", b"RET=FULL", b"RET=HDRS", b"RET=xx",
               b"ENVID=abc+2Bdef", b"ENVID=" + b"x" * 120, b"ENVID=a+zz", b"AUTH=<>", b"AUTH=alice+40example.com",
               b"AUTH=", b"AUTH=a+2", b"FOO=bar", b"=", b"SIZE=1 SIZE=2", b"size=10", b"\xff=1"]
RCPT_PARAMS = [b"NOTIFY=NEVER", b"NOTIFY=SUCCESS,FAILURE,DELAY", b"NOTIFY=NEVER,SUCCESS", b"NOTIFY=",
               b"NOTIFY=BOGUS", b"ORCPT=rfc822;bob@example.com", b"ORCPT=rfc822;a+2Bb@x.test", b"ORCPT=bogus",
               b"ORCPT=utf-8;caf\\x{E9}@x.test", b"ORCPT=", b"X=Y", b"SIZE=10"]
SIMPLE = [b"RSET", b"RSET x", b"NOOP", b"NOOP anything", b"VRFY alice", b"VRFY", b"EXPN staff", b"HELP",
          b"HELP MAIL", b"ETRN example.com", b"TURN", b"ATRN", b"BDAT 10 LAST", b"BDAT", b"XYZZY", b"", b" ",
          b"MAIL", b"RCPT", b"DATA x", b"rset", b"nOoP", b"STARTTLS x", b"AUTH", b"QUIT?", b"8BITMIME",
          b"\xff\xfe\xfd", b"NOOP\x00", b"NOOP\rRSET", b"NOOP\nRSET", b"HELO", b"EHLO"]
BODY_LINES = [b"Subject: fuzz", b"From: <alice@sender.test>", b"Message-ID: <x@y.test>", b"", b"body text",
              b"..leading dot (stuffed)", b"..", b". ", b"a\x00b", b"x" * 998, b"." + b"x" * 998,
              b"\xe9t\xe9 \xff\x80", b"Received: from a by b", b"\tcontinued", b"MAIL FROM:<evil@evil.test>",
              b"Subject: " + b"y" * 600]
# lines that end the data early or make the message bad (bare CR/LF: the smuggling vector)
BAD_BODY_LINES = [b".", b"a\rb", b"a\nb", b"\r", b"\n", b"x" * 1100, b"." + b"x" * 999, b"\r\n.\n", b"\n.\r\n",
                  b"\r.\r", b"x\r"]
RAW_ALPHABET = b"\r\n.\x00 :<>@=ADEHILMNOPQRSTabcdehilmnopqrst0123456789\xff\x80\t"


def helo(d) -> bytes:
    return d.choice([b"EHLO", b"HELO", b"ehlo", b"EHLO", b"EHLO"]) + b" " + d.choice(HELO_NAMES)


def path(d, *, null: bool) -> bytes:
    form = d.integer(0, 9)
    mailbox = d.choice(LOCALS) + b"@" + d.choice(DOMAINS)
    if form <= 4:
        return b"<" + mailbox + b">"
    if form == 5:
        return b"<>" if null else b"<postmaster>"
    if form == 6:
        return mailbox                                      # no angle brackets
    if form == 7:
        return b"<@route.test:" + mailbox + b">"            # a source route
    if form == 8:
        return d.choice([b"< " + mailbox + b" >", b"<" + mailbox, b"<<>>", b"<" + mailbox + b">>", b""])
    return d.binary(0, 40)


def mail(d) -> bytes:
    head = d.choice([b"MAIL FROM:", b"MAIL FROM:", b"mail from:", b"MAIL FROM: ", b"MAIL  FROM:", b"MAIL TO:"])
    return head + path(d, null=True) + params(d, MAIL_PARAMS)


def rcpt(d) -> bytes:
    head = d.choice([b"RCPT TO:", b"RCPT TO:", b"rcpt to:", b"RCPT TO: ", b"RCPT FROM:"])
    if d.boolean(0.7):
        target = b"<" + d.choice([b"bob", b"carol", b"postmaster", b"x" * 65]) + b"@" + \
            d.choice([b"example.com", b"EXAMPLE.COM", b"elsewhere.test"]) + b">"
    else:
        target = path(d, null=False)
    return head + target + params(d, RCPT_PARAMS)


def params(d, table) -> bytes:
    return b"".join(b" " + d.choice(table) for _ in range(d.integer(0, 3)))


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def auth_lines(d) -> list[bytes]:
    """An AUTH command and the responses a client might pipeline after it."""
    user = d.choice([USER.encode(), USER.upper().encode(), b"nobody@example.com", b""])
    password = d.choice([PASSWORD.encode(), b"wrong", b""])
    mech = d.integer(0, 6)
    if mech == 0:
        return [b"AUTH PLAIN " + b64(b"\0" + user + b"\0" + password)]
    if mech == 1:
        return [b"AUTH PLAIN", d.choice([b64(b"\0" + user + b"\0" + password), b"*", b"=", b"!!notbase64",
                                          b64(b"no nuls"), b64(user + b"\0" + user + b"\0" + password)])]
    if mech == 2:
        return [b"AUTH LOGIN", b64(user), b64(password)]
    if mech == 3:
        return [b"AUTH LOGIN " + b64(user), d.choice([b64(password), b"*", b"%%%"])]
    if mech == 4:
        return [d.choice([b"AUTH PLAIN =", b"AUTH PLAIN *", b"AUTH plain " + b64(b"\0\0"), b"AUTH XOAUTH2 abc",
                          b"AUTH CRAM-MD5 abc", b"AUTH", b"AUTH PLAIN " + b"A" * 600, b"AUTH LOGIN ==="])]
    if mech == 5:
        return [b"AUTH CRAM-MD5", d.choice([b64(b"fetch@example.com " + b"0" * 32), b"*", b64(b"x"), b"bad"])]
    return [d.choice([b"AUTH PLAIN", b"AUTH LOGIN"])]      # a dialogue left open: the next line answers it


def body(d) -> bytes:
    """A DATA section, usually with its final dot (sometimes without: the next bytes go on with it)."""
    lines = [d.choice(BAD_BODY_LINES if d.boolean(0.08) else BODY_LINES) for _ in range(d.integer(0, 6))]
    if d.boolean(0.05):
        lines = [b"Received: from x by y"] * d.integer(1, 40) + lines
    if d.boolean(0.03):
        lines += [b"y" * 990] * 70                           # past the "strict" variant's 64KB limit
    text = b"".join(line + b"\r\n" for line in lines)
    if d.boolean(0.9):
        text += b".\r\n"
    return text


def command(d) -> list[bytes]:
    """One command line (or an AUTH dialogue's lines), weighted towards the ones that reach deep states."""
    kind = d.integer(0, 14)
    if kind <= 1:
        return [helo(d)]
    if kind <= 4:
        return [mail(d)]
    if kind <= 7:
        return [rcpt(d)]
    if kind == 8:
        return [b"DATA"]
    if kind == 9:
        return auth_lines(d)
    if kind == 10:
        return [bytes(d.choice(RAW_ALPHABET) for _ in range(d.integer(0, 30)))]
    return [d.choice(SIMPLE)]


def transaction(d) -> bytes:
    """A whole pipelined transaction, perhaps with its body in the same write (against the RFC, on purpose)."""
    out = [mail(d) if d.boolean(0.3) else b"MAIL FROM:<alice@sender.test>"]
    out += [rcpt(d) if d.boolean(0.3) else b"RCPT TO:<bob@example.com>" for _ in range(d.integer(0, 3))]
    out.append(b"DATA")
    text = b"".join(line + b"\r\n" for line in out)
    return text + body(d) if d.boolean(0.5) else text


def burst(d) -> bytes:
    lines = []
    for _ in range(d.integer(1, 6)):
        lines.extend(command(d))
    return b"".join(line + b"\r\n" for line in lines)


def raw(d) -> bytes:
    if d.boolean(0.5):
        return d.binary(0, 80)
    return bytes(d.choice(RAW_ALPHABET) for _ in range(d.integer(0, 80)))


def cuts(d, data: bytes) -> list[bytes]:
    """C{data} cut at random points: the chunks the server's reads return."""
    if not data:
        return [data]
    points = sorted({d.integer(0, len(data)) for _ in range(d.integer(0, 4))})
    chunks, last = [], 0
    for p in points + [len(data)]:
        if p > last:
            chunks.append(data[last:p])
            last = p
    return chunks


# -- the server under test --------------------------------------------------------

# Each variant is one receive connector's character; config_text's other
# connector (externally secured, 127.0.0.2) is the "internal" one.
VARIANTS = {
    # anonymous Internet mail, STARTTLS and AUTH offered in clear, no tarpit, errors never end it
    "open": dict(internet='auth_mechanisms = ["Tls", "BasicAuth"]\n'
                          'permission_groups = ["AnonymousUsers", "ExchangeUsers"]\n'
                          'max_protocol_errors = 0\nauth_tarpit_interval = "0"\nmax_logon_failures = 0\n'
                          'max_inbound_connection_per_source = 1\n'),
    # tight limits, AUTH only inside TLS, tarpits on the clock, errors and AUTH failures end it
    "strict": dict(internet='auth_mechanisms = ["Tls", "BasicAuth", "BasicAuthRequireTLS"]\n'
                            'permission_groups = ["AnonymousUsers", "ExchangeUsers"]\n'
                            'max_protocol_errors = 8\nauth_tarpit_interval = "2"\nmax_logon_failures = 3\n'
                            'max_message_size = "64KB"\nmax_header_size = "1KB"\nmax_hop_count = 5\n'
                            'max_recipients_per_message = 3\nmax_inbound_connection_per_source = 1\n'
                            'pipelining_enabled = false\n',
                   tarpit="1"),
    # the externally secured connector (may relay), no TLS, no AUTH
    "internal": dict(internal='max_protocol_errors = 0\nmax_inbound_connection_per_source = 1\n', peer="127.0.0.2"),
}
# "stages": the "open" server with a pipeline stage of whims (L{Whims})
STAGED = "stages"
ALL_VARIANTS = sorted(VARIANTS) + [STAGED]
TARPIT_HORIZON = 3.0         # longer than any tarpit above (and Whims' delays): the clock goes through them


class WhimError(RuntimeError):
    """What L{Whims} raises: the runner logs it, as it should; not a finding."""


class _Calm:
    """A Whims C{rnd} that always goes on (the end-of-session probe must be greeted)."""

    def random(self) -> float:
        return 0.0


class Whims(Stage):
    """
    A pipeline stage that answers every hook at random (from C{rnd}, which
    the runner seeds per session): go on, refuse, defer, disconnect, raise,
    answer later on the clock, or never (the pipeline's timeout answers).
    The session's asynchronous paths, fuzzed.
    """

    name = "whims"

    def __init__(self, clock):
        self.clock = clock
        self.rnd = random.Random(0)

    def _whim(self, *args):
        roll = self.rnd.random()
        if roll < 0.7:
            return None
        if roll < 0.76:
            return reject("whim")
        if roll < 0.82:
            return defer_("whim")
        if roll < 0.84:
            return disconnect("whim")
        if roll < 0.88:
            raise WhimError("a stage's bug, on a whim")
        if roll < 0.98:
            verdict = self.rnd.choice([None, reject("later"), defer_("later")])
            return task.deferLater(self.clock, self.rnd.uniform(0.1, 1.5), lambda: verdict)
        return defer.Deferred()              # never: the pipeline's timeout answers

    on_connect = on_helo = on_starttls = on_auth = on_mail = on_rcpt = on_data = _whim
    on_headers = on_message = on_queued = on_disconnect = _whim


def cheap_hash(password: str) -> str:
    """
    The credentials file's scrypt format with a tiny cost: the format
    carries its own parameters, and the fuzzer must not spend 70 ms of
    scrypt on every good password (a wrong user still costs the real one:
    the checker's dummy hash, so the grammar mostly names the real user).
    """
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=16, r=1, p=1, dklen=32)
    return f"scrypt$16$1$1${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def build_server(directory: str, variant: str, seed: int = 0) -> StringSession:
    """
    A server of the given variant (its first session open) with its spool
    and credentials in C{directory}; C{seed}: the whims of its stage, if it
    has one.
    """
    knobs = dict(VARIANTS["open" if variant == STAGED else variant])
    peer = knobs.pop("peer", "127.0.0.1")
    users = os.path.join(directory, "users.txt")
    CredentialsFile(users).write({USER: UserEntry(USER, cheap_hash(PASSWORD), ())})
    portal = portal_for(FileChecker(users, lambda f: defer.maybeDeferred(f)),
                        CramMD5Checker({CRAM_USER: CRAM_SECRET}))
    config = loads(config_text(PORT, **knobs))
    names = [c.name for c in config.receive_connectors]
    clock = task.Clock()
    pipeline = None
    if variant == STAGED:
        whims = Whims(clock)
        whims.rnd = random.Random(seed)
        pipeline = Pipeline([Entry(whims, 0, None, 2.0)], clock)
    server = StringSession(config, os.path.join(directory, "spool"), peer=peer, portal=portal,
                           tls={name: object() for name in names}, clock=clock, pipeline=pipeline)
    server.whims = pipeline.entries[0].stage if pipeline is not None else None
    return server


# -- the oracle -------------------------------------------------------------------

_REPLY_LINE = re.compile(rb"^(\d{3})([ -])(.*)$", re.S)
# the positive replies each verb may get; no other verb may get them
POSITIVE = {b"EHLO": {250}, b"HELO": {250}, b"MAIL": {250}, b"RCPT": {250}, b"DATA": {354}, b"RSET": {250},
            b"NOOP": {250}, b"VRFY": {252}, b"HELP": {214}, b"QUIT": {221}, b"STARTTLS": {220},
            b"AUTH": {334, 235}}
ALWAYS = {b"NOOP": 250, b"HELP": 214, b"QUIT": 221}       # whatever the state and argument
NOT_OFFERED = {b"EXPN", b"TURN", b"ETRN", b"ATRN", b"BDAT"}
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def unstuff(content: bytes) -> bytes:
    return (b"\r\n" + content).replace(b"\r\n.", b"\r\n")[2:]


class Oracle:
    """
    The session seen from the client: what was delivered (L{received}) and
    what came back (L{wrote}), paired and checked by L{check}.
    """

    def __init__(self, limits=None, stages: bool = False):
        """
        C{limits()}: the session's (max_size, max_header_size, max_hop_count)
        for its messages; given, the reply to each message must be the one a
        reader fed the whole message at once gives (however it was split).
        """
        self.limits = limits
        self.stages = stages          # a pipeline stage may refuse anything (550, 451) or disconnect (421)
        self.inbox = bytearray()      # delivered, not yet framed
        self.out = bytearray()        # written by the server, not yet a whole reply
        self.replies: list = []       # (code, [lines]) not yet paired
        self.greeted = False
        self.closed: str | None = None       # why the session said it closes (221 / 421 / refusal)
        self.discarding = False       # inside an over-long line, up to its CRLF
        self.in_data = False
        self.data = bytearray()
        self.auth_step = False        # the next line answers an AUTH challenge
        self.helo = self.txn = self.authenticated = self.tls = False
        self.rcpts = 0
        self.mail_line = b""
        self.queued: list = []        # (MAIL line, recipients, client bytes) per 250 after DATA
        self.commands = 0             # lines answered
        self.input_ended = False      # the client closed its sending side
        self.last_reply = b""
        self.transcript: list = []    # the last pairs, for a failure's message

    def received(self, data: bytes) -> None:
        if self.closed is None:
            self.inbox += data

    def wrote(self, data: bytes) -> None:
        if data and self.closed is not None:
            raise self._fail(f"the session wrote after it said it closes ({self.closed}): {data[:200]!r}")
        self.out += data

    def _fail(self, why: str) -> Violation:
        tail = "\n".join(f"  {u!r} -> {r!r}" for u, r in self.transcript[-12:])
        return Violation(f"{why}\nlast commands and replies:\n{tail}")

    def _parse(self) -> None:
        while True:
            reply_lines, pos = [], 0
            while True:
                end = self.out.find(b"\r\n", pos)
                if end < 0:
                    return                     # a reply not yet complete
                line = bytes(self.out[pos:end])
                m = _REPLY_LINE.match(line)
                if not m or (reply_lines and m.group(1) != reply_lines[0][:3]):
                    raise self._fail(f"malformed reply line {line!r}")
                reply_lines.append(line)
                pos = end + 2
                if m.group(2) == b" ":
                    break
            del self.out[:pos]
            self.replies.append((int(reply_lines[0][:3]), reply_lines))

    def _frame(self):
        """The next complete unit the session must answer: ("line" | "long" | "data", bytes), or None."""
        if self.in_data:
            self.data += self.inbox
            self.inbox.clear()
            if self.data.startswith(b".\r\n"):
                end = 0
            else:
                i = self.data.find(b"\r\n.\r\n")
                if i < 0:
                    return None
                end = i + 2
            content = bytes(self.data[:end])
            self.inbox[:] = self.data[end + 3:]
            self.data.clear()
            self.in_data = False
            return ("data", content)
        while self.discarding:
            i = self.inbox.find(b"\r\n")
            if i < 0:
                keep = b"\r" if self.inbox.endswith(b"\r") else b""
                self.inbox[:] = keep
                return None
            del self.inbox[:i + 2]
            self.discarding = False
        i = self.inbox.find(b"\r\n")
        if i < 0:
            if len(self.inbox) >= MAX_COMMAND + 2:      # answered at once, the rest discarded up to CRLF
                line = bytes(self.inbox)
                self.inbox[:] = b"\r" if line.endswith(b"\r") else b""
                self.discarding = True
                return ("long", line)
            return None
        line = bytes(self.inbox[:i])
        del self.inbox[:i + 2]
        return ("long" if len(line) > MAX_COMMAND else "line", line)

    def check(self, *, disconnecting: bool, lost: bool) -> None:
        """
        Pair every complete unit with its reply. C{disconnecting}: the
        server has closed (or aborted) the connection; C{lost}: the
        connection is gone (no more replies can come).
        """
        self._parse()
        if not self.greeted:
            if not self.replies:
                if lost or disconnecting:
                    return
                raise self._fail("no greeting")
            code, lines = self.replies.pop(0)
            self.greeted = True
            if code != 220:
                self._closing(code, lines, disconnecting, what="greeting")
                return
        while self.closed is None:
            unit = self._frame()
            if unit is None:
                break
            if not self.replies:
                if self.input_ended and not lost:
                    raise self._fail(f"the client closed its side and {unit[1][:120]!r} was not answered")
                if disconnecting or lost:
                    self.inbox.clear()
                    break                         # the session ended before it: unanswered, rightly
                raise self._fail(f"no reply to {unit[1][:120]!r} (the session is open and idle)")
            code, lines = self.replies.pop(0)
            self.last_reply = lines[-1]
            self.transcript.append((unit[1][:100], lines[0][:100]))
            del self.transcript[:-40]
            self.commands += 1
            self._pair(unit, code, lines, disconnecting)
        if self.closed is None and self.replies:
            code, lines = self.replies.pop(0)
            if code != 421:
                raise self._fail(f"a reply nobody asked for: {lines!r}")
            self._closing(code, lines, disconnecting, what="unsolicited")
        if self.closed is None and disconnecting and self.input_ended:
            self.closed = "the client closed its side; every command answered"
        if self.closed is None and disconnecting and not lost:
            raise self._fail("the server closed the connection without a 221 or 421")

    def _closing(self, code: int, lines, disconnecting: bool, what: str) -> None:
        if code not in (221, 421, 554) and not (what == "greeting" and self.stages and code >= 400):
            raise self._fail(f"{what}: {lines!r} is not a closing reply")
        if self.replies:
            raise self._fail(f"replies after the closing {lines!r}: {self.replies!r}")
        if not disconnecting:
            raise self._fail(f"{lines!r} said the session closes, and the connection stays open")
        self.closed = lines[0].decode("latin-1")
        self.inbox.clear()

    def _pair(self, unit, code: int, lines, disconnecting: bool) -> None:
        kind, text = unit
        if code == 421:
            return self._closing(code, lines, disconnecting, what=repr(text[:80]))
        if kind == "long":
            if code != 500:
                raise self._fail(f"an over-long line got {lines[0]!r}, not 500")
            return
        if kind == "data":
            return self._end_of_data(text, code, lines)
        if self.auth_step:
            self.auth_step = False
            if code not in (334, 235) and code < 400:
                raise self._fail(f"an AUTH response got {lines[0]!r}")
            self.auth_step = code == 334
            self.authenticated |= code == 235
            return
        self._command(text, code, lines, disconnecting)

    def _command(self, line: bytes, code: int, lines, disconnecting: bool) -> None:
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        if any(b in line for b in (b"\r", b"\n", b"\0")) or not verb.isalpha() or not verb.isascii():
            if code != 500:
                raise self._fail(f"{line[:80]!r} (bad bytes or no verb) got {lines[0]!r}, not 500")
            return
        if verb in ALWAYS and code != ALWAYS[verb]:
            raise self._fail(f"{verb!r} got {lines[0]!r}")
        if code < 400 and code not in POSITIVE.get(verb, ()):
            raise self._fail(f"{line[:80]!r} got {lines[0]!r}: out of order, or the wrong verb's answer")
        if verb in NOT_OFFERED and code != 502:
            raise self._fail(f"{verb!r} got {lines[0]!r}, not 502")
        if verb not in POSITIVE and verb not in NOT_OFFERED and code != 500:
            raise self._fail(f"unknown {verb!r} got {lines[0]!r}, not 500")
        if verb == b"QUIT":
            return self._closing(code, lines, disconnecting, what="QUIT")
        if verb in (b"EHLO", b"HELO") and code == 250:
            self.helo, self.txn, self.rcpts = True, False, 0
        elif verb == b"MAIL":
            if self.helo and not self.txn and b"Send hello first" in lines[0]:
                raise self._fail("MAIL got 'Send hello first' after an accepted HELO/EHLO (the session forgot it)")
            if (self.txn or not self.helo) and code != 503:
                raise self._fail(f"MAIL got {lines[0]!r} while {'a transaction is open' if self.txn else 'not greeted'}")
            if code == 250:
                self.txn, self.rcpts, self.mail_line = True, 0, line
        elif verb == b"RCPT":
            if not self.txn and code != 503:
                raise self._fail(f"RCPT without MAIL got {lines[0]!r}, not 503 (state from an earlier transaction?)")
            if self.txn and b"Need MAIL" in lines[0]:
                raise self._fail(f"RCPT got {lines[0]!r} inside a transaction (the session lost it)")
            self.rcpts += code == 250
        elif verb == b"DATA":
            if code == 354:
                if not (self.txn and self.rcpts):
                    raise self._fail(f"DATA got 354 with {'no transaction' if not self.txn else 'no recipients'}")
                self.in_data = True
            elif not self.txn and code not in (503, 501):
                raise self._fail(f"DATA without MAIL got {lines[0]!r}, not 503")
        elif verb == b"RSET" and code == 250:
            self.txn, self.rcpts = False, 0
        elif verb == b"STARTTLS" and code == 220:
            # the session forgets everything, and what the client sent after
            # STARTTLS in clear text is never read (CVE-2011-0411)
            self.inbox.clear()
            self.discarding = False
            self.tls, self.helo, self.txn, self.rcpts, self.authenticated = True, False, False, 0, False
        elif verb == b"AUTH":
            if code in (334, 235) and (self.txn or self.authenticated):
                raise self._fail(f"AUTH got {lines[0]!r} during a transaction or after authentication")
            self.auth_step = code == 334
            self.authenticated |= code == 235

    def _end_of_data(self, content: bytes, code: int, lines) -> None:
        rcpts, mail_line = self.rcpts, self.mail_line
        self.txn, self.rcpts = False, 0
        if code < 400 and code != 250:
            raise self._fail(f"the end of DATA got {lines[0]!r}")
        if _BARE.search(content):
            if code != 554:
                raise self._fail(f"a message with a bare CR or LF got {lines[0]!r}, not 554 (smuggling)")
            return
        if self.limits is not None:
            max_size, max_header_size, max_hop_count = self.limits()
            whole = DataReader(lambda block: None, max_size=max_size, max_header_size=max_header_size,
                               max_hop_count=max_hop_count)
            if whole.feed(content + b".\r\n") != (True, b""):
                raise self._fail("the reference reader did not find the end of the message")
            if whole.error is not None and lines[0][:9] != b"%d %s" % (whole.error[0], whole.error[1].encode()):
                raise self._fail(f"a message got {lines[0]!r}; read in one piece it gets {whole.error}")
            if whole.error is None and code not in ((250, 451, 452, 550) if self.stages else (250, 451, 452)):
                raise self._fail(f"a good message got {lines[0]!r}")
        if code == 250:
            if any(len(line) > 998 for line in unstuff(content).split(b"\r\n")):
                raise self._fail("a message with a line over 998 octets was queued")
            self.queued.append((mail_line, rcpts, unstuff(content)))


# -- the driver -------------------------------------------------------------------


class FailureLog:
    """Every failure or error logged while it is installed (an exception that a session swallowed into the log)."""

    def __init__(self):
        self.events: list = []

    def __call__(self, event) -> None:
        failure = event.get("log_failure")
        if event.get("stage") == Whims.name and (failure is None or failure.check(WhimError)):
            return                            # the stage's own whims, logged as they should be
        if failure is not None or event.get("isError") or \
                getattr(event.get("log_level"), "name", "") in ("error", "critical"):
            self.events.append(event)

    def __enter__(self) -> "FailureLog":
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc) -> None:
        globalLogPublisher.removeObserver(self)

    def check(self) -> None:
        if self.events:
            from twisted.logger import formatEvent
            event = self.events[0]
            failure = event.get("log_failure")
            text = formatEvent(event) + ("\n" + failure.getTraceback() if failure is not None else "")
            self.events.clear()
            raise Violation(f"logged: {text}")


class Driver:
    """
    One session on C{server} (a L{StringSession}, its current session):
    L{send} delivers bytes in chunks, as reads would, and checks; L{tick}
    lets time pass; L{lose} is the client going away; L{finish} ends the
    session and checks that it left nothing behind.
    """

    def __init__(self, server: StringSession, failures: FailureLog):
        self.server = server
        self.failures = failures
        self.oracle = Oracle(self._limits, stages=server.whims is not None)
        self.lost = False
        self.handshaking = False
        self.seen_messages = len(server.sink.messages)
        self.settle()                  # a stage may take its time over on_connect
        self.check()

    def _limits(self):
        c = self.proto.connector
        return checks.size_limit(c, self.proto.session.permissions), c.max_header_size, c.max_hop_count

    @property
    def proto(self):
        return self.server.proto

    @property
    def transport(self):
        return self.server.transport

    @property
    def open(self) -> bool:
        return not self.lost and not self.transport.disconnecting

    def _collect(self) -> None:
        data = self.transport.value()
        self.transport.clear()
        self.oracle.wrote(data)

    def settle(self) -> None:
        """Let the clock run through the tarpits (and no further): every answer that is only waiting gets out."""
        clock = self.server.clock
        for _ in range(1000):
            due = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds() + TARPIT_HORIZON]
            if not due:
                return
            clock.advance(max(0.0, min(due) - clock.seconds()))
        raise Violation("timers keep firing: 1000 within the tarpit horizon")

    def send(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            if not self.open or self.handshaking:
                break                    # gone, or eaten by the TLS layer (a failed handshake)
            if self.transport.producerState == "paused":
                raise Violation("the session stopped reading with nothing left to wait for (wedged)")
            self.oracle.received(chunk)
            self.proto.dataReceived(chunk)
            self.settle()
            self.handshaking = self._tls_pending()
        self.check()

    def _tls_pending(self) -> bool:
        return self.transport.tls_options is not None and self.open and not self._handshaken

    _handshaken = False

    def handshake(self, ok: bool) -> None:
        """STARTTLS began a handshake: it completes, or fails (the connection is lost)."""
        if not self._tls_pending():
            return
        self.handshaking = False
        if ok:
            self._handshaken = True
            self.server.handshake()
            self.check()
        else:
            self.lose("TLS handshake failed")

    def tick(self, seconds: float) -> None:
        if self.lost:
            return
        self.server.clock.advance(seconds)
        self.settle()
        self.check()

    def half_close(self) -> None:
        """The client closes its sending side (Exim after QUIT): every command is answered, then the end."""
        # plain TCP only: Twisted's TLS layer takes the end of input for the end of the connection
        if self.open and not self._tls_pending() and not self.oracle.tls:
            self.oracle.input_ended = True
            self.proto.readConnectionLost()
            self.settle()
            self.check()

    def lose(self, why: str = "client went away") -> None:
        if self.lost:
            return
        self.check()
        self.lost = True
        from twisted.internet import error
        self.proto.connectionLost(Failure(error.ConnectionLost(why)))
        self._collect()
        self.oracle.check(disconnecting=True, lost=True)

    def check(self) -> None:
        self._collect()
        self.failures.check()
        self.oracle.check(disconnecting=self.transport.disconnecting, lost=self.lost)
        sink = self.server.sink.messages
        queued = self.oracle.queued
        if len(sink) - self.seen_messages != len(queued):
            raise Violation(f"{len(queued)} messages got 250, {len(sink) - self.seen_messages} were queued")
        for message, (mail_line, rcpts, content) in zip(sink[self.seen_messages:], queued):
            envelope = message.envelope
            if len(envelope.recipients) != rcpts:
                raise Violation(f"a message queued with {len(envelope.recipients)} recipients; "
                                f"its transaction accepted {rcpts}")
            if envelope.sender and envelope.sender.lower().encode("utf-8", "replace") not in mail_line.lower():
                raise Violation(f"a message queued from {envelope.sender!r}; its MAIL was {mail_line!r}")
            if not message.read_data().endswith(content):
                raise Violation("a queued message is not what its client sent")
        self.seen_messages = len(sink)
        queued.clear()

    def finish(self) -> None:
        """
        End the session (the connection lost, if it is not already) and
        check what it left: no timer beyond the tarpits', none at all once
        they have run, no draft in the spool, its connection slot free
        (a new session of the same peer is greeted: every variant allows
        one session per source).
        """
        self.lose("the end")
        clock = self.server.clock
        late = [c for c in clock.getDelayedCalls() if c.getTime() > clock.seconds() + TARPIT_HORIZON + 5.0]
        if late:
            raise Violation(f"timers left after the session ended: {late!r}")
        self.settle()
        clock.advance(TARPIT_HORIZON + 5.0)
        if clock.getDelayedCalls():
            raise Violation(f"timers left after the session ended: {clock.getDelayedCalls()!r}")
        if self.proto.draft is not None:
            raise Violation("a draft left open after the session ended")
        if self.proto.connector is not None and self.server.context.connectors.in_data(self.proto.connector):
            raise Violation("a DATA slot (max_inbound_data_sessions) left taken after the session ended")
        left = os.listdir(self.server.spool.incoming_dir)
        if left:
            raise Violation(f"files left in the spool's incoming/: {left}")
        self.failures.check()
        if self.server.whims is not None:
            self.server.whims.rnd = _Calm()
        self.server.reconnect()
        greeting = self.server.transport.value()
        if not greeting.startswith(b"220 "):
            raise Violation(f"the next session of the same peer got {greeting!r} (a connection slot not freed?)")


def verify_cram(challenge_line: bytes, good: bool) -> bytes:
    """The client's CRAM-MD5 response to the 334 line C{challenge_line}."""
    challenge = base64.b64decode(challenge_line[4:].strip())
    secret = CRAM_SECRET if good else "wrong"
    digest = hmac.new(secret.encode(), challenge, "md5").hexdigest()
    return b64(f"{CRAM_USER} {digest}".encode())


# -- steps: what a client does next ---------------------------------------------------


def _send(d, drv: Driver, data: bytes) -> None:
    drv.send(cuts(d, data))
    if drv.handshaking:
        drv.handshake(ok=d.boolean(0.85))


def step_hello(d, drv):
    _send(d, drv, helo(d) + b"\r\n")


def step_mail(d, drv):
    _send(d, drv, mail(d) + b"\r\n")


def step_rcpt(d, drv):
    _send(d, drv, rcpt(d) + b"\r\n")


def step_simple(d, drv):
    _send(d, drv, d.choice(SIMPLE) + b"\r\n")


def step_auth(d, drv):
    _send(d, drv, b"".join(line + b"\r\n" for line in auth_lines(d)))


def step_cram(d, drv):
    """CRAM-MD5 answered from the challenge the server gave (with the right secret or not)."""
    _send(d, drv, b"AUTH CRAM-MD5\r\n")
    if drv.open and drv.oracle.auth_step and drv.oracle.last_reply.startswith(b"334 "):
        _send(d, drv, verify_cram(drv.oracle.last_reply, good=d.boolean(0.7)) + b"\r\n")


def step_transaction(d, drv):
    _send(d, drv, transaction(d))


def step_body(d, drv):
    _send(d, drv, body(d))


def step_burst(d, drv):
    _send(d, drv, burst(d))


def step_raw(d, drv):
    _send(d, drv, raw(d))


def step_long(d, drv):
    """A line around the 512-octet limit (or far past it), perhaps ending in a CR whose LF comes later."""
    n = d.choice([509, 510, 511, 512, 513, 1000, 5000, 70000])
    line = d.choice([b"NOOP ", b"MAIL FROM:<", b"", b"AUTH PLAIN "]) + b"x" * n
    _send(d, drv, line + d.choice([b"\r\n", b"\r", b"", b"\r\nNOOP\r\n"]))


def step_big(d, drv):
    """A message past the spool's 512 KiB in memory (it spills to a file), finished or left hanging."""
    if not drv.oracle.in_data:
        _send(d, drv, b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    if drv.open and drv.oracle.in_data:
        block = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 600
        _send(d, drv, block + (b".\r\n" if d.boolean(0.5) else b""))


def step_starttls(d, drv):
    junk = d.choice([b"", b"MAIL FROM:<injected@evil.test>\r\n", b"RSET\r\nNOOP\r\n"])
    _send(d, drv, b"STARTTLS\r\n" + junk)


def step_tick(d, drv):
    drv.tick(d.choice([0.5, 2.0, 10.0, 59.0, 61.0, 301.0]))


def step_half_close(d, drv):
    drv.half_close()


def step_quit(d, drv):
    _send(d, drv, d.choice([b"QUIT\r\n", b"quit\r\n", b"QUIT now\r\n", b"NOOP\r\nQUIT\r\nNOOP\r\n"]))


def step_lose(d, drv):
    drv.lose()


# weights: the common verbs often, the session's end rarely (each ends it)
STEPS = [(step_hello, 6), (step_mail, 6), (step_rcpt, 6), (step_simple, 3), (step_auth, 3), (step_cram, 1),
         (step_transaction, 12), (step_body, 2), (step_burst, 6), (step_raw, 2), (step_long, 1), (step_big, 0.3),
         (step_starttls, 2), (step_tick, 1), (step_half_close, 0.3), (step_quit, 0.5), (step_lose, 0.3)]


def random_session(rnd, server: StringSession, failures: FailureLog, max_steps: int = 12) -> int:
    """One session of seeded random steps on C{server}'s current session; the steps it ran."""
    d = RandomDraw(rnd)
    if server.whims is not None:
        server.whims.rnd = random.Random(rnd.random())
    drv = Driver(server, failures)
    steps, weights = zip(*STEPS)
    if rnd.random() < 0.8:
        _send(d, drv, b"EHLO client.test\r\n")           # most clients start well: reach the deep states
    n = 0
    for n in range(1, rnd.randint(1, max_steps) + 1):
        if not drv.open:
            break
        rnd.choices(steps, weights)[0](d, drv)
    drv.finish()
    return n
