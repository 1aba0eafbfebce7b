"""
The ETRN client: a site on an intermittent link asks its provider for the
mail held for it (`[[etrn_clients]]`, and `exedge etrn NAME`).

Each run connects to the provider, says EHLO, starts TLS and
authenticates as configured (the keys and the policy of a send
connector's smart-host authentication, L{exedge.tls.client_policy}),
sends ETRN for each domain, logs every reply, and quits; the provider then
delivers to our receive connectors. A failure (a refused connection, 458,
459) is logged and the next run asks again; it never touches mail flow.

Its own small protocol rather than the send side's client, which is built
around mail transactions, or twisted.mail's, which has no ETRN.
"""

from __future__ import annotations

import base64

import attrs
from twisted.application.service import Service
from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger
from twisted.protocols import basic
from twisted.python.failure import Failure

from exedge import tls
from exedge.writethrough import write_through

log = Logger()


@attrs.frozen
class Answer:
    """The provider's reply to one request."""

    node: str
    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 250 <= self.code <= 253


class EtrnFailed(Exception):
    """The run could not ask (no connection, a refused greeting, TLS or AUTH trouble)."""


class _Asking(basic.LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 2048

    def __init__(self, run: "Run"):
        self.run = run
        self.lines: list[str] = []
        self.expect = self._greeting
        self.extensions: set[str] = set()
        self.tls_started = False
        self.nodes = list(run.nodes)
        self.timer = None

    def connectionMade(self) -> None:
        self._arm()

    def _arm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.reset(self.run.timeout)
        else:
            self.timer = self.run.clock.callLater(self.run.timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._fail("no reply in time")
        self.transport.abortConnection()

    def send(self, line: str) -> None:
        self._arm()
        write_through(self.transport, line.encode("ascii") + b"\r\n")

    def lineReceived(self, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        if len(text) < 3 or not text[:3].isdigit():
            self._fail(f"not an SMTP reply: {text[:100]!r}")
            return self.transport.abortConnection()
        self.lines.append(text)
        if text[3:4] == "-":
            return
        lines, self.lines = self.lines, []
        code = int(lines[0][:3])
        self.expect(code, lines)

    def _fail(self, why: str) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.run.failed(why)
        self.expect = lambda code, lines: None

    def _quit(self, why: str | None = None) -> None:
        if why is not None:
            self._fail(why)
        self.send("QUIT")
        self.expect = lambda code, lines: self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.run.failed(f"connection lost: {reason.getErrorMessage() if reason else 'closed'}")

    # -- the dialogue ------------------------------------------------------------

    def _greeting(self, code: int, lines) -> None:
        if code != 220:
            return self._quit(f"greeting: {lines[-1]}")
        self._ehlo()

    def _ehlo(self) -> None:
        self.send(f"EHLO {self.run.helo}")
        self.expect = self._on_ehlo

    def _on_ehlo(self, code: int, lines) -> None:
        if code != 250:
            return self._quit(f"EHLO: {lines[-1]}")
        self.extensions = {line[4:].split(" ", 1)[0].upper() for line in lines[1:]}
        if not self.tls_started and self.run.tls is not None and "STARTTLS" in self.extensions:
            self.send("STARTTLS")
            self.expect = self._on_starttls
            return
        if self.run.tls_required and not self.tls_started:
            return self._quit("the server does not offer STARTTLS and TLS is required")
        if self.run.credentials is not None:
            return self._authenticate()
        self._next()

    def _on_starttls(self, code: int, lines) -> None:
        if code != 220:
            if self.run.tls_required:
                return self._quit(f"STARTTLS refused: {lines[-1]}")
            return self._after_tls()
        self.clearLineBuffer()                  # nothing sent before TLS is read as if from inside it
        self.transport.startTLS(self.run.tls)
        self.tls_started = True
        self._ehlo()

    def _after_tls(self) -> None:
        if self.run.credentials is not None:
            return self._authenticate()
        self._next()

    def _authenticate(self) -> None:
        if self.run.auth_requires_tls and not self.tls_started:
            return self._quit("authentication needs TLS, which the server did not give")
        user, password = self.run.credentials
        token = base64.b64encode(f"\0{user}\0{password}".encode("utf-8")).decode("ascii")
        self.send(f"AUTH PLAIN {token}")
        self.expect = self._on_auth

    def _on_auth(self, code: int, lines) -> None:
        if code != 235:
            return self._quit(f"AUTH: {lines[-1]}")
        self._next()

    def _next(self) -> None:
        if not self.nodes:
            self.run.asked()
            return self._quit()
        node = self.nodes.pop(0)
        self.send(f"ETRN {node}")
        self.expect = lambda code, lines: self._answered(node, code, lines)

    def _answered(self, node: str, code: int, lines) -> None:
        self.run.answer(Answer(node, code, " ".join(line[4:] for line in lines)))
        self._next()


class Run:
    """One run of an ETRN client: fires C{done} with the provider's answers, or fails with L{EtrnFailed}."""

    def __init__(self, client, *, helo: str, reactor, clock, credentials=None):
        self.client = client
        self.nodes = client.domains
        self.helo = client.helo or helo
        self.reactor = reactor
        self.clock = clock
        self.timeout = client.connection_inactivity_timeout
        self.credentials = credentials if client.smart_host_auth_mechanism != "None" else None
        self.auth_requires_tls = client.smart_host_auth_mechanism == "BasicAuthRequireTLS"
        self.tls, self.tls_required = tls.client_policy(client, client.server[0])
        self.answers: list[Answer] = []
        self.done = defer.Deferred()
        self._error: str | None = None

    def start(self) -> defer.Deferred:
        host, port = self.client.server
        endpoint = endpoints.HostnameEndpoint(self.reactor, host, port, timeout=self.timeout)
        factory = protocol.Factory.forProtocol(lambda: _Asking(self))
        factory.noisy = False
        endpoint.connect(factory).addErrback(lambda f: self.failed(f"{host}:{port}: {f.getErrorMessage()}"))
        return self.done

    def answer(self, answer: Answer) -> None:
        self.answers.append(answer)
        log.info("ETRN client {name}: {server} answered ETRN {node}: {code} {text}", name=self.client.name,
                 server=f"{self.client.server[0]}:{self.client.server[1]}", node=answer.node, code=answer.code,
                 text=answer.text)

    def asked(self) -> None:
        if not self.done.called:
            self.done.callback(self.answers)

    def failed(self, why: str) -> None:
        if self.done.called:
            return
        self._error = why
        log.warn("ETRN client {name}: {why}; asking again at the next run", name=self.client.name, why=why)
        self.done.errback(EtrnFailed(why))


class EtrnClientService(Service):
    """
    Runs one `[[etrn_clients]]` entry on its schedule and/or interval (on
    the injected clock): at the start when inside a window (or with only an
    interval), at each window's opening, and every interval inside.
    """

    def __init__(self, client, *, helo: str, reactor, clock=None, credentials=None):
        self.client = client
        self.helo = helo
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.credentials = credentials
        self.setName(f"etrn client {client.name}")
        self._call = None
        self._waiting: list[defer.Deferred] = []     # who waits for the run under way

    def run_once(self) -> defer.Deferred:
        """A run now, or the one under way: a Deferred of its answers (failing with L{EtrnFailed})."""
        d = defer.Deferred()
        self._waiting.append(d)
        if len(self._waiting) == 1:
            run = Run(self.client, helo=self.helo, reactor=self.reactor, clock=self.clock,
                      credentials=self.credentials)
            run.start().addBoth(self._finished)
        return d

    def _finished(self, result) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def _next_run(self, now: float, just_ran: bool) -> float | None:
        schedule, zone, interval = self.client.schedule, self.client.schedule_time_zone, self.client.interval
        if schedule is None or schedule.always:
            if not just_ran:
                return now if (interval or schedule is not None) else None
            return now + interval if interval else None
        if schedule.never:
            return None
        if not schedule.is_open(now, zone):
            return schedule.next_opening(now, zone)
        if not just_ran:
            return now
        if interval and schedule.is_open(now + interval, zone):
            return now + interval
        closes = schedule.next_change(now, zone)
        return schedule.next_opening(closes, zone) if closes is not None else None

    def _arm(self, just_ran: bool) -> None:
        now = self.clock.seconds()
        at = self._next_run(now, just_ran)
        if at is not None and self.running:
            self._call = self.clock.callLater(max(0.0, at - now), self._tick)

    def _tick(self) -> None:
        self._call = None
        self.run_once().addErrback(lambda f: f.trap(EtrnFailed)).addBoth(lambda _: self._arm(just_ran=True))

    def startService(self) -> None:
        super().startService()
        self._arm(just_ran=False)

    def stopService(self):
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
