"""
The "rspamd" stage: every message is scanned by an rspamd daemon before it is queued.

Why: exedge filters connections, senders and recipients itself, as
Exchange's Edge agents do, but it does not judge content. rspamd does that
well and answers plain HTTP, so this stage POSTs the message, as the client
sent it, to rspamd's /checkv2 with the envelope in rspamd's request headers,
and turns rspamd's action into exedge's answer at the final dot:

    reject                        550 5.7.1 (or, with quarantine = true, as quarantine)
    soft reject                   451 4.7.1
    quarantine                    to the quarantine mailbox, with the spam headers below
    discard                       250, and delivered to nobody
    add header, rewrite subject   accepted with X-Spam: Yes, X-Spam-Score, X-Spam-Symbols, SCL 5..9
    no action, greylist           accepted with X-Spam-Score, SCL 0..4

"greylist" is accepted, as rspamd's own milter does: rspamd's greylist
module answers "soft reject" for a message it greylists, so "greylist"
only says the score is in the greylisting band. Deferring it would defer
such a message at every retry, for days, where no greylist module runs.

The SCL (X-MS-Exchange-Organization-SCL, which Exchange and Outlook act
on) is 9 x score / required_score, rounded, kept within 5..9 when rspamd
calls the message spam and within 0..4 when it does not: Exchange's junk
threshold is 4, so ham stays in the inbox and spam goes to Junk whatever
rspamd's thresholds are. The subject is never rewritten.

A scanner outage must not stop mail: a message that cannot be scanned is
accepted and the failure logged (on_error = "Defer" answers 451 4.3.0
instead). Messages larger than max_size are not scanned.

It is also the example of a real drop-in: one file, a twisted.plugin
IPlugin + IStageFactory object, its options checked at start-up.
"""

from __future__ import annotations

import io
import json
import math
import re
import urllib.parse

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.web.client import Agent, FileBodyProducer, ResponseDone
from twisted.web.http_headers import Headers
from zope.interface import implementer

from exedge.config import values
from exedge.pipeline import IStageFactory, Stage, defer_, reject

log = Logger()

