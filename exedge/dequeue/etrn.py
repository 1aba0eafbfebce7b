"""
ETRN (RFC 1985) as a pipeline stage: a site asks for the mail held for it.

`[[pipeline]] stage = "etrn"` adds the ETRN verb (and its EHLO keyword) to
the receive connectors it runs on. Mail is held for a site by a send
connector with `remote_triggered_delivery = true`: one queue per domain,
which never opens a connection by itself. ETRN runs those queues once, on
new outbound connections to the connector's usual next hop (its smart
hosts or the domain's MX), as a normal queue run.

The argument is untrusted input (CVE-2025-26794 was an injection through
it): it is checked against hostname and queue-name syntax before it is
used at all, and anything else gets 501 with nothing of it logged (its
length only). Who is not allowed, and a node exedge does not
hold mail for, get the same 459: nobody learns whether mail waits for a
node they may not ask for.

Replies (RFC 1985 §5.2): 250 queuing started (a run was already under way,
or `#queue`), 251 no messages waiting, 252 pending messages started
(`@domain`: the domain and its subdomains), 253 with the number of
messages (`domain`), 458 unable to queue (an admin suspended the queue,
or too many requests), 459 node not allowed, 500/501 syntax, 503 before
EHLO/HELO or inside a mail transaction, 530 when authentication is
required and missing.
"""

from __future__ import annotations

import collections
import ipaddress

from twisted.logger import Logger
from zope.interface import implementer

from exedge.config import values as v
from exedge.pipeline.stage import IStageFactory, Stage, defer_, ok, reject, turn

from .atrn import Collection

log = Logger()

RATE_WINDOW = 60.0
parse_node = v.parse_etrn_node


