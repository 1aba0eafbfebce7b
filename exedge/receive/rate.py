"""
The data rate of a session in DATA, as a credit of seconds: who may be
evicted when the connector's DATA slots are full.

C{max_inbound_data_sessions} bounds the memory that messages in flight
hold, but a slot is held as long as its client keeps sending something:
a DATA slowloris (many sessions, each sending its message a few octets a
second) holds every slot of a connector, and every other anonymous client
is told 451 4.3.2 while the attack lasts. Postfix answers the same attack
with C{smtpd_min_data_rate} (with C{smtpd_per_request_deadline}): the
deadline of a DATA request is decremented by the time each read took and
incremented by N / min_rate seconds for the N octets read, never beyond
C{smtpd_timeout}; a client below the rate runs out of time and gets 421
4.4.2. exedge keeps the same arithmetic but spends it only when someone
else needs the slot (L{exedge.receive.connectors.ConnectorTable.admit_data}):
a slow client on an idle server is never hurt, and the timeouts stay the
connector's own.

Written here because it is a few lines of arithmetic on the injected
clock, computed when asked (at a read, and when a DATA finds the slots
full), with no timer per session: 2,000 sessions cost 2,000 small objects,
not 2,000 DelayedCalls rescheduled at every read.
"""

from __future__ import annotations

import attrs

# The credit's ceiling W, in seconds: what a burst can buy in advance, and
# how long a session that stops sending keeps its slot against a newcomer.
# Postfix's is smtpd_timeout (300 s); shorter here, because under attack a
# newcomer waits this long for the first slot to turn evictable, and a
# client that stalls 30 s in the middle of a message is not "sending at a
# reasonable speed". Fixed, not a key: min_inbound_data_rate is the knob.
WINDOW = 30.0


@attrs.define
class DataRate:
    """
    A session's credit, in seconds, from its 354: it starts at C{window};
    time passing takes from it, C{n} octets read add C{n / min_rate}, and
    it never exceeds C{window}. At or below zero the session has sent less
    than C{min_rate} octets a second over (about) the last window.
    """

    min_rate: float               # octets a second; > 0
    since: float                  # the clock's time of the 354
    window: float = WINDOW
    octets: int = 0               # read since the 354 (for the log)
    _credit: float = attrs.field(init=False)
    _at: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._credit, self._at = self.window, self.since

    def credit(self, now: float) -> float:
        """Seconds left at C{now}; <= 0: below the minimum rate."""
        return self._credit - (now - self._at)

    def read(self, n: int, now: float) -> None:
        """C{n} octets arrived at C{now}."""
        self.octets += n
        self._credit = min(self.window, self.credit(now) + n / self.min_rate)
        self._at = now
