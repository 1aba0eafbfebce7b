"""
Runs one SMTP event through the configured stages, in priority order.

A stage is skipped when its receive_connectors do not include the
session's connector, and an anti-spam stage when the session bypasses
anti-spam (the BypassAntiSpam right, or an allow list earlier in this
session). The first final verdict wins. A stage that raises, or does not
answer within its timeout, costs that event a 451 4.3.0 and a line in the
log; the session goes on and nothing is lost.
"""

from __future__ import annotations

import inspect

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from exedge.interfaces import Deferral, IRoutePolicy, Refusal

from .session import Session
from .stage import CONTINUE, Stage, Verdict

log = Logger()

STAGE_FAILED = Verdict("defer", 451, "4.3.0", "Temporary server error; please try again later")


@attrs.define
class Entry:
    stage: object
    priority: int = 100
    connectors: frozenset | None = None    # None: every receive connector
    timeout: float = 30.0


@implementer(IRoutePolicy)
class Pipeline:
    def __init__(self, entries, clock, metrics=None):
        self.entries = sorted(entries, key=lambda e: e.priority)
        self.clock = clock
        self.metrics = metrics          # exedge.metrics.Metrics: each stage's verdicts and time
        self._by_connector: dict[str, list[Entry]] = {}
        self._by_hook: dict[tuple[str, str], list] = {}

    def __bool__(self) -> bool:
        return bool(self.entries)

    def stages_for(self, connector: str) -> list[Entry]:
        found = self._by_connector.get(connector)
        if found is None:
            found = self._by_connector[connector] = [
                e for e in self.entries if e.connectors is None or connector in e.connectors]
        return found

    def needs_queue(self, connector: str) -> bool:
        """Does a stage of this connector ask the queue itself (ETRN, ATRN: L{Stage.needs_queue})?"""
        return any(getattr(e.stage, "needs_queue", False) for e in self.stages_for(connector))

    def _hooked(self, connector: str, hook: str) -> list:
        """
        (entry, method) of the stages on this connector that implement
        C{hook}: a hook no stage implements costs a dictionary lookup.
        """
        key = (connector, hook)
        found = self._by_hook.get(key)
        if found is None:
            found = self._by_hook[key] = []
            for e in self.stages_for(connector):
                method = getattr(e.stage, hook, None)
                # Stage's pass-through defaults are not worth a call
                if method is not None and getattr(method, "__func__", None) is not getattr(Stage, hook, None):
                    found.append((e, method))
        return found

    def verb(self, session: Session, verb: str):
        """
        The handler of a stage's own SMTP verb in this session (a callable
        taking the argument and giving a Verdict, at once or later), or None.
        """
        for entry in self.stages_for(session.connector):
            method = getattr(entry.stage, "verbs", {}).get(verb)
            if method is not None:
                return lambda argument: self._call(entry, verb, method, session, argument)
        return None

    def ehlo_keywords(self, session: Session) -> list[str]:
        """The EHLO keywords of the stages that run in this session."""
        out: list[str] = []
        for entry in self.stages_for(session.connector):
            for keyword in getattr(entry.stage, "ehlo_keywords", ()):
                if keyword not in out:
                    out.append(keyword)
        return out

    def _call(self, entry, hook, method, *args):
        """A verb's answer: a Verdict (CONTINUE for None), at once or as a Deferred."""
        return self._ask(entry, hook, method, args, self._checked)

    def _ask(self, entry, hook, method, args, judge):
        """
        C{judge(answer, stage, hook)} of one stage's answer, at once or as
        a Deferred; a stage that raises or exceeds its timeout gives
        STAGE_FAILED. The one place hooks and verbs are called.
        """
        if self.metrics is not None:
            judge = self._measured(judge, entry.stage.name, hook, self.clock.seconds())
        try:
            result = method(*args)
        except Exception:
            log.failure("stage {stage} failed in {hook}", stage=entry.stage.name, hook=hook)
            return judge(STAGE_FAILED, entry.stage, hook)
        if inspect.isawaitable(result):
            result = defer.ensureDeferred(result)
        if isinstance(result, defer.Deferred):
            d = result.addTimeout(entry.timeout, self.clock)
            d.addErrback(self._failed, entry, hook)
            return d.addCallback(judge, entry.stage, hook)
        return judge(result, entry.stage, hook)

    def _measured(self, judge, stage: str, hook: str, started: float):
        """C{judge}, counting the answer's kind and the time the stage took."""
        def measured(result, *args):
            self.metrics.stage_latency.labels(stage).observe(max(0.0, self.clock.seconds() - started))
            kind = result.kind if isinstance(result, Verdict) else ("continue" if result is None else "invalid")
            self.metrics.verdicts.labels(stage, hook, kind).inc()
            return judge(result, *args)
        return measured

    @classmethod
    def _checked(cls, result, stage, hook):
        return CONTINUE if result is None else cls._verdict(result, stage, hook)

    @staticmethod
    def _verdict(result, stage, hook):
        """C{result} if it is a Verdict; else an error in the log and STAGE_FAILED."""
        if isinstance(result, Verdict):
            return result
        log.error("stage {stage}: {hook} returned {value!r}, not a Verdict", stage=stage.name, hook=hook,
                  value=result)
        return STAGE_FAILED

    @property
    def routes(self) -> bool:
        """Does any stage look at routing?"""
        return any(getattr(type(e.stage), "on_route", None) not in (None, Stage.on_route) for e in self.entries)

    def route(self, envelope, recipient: str, route):
        """
        L{IRoutePolicy}: the next hop after the stages' on_route hooks:
        C{route}, another Route a stage chose, a L{Refusal} (a stage's
        reject: the recipient bounces) or a L{Deferral} (a stage's defer:
        the recipient waits and is routed again later).
        Synchronous: routing runs for every recipient and must not wait.
        Every enabled stage is asked, whichever connector received the
        message (bounces that exedge writes were received by none):
        receive_connectors limits the SMTP hooks only.
        """
        for entry in self.entries:
            method = getattr(entry.stage, "on_route", None)
            if method is None:
                continue
            try:
                result = method(envelope, recipient, route)
            except Exception:
                log.failure("stage {stage} failed in on_route", stage=entry.stage.name)
                continue                      # a broken stage does not bounce mail
            if isinstance(result, Verdict):
                if result.kind == "reject":
                    return Refusal(result.text or "Refused by a routing stage", result.status or "5.7.1")
                if result.kind == "defer":
                    return Deferral(result.text or "Deferred by a routing stage", result.status or "4.7.1")
            elif result is not None:
                route = result
        return route

    def run(self, hook: str, session: Session, *args):
        """
        The deciding L{Verdict} (CONTINUE when no stage decided): at once
        when every stage answers at once, as a Deferred as soon as one
        answers with a Deferred or a coroutine. Most stages answer at once,
        and a session pays for Deferreds only when a stage needs one.
        """
        hooked = self._hooked(session.connector, hook)
        if not hooked:
            return CONTINUE
        return self._from(hooked, 0, hook, session, args)

    def _from(self, entries, i, hook, session, args):
        while i < len(entries):
            entry, method = entries[i]
            i += 1
            stage = entry.stage
            if stage.anti_spam and session.bypass_anti_spam:
                continue
            verdict = self._ask(entry, hook, method, (session, *args), self._judge)
            if isinstance(verdict, defer.Deferred):
                return verdict.addCallback(self._go_on, entries, i, hook, session, args)
            if verdict is not None:
                return verdict
        return CONTINUE

    def _go_on(self, verdict, entries, i, hook, session, args):
        if verdict is not None:
            return verdict
        return self._from(entries, i, hook, session, args)

    @classmethod
    def _judge(cls, result, stage, hook):
        """The verdict that ends this event, or None to ask the next stage."""
        if result is None:
            return None
        result = cls._verdict(result, stage, hook)
        if result.kind == "accept":
            return CONTINUE          # this event is decided: skip the remaining stages
        return result if result.final else None

    @staticmethod
    def _failed(failure, entry, hook):
        if failure.check(defer.TimeoutError):
            log.error("stage {stage}: no answer to {hook} within {timeout}s", stage=entry.stage.name, hook=hook,
                      timeout=entry.timeout)
        else:
            log.failure("stage {stage} failed in {hook}", failure, stage=entry.stage.name, hook=hook)
        return STAGE_FAILED


def then(value, f, *args):
    """f(value) now, or once C{value} (a Deferred) fires."""
    if isinstance(value, defer.Deferred):
        return value.addCallback(f, *args)
    return f(value, *args)