class Etrn(Stage):
    """
    C{triggers}: the door to the queue (L{exedge.dequeue.Triggers});
    C{send_connectors}: the configuration's, to know which nodes are held
    here; C{clock}: for the rate limit.
    """

    name = "etrn"
    anti_spam = False
    needs_queue = True           # its door is the queue manager's: see Stage.needs_queue

    def __init__(self, triggers, send_connectors, clock, *, allowed_remote_ip_ranges=(),
                 require_authentication=False, rate_limit=10, atrn=False, turn=False, helo="localhost"):
        self.triggers = triggers
        self.held = tuple(c for c in send_connectors if c.remote_triggered_delivery)
        self.clock = clock
        self.allowed = tuple(allowed_remote_ip_ranges)
        self.require_authentication = require_authentication
        self.rate_limit = rate_limit
        self.helo = helo
        self._asked: dict[str, collections.deque] = {}      # peer -> times of its recent requests
        self.verbs = {"ETRN": self.etrn}
        self.ehlo_keywords = ("ETRN",)
        if atrn:
            self.verbs["ATRN"] = self.atrn
            self.ehlo_keywords += ("ATRN",)
        if turn:
            self.verbs["TURN"] = self.turn_verb

    # -- who may ask, for what -------------------------------------------------

    def _peer_allowed(self, session) -> bool:
        if not self.allowed:
            return True        # the receive connector's own remote ranges decided already
        try:
            address = ipaddress.ip_address(session.peer)
        except ValueError:
            return False
        return any(address in r for r in self.allowed)

    def _too_many(self, peer: str) -> bool:
        if not self.rate_limit:
            return False
        now = self.clock.seconds()
        asked = self._asked.setdefault(peer, collections.deque())
        while asked and asked[0] <= now - RATE_WINDOW:
            asked.popleft()
        if len(asked) >= self.rate_limit:
            return True
        asked.append(now)
        if len(self._asked) > 10000:                    # bounded: forget peers that went quiet
            for key in [k for k, times in self._asked.items() if not times or times[-1] <= now - RATE_WINDOW]:
                del self._asked[key]
        return False

    def _serves(self, kind: str, name: str) -> bool:
        """Does a remote-triggered connector hold mail for this node here?"""
        if kind == "queue":
            return any(c.name.lower() == name.lower() for c in self.held)
        for connector in self.held:
            for space in connector.address_spaces:
                if space.match_length(name) is not None:
                    return True
                base = space.domain[2:] if space.domain.startswith("*.") else space.domain
                if kind == "subdomains" and base.endswith("." + name):
                    return True       # ETRN @fabrikam.com asks for branch.fabrikam.com too
        return False

    @staticmethod
    def _match(kind: str, name: str):
        if kind == "domain":
            return lambda hop: hop.destination == name
        if kind == "subdomains":
            return lambda hop: hop.destination == name or hop.destination.endswith("." + name)
        return lambda hop: hop.connector.lower() == name.lower()

    # -- ETRN --------------------------------------------------------------------

    def etrn(self, session, argument: str):
        if not argument:
            return reject("Syntax: ETRN domain, ETRN @domain or ETRN #queue", "5.5.2", 500)
        node = parse_node(argument)
        if node is None:
            # nothing of a hostile argument goes anywhere, the log included
            log.info("ETRN from {peer}: refused an argument of {length} characters that is no node name",
                     peer=session.peer, length=len(argument))
            return reject("Syntax error in parameters: ETRN needs a domain name, @domain or #queue", "5.5.4", 501)
        kind, name = node
        shown_node = ("@" if kind == "subdomains" else "#" if kind == "queue" else "") + name
        if session.helo is None:
            return reject("Send HELO or EHLO first", "5.5.1", 503)
        if session.sender is not None:
            return reject("ETRN not allowed during a mail transaction", "5.5.1", 503)
        if self.require_authentication and session.authenticated_as is None:
            return reject("Authentication required", "5.7.0", 530)
        if not self._peer_allowed(session) or not self._serves(kind, name):
            log.info("ETRN {node} from {peer}: not allowed", node=shown_node, peer=session.peer)
            return defer_(f"Node {shown_node} not allowed: not held here for you", "4.7.1", 459)
        if self._too_many(session.peer):
            return defer_(f"Unable to queue messages for node {shown_node}: too many requests, try later",
                          "4.7.0", 458)
        result = self.triggers.trigger(self._match(kind, name))
        if result is None or result.suspended:
            return defer_(f"Unable to queue messages for node {shown_node}", "4.3.0", 458)
        log.info("ETRN {node} from {peer}: {messages} message(s) waiting, run {what}", node=shown_node,
                 peer=session.peer, messages=result.messages,
                 what="started" if result.started else "already under way" if result.running else "not needed")
        if result.started:
            if kind == "domain":
                return ok(f"OK, {result.messages} pending messages for node {shown_node} started", "2.0.0", 253)
            if kind == "subdomains":
                return ok(f"OK, pending messages for node {shown_node} started", "2.0.0", 252)
            return ok(f"OK, queuing for node {shown_node} started", "2.0.0", 250)
        if result.running:
            return ok(f"OK, queuing for node {shown_node} started", "2.0.0", 250)
        return ok(f"OK, no messages waiting for node {shown_node}", "2.0.0", 251)


    # -- ATRN and TURN: the connection turned round ---------------------------------

    def _collectable(self, account: str) -> list:
        """The remote-triggered connectors whose remote_trigger_accounts name C{account}."""
        account = account.lower()
        return [c for c in self.held if account in {a.lower() for a in c.remote_trigger_accounts}]

    def _turn_round(self, session, connectors, domains, *, what: str, none_waiting):
        names = {c.name for c in connectors}

        def match(hop):
            return hop.connector in names and (not domains or hop.destination in domains)

        # the site's held mail read back off the reactor's thread first: the
        # collection must be handed every message before the connection turns
        return self.triggers.preload(match).addCallback(
            self._turned, session, match, domains, what=what, none_waiting=none_waiting)

    def _turned(self, release, session, match, domains, *, what: str, none_waiting):
        collection = Collection(self.triggers.run, helo=self.helo, clock=self.clock, peer=session.peer)
        try:
            result = self.triggers.trigger(match, collection)
        finally:
            release()
        if result is None or result.suspended or (result.running and not result.started):
            return defer_(f"Unable to process {what} request now", "4.3.0", 451)
        log.info("{what} from {account} at {peer}: {messages} message(s) for {domains}", what=what,
                 account=session.authenticated_as, peer=session.peer, messages=result.messages,
                 domains=", ".join(sorted(domains)) or "all its domains")
        if not result.started and none_waiting is not None:
            return none_waiting
        return turn("OK now reversing the connection", collection.protocol)

    def atrn(self, session, argument: str):
        """RFC 2645: after AUTH, the held mail of the account's domains, over this connection."""
        if session.authenticated_as is None:
            return reject("Authentication required", "5.7.0", 530)
        if session.sender is not None:
            return reject("ATRN not allowed during a mail transaction", "5.5.1", 503)
        domains = set()
        for item in argument.split(",") if argument else ():
            node = parse_node(item.strip())
            if node is None or node[0] != "domain":
                return reject("Syntax: ATRN [domain[,domain...]]", "5.5.4", 501)
            domains.add(node[1])
        mine = self._collectable(session.authenticated_as)
        refused = [d for d in domains
                   if not any(space.match_length(d) is not None for c in mine for space in c.address_spaces)]
        if not mine or refused:
            log.info("ATRN from {account} at {peer} refused", account=session.authenticated_as, peer=session.peer)
            return defer_("ATRN request refused", "4.7.1", 450)
        return self._turn_round(session, mine, domains, what="ATRN",
                                none_waiting=defer_("You have no mail", "4.2.0", 453))

    def turn_verb(self, session, argument: str):
        """
        RFC 821's TURN, only for an authenticated account that may collect
        (anonymous TURN hands one peer another's mail: RFC 5321 App. F).
        """
        if argument:
            return reject("Syntax: TURN", "5.5.4", 501)
        mine = self._collectable(session.authenticated_as) if session.authenticated_as else []
        if not mine:
            return reject("TURN is only for authenticated sites that collect their mail", "5.7.0", 502)
        if session.sender is not None:
            return reject("TURN not allowed during a mail transaction", "5.5.1", 503)
        return self._turn_round(session, mine, set(), what="TURN", none_waiting=None)


def _rate(value):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10000:
        raise ValueError(f"rate_limit is the number of ETRN requests a peer may make a minute (0: no limit), "
                         f"got {value!r}")
    return value


@implementer(IStageFactory)
class EtrnFactory:
    name = "etrn"
    anti_spam = False
    hooks = ()
    options = {
        "allowed_remote_ip_ranges": v.list_of(v.parse_ip_range),
        "require_authentication": v.boolean,
        "rate_limit": _rate,
        "atrn": v.boolean,
        "turn": v.boolean,
    }
    defaults = {"allowed_remote_ip_ranges": [], "require_authentication": False, "rate_limit": 10, "atrn": False,
                "turn": False}

    def build(self, options, context=None):
        config = getattr(context, "config", None)
        triggers = getattr(context, "dequeue", None)
        held = config.send_connectors if config is not None else ()
        if config is not None and not any(c.remote_triggered_delivery for c in held):
            raise ValueError("no send connector has remote_triggered_delivery = true: there is nothing to ask for")
        helo = config.server.fqdn if config is not None else "localhost"
        return Etrn(triggers, held, getattr(context, "clock", None), helo=helo, **options)