OUR_HEADERS = ("X-Spam", "X-Spam-Score", "X-Spam-Symbols")   # a client's copies are removed
MAX_SYMBOLS = 20
MAX_REPLY = 1024 * 1024                                      # rspamd's replies are a few KB
_SYMBOL = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class RspamdScan(Stage):
    name = "rspamd"
    anti_spam = True

    def __init__(self, url="http://127.0.0.1:11333", scan_timeout=10.0, max_size=1024 * 1024,
                 on_error="Accept", quarantine=False, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.endpoint = (url + "/checkv2").encode("ascii")
        self.scan_timeout = scan_timeout
        self.max_size = max_size
        self.on_error = on_error
        self.quarantine = quarantine
        self.reactor = reactor
        self.agent = Agent(reactor, connectTimeout=scan_timeout)

    async def on_message(self, session, message):
        if message.size > self.max_size:
            log.info("rspamd: {queue_id} not scanned, {size} bytes is over max_size",
                     queue_id=message.queue_id, size=message.size)
            return None
        try:
            reply = await self.scan(session, message)
        except defer.CancelledError:
            raise                                # the pipeline's own timeout
        except Exception as e:
            log.warn("rspamd: {queue_id} not scanned ({error}); on_error = {on_error}", queue_id=message.queue_id,
                     error=f"{e.__class__.__name__}: {e}", on_error=self.on_error)
            if self.on_error == "Defer":
                return defer_("Temporary content scanning failure; please try again later", "4.3.0", 451)
            return None
        return self.act(message, reply)

    async def scan(self, session, message) -> dict:
        """rspamd's answer for this message: a dict with "action", "score" and "required_score" at least."""
        headers = Headers({"IP": [session.peer], "From": [message.sender or "<>"], "Rcpt": message.recipients})
        for name, value in (("Helo", session.helo), ("User", session.authenticated_as),
                            ("Queue-Id", message.queue_id)):
            if value:
                headers.addRawHeader(name, value)
        content = await message.body()
        exchange = defer.ensureDeferred(self._post(headers, content))
        code, body = await exchange.addTimeout(self.scan_timeout, self.reactor, onTimeoutCancel=_no_answer)
        if code != 200:
            raise RuntimeError(f"HTTP {code}: {body[:200]!r}")
        reply = json.loads(body)
        try:
            valid = isinstance(reply["action"], str) and \
                math.isfinite(float(reply["score"]) + float(reply["required_score"]))
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise ValueError(f"not an rspamd reply: {body[:200]!r}")
        return reply

    async def _post(self, headers, content: bytes):
        response = await self.agent.request(b"POST", self.endpoint, headers, FileBodyProducer(io.BytesIO(content)))
        reply = _Reply()
        response.deliverBody(reply)
        return response.code, await reply.done

    def act(self, message, reply: dict):
        """The verdict for rspamd's C{reply}; headers and SCL stamped on C{message} when it is accepted."""
        action = reply["action"]
        score, required = float(reply.get("score", 0)), float(reply.get("required_score", 0))
        text = smtp_message(reply)
        if action == "reject" and not self.quarantine:
            return reject(text or "Message rejected as spam", "5.7.1", 550)
        if action == "soft reject":
            return defer_(text or "Try again later", "4.7.1", 451)
        if action == "discard":
            message.delete(f"rspamd: {text or 'discard'}")
            return None
        spam = action in ("reject", "quarantine", "add header", "rewrite subject")
        if not spam and action not in ("no action", "greylist"):
            log.warn("rspamd: unknown action {action!r} for {queue_id}, taken as no action", action=action,
                     queue_id=message.queue_id)
        for name in OUR_HEADERS:
            if name in message.headers:
                message.remove_header(name)
        if spam:
            message.add_header("X-Spam", "Yes")
            message.add_header("X-Spam-Symbols", symbols(reply))
        message.add_header("X-Spam-Score", f"{score:.2f} / {required:.2f}")
        message.set_scl(spam_confidence(score, required, spam))
        if action in ("reject", "quarantine"):
            message.quarantine(f"rspamd: {text or 'reject'}, score {score:.2f} / {required:.2f}")
        return None


class _Reply(Protocol):
    """
    A response body, at most MAX_REPLY bytes (twisted's readBody has no
    limit, and cancelling it leaves the connection open): C{done} fires
    with the bytes; cancelling it closes the connection.
    """

    def __init__(self):
        self.done = defer.Deferred(lambda d: self.transport.stopProducing())
        self.parts, self.size = [], 0

    def dataReceived(self, data):
        if self.done.called:
            return
        self.size += len(data)
        self.parts.append(data)
        if self.size > MAX_REPLY:
            self.done.errback(ValueError(f"a reply of more than {MAX_REPLY} bytes"))
            self.transport.stopProducing()

    def connectionLost(self, reason):
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def _no_answer(result, timeout):
    raise TimeoutError(f"no answer within {timeout:g}s")


def spam_confidence(score: float, required: float, spam: bool) -> int:
    """SCL: 9 x score / required_score, rounded, within 5..9 for spam and 0..4 for ham."""
    level = round(9 * score / required) if required > 0 else 0
    low, high = (5, 9) if spam else (0, 4)
    return min(high, max(low, level))


def symbols(reply: dict) -> str:
    """The highest-scoring symbols, at most MAX_SYMBOLS, as "NAME(score)"; odd names are left out."""
    found = reply.get("symbols")
    found = found if isinstance(found, dict) else {}
    scored = []
    for name, detail in found.items():
        if _SYMBOL.match(str(name)):
            try:
                scored.append((float(detail.get("score") or 0) if isinstance(detail, dict) else 0.0, name))
            except (TypeError, ValueError):
                continue
    scored.sort(key=lambda item: (-item[0], item[1]))
    return ", ".join(f"{name}({score:.2f})" for score, name in scored[:MAX_SYMBOLS]) or "none"


def smtp_message(reply: dict) -> str:
    """rspamd's text for the SMTP reply (messages.smtp_message), printable ASCII, one line, bounded."""
    messages = reply.get("messages")
    text = messages.get("smtp_message") if isinstance(messages, dict) else None
    if not isinstance(text, str):
        return ""
    return " ".join("".join(c if " " <= c <= "~" else " " for c in text).split())[:200]


def _url(value):
    try:
        parts = urllib.parse.urlsplit(str(value))
        ok = str(value).isascii() and parts.scheme in ("http", "https") and parts.hostname \
            and parts.port != 0 and not parts.path.strip("/") and not parts.query
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f'expected rspamd\'s address, such as "http://127.0.0.1:11333", got {value!r}')
    return f"{parts.scheme}://{parts.netloc}"


def _seconds(value):
    seconds = values.parse_timespan(value)
    if not 0 < seconds <= 300:
        raise ValueError(f"scan_timeout is more than 0 and at most 5 minutes, not {value!r}")
    return seconds


@implementer(IPlugin, IStageFactory)
class RspamdFactory:
    name, anti_spam, hooks, needs_body = "rspamd", True, ("on_message",), True
    options = {
        "url": _url,
        "scan_timeout": _seconds,
        "max_size": values.parse_size,
        "on_error": values.choice("Accept", "Defer"),
        "quarantine": values.boolean,
    }
    defaults = {"url": "http://127.0.0.1:11333", "scan_timeout": "10s", "max_size": "1MB", "on_error": "Accept",
                "quarantine": False}

    def build(self, options, context=None):
        return RspamdScan(**options, reactor=getattr(context, "clock", None))     # the reactor, in the server


factory = RspamdFactory()
