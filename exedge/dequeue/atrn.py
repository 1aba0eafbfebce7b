"""
ATRN (RFC 2645, On-Demand Mail Relay) and TURN: the site's held mail,
delivered over the connection the site opened, turned round.

After `250 OK now reversing the connection` the site becomes the SMTP
server on the same connection (inside TLS if the session was) and exedge
the client: it waits for the site's greeting, says EHLO, and sends the
messages the site asked for with the send side's own client
(L{exedge.send.client.SMTPClient}), with the same per-recipient outcomes,
NDRs and DSNs as any delivery; then QUIT, and the connection closes.

L{Collection} is the delivery agent of that one run: the queue manager
hands it the held messages of the site's queues (L{exedge.interfaces.
IRemoteTriggers}) as it would hand them to the connector's relay agent,
and it gives them to the client as the client asks. What the session does
not settle (the site hung up, never greeted) fails the attempt; the
queues are then held again until the site asks again.
"""

from __future__ import annotations

import itertools

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from exedge.interfaces import IDeliveryAgent, NextHopUnreachable
from exedge.send.client import SMTPClient, Timeouts
from exedge.send.relay import load, outcomes_of


@implementer(IDeliveryAgent)
class Collection:
    concurrency = 1 << 16          # every held message at once: the one session takes them in turn
    connector = None
    batch = 10                     # messages read from the spool at a time: a site back after days may have GBs

    def __init__(self, run, *, helo: str, clock, peer: str, timeouts: Timeouts = Timeouts()):
        """C{run}: where messages are read from the spool (its delivery threads)."""
        self.run = run
        self.helo = helo
        self.clock = clock
        self.peer = peer
        self.timeouts = timeouts
        self.client: SMTPClient | None = None
        self.over = False
        self._waiting: list = []          # (message, indexes, Deferred) not yet given to the client
        self._entries: dict = {}
        self._keys = itertools.count()

    def deliver(self, message, recipients):
        d = defer.Deferred()
        if self.over:
            d.errback(Failure(NextHopUnreachable(f"{self.peer}: the site's session has ended")))
        else:
            self._waiting.append((message, list(recipients), d))
        return d

    def protocol(self) -> SMTPClient:
        """The client that takes the turned connection."""
        self.client = SMTPClient([], helo=self.helo, clock=self.clock, timeouts=self.timeouts,
                                 source=self._source, on_settled=self._settled, peer=self.peer)
        self.client.result.addBoth(self._ended)
        return self.client

    def _source(self, room):
        """The next few messages (the client asks again when it has sent them); [] ends the session."""
        size = self.batch if room is None else min(room, self.batch)
        batch, self._waiting = self._waiting[:size], self._waiting[size:]
        return load(batch, self.run, self._entries, self._keys)

    def _settled(self, message_result) -> None:
        message, indexes, d = self._entries.pop(message_result.message.key)
        d.callback(outcomes_of(message_result, self.client.session.extensions, self.peer))

    def _ended(self, result):
        self.over = True
        why = getattr(result, "error", None) or "the site's session ended"
        left = list(self._entries.values()) + self._waiting
        self._entries, self._waiting = {}, []
        for _, _, d in left:
            if not d.called:
                d.errback(Failure(NextHopUnreachable(f"{self.peer}: {why}")))
        return None
