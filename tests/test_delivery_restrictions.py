"""
Exchange 2000's Delivery Restrictions on a send connector:
accept_messages_only_from and reject_messages_from. A recipient whose
message the chosen connector may not carry moves to the next candidate by
cost (the routing-time rule content restrictions use), else it is
returned with an NDR 5.7.1.
"""

import os

import pytest
from twisted.internet import defer, task

from exedge.config import ConfigError, loads
from exedge.interfaces import Outcome
from exedge.queue import Envelope, QueueManager, Recipient, Spool
from exedge.routing import Router


class Agent:
    def __init__(self, name):
        self.connector = type("C", (), {"name": name})()
        self.calls = []

    def deliver(self, message, recipients):
        self.calls.append(message.envelope.sender)
        return defer.succeed([Outcome(i, "delivered", "250 ok") for i in recipients])


class Bouncer:
    def __init__(self):
        self.bounced = []

    def bounce(self, message, outcomes):
        self.bounced.append([(o.enhanced, o.detail) for o in outcomes])
        return defer.succeed(None)

    def success(self, *args):
        return defer.succeed(None)

    def delay(self, *args):
        return defer.succeed(None)


CONNECTORS = """
[[send_connectors]]
name = "Partner link"
address_spaces = ["partner.test;1"]
smart_hosts = ["192.0.2.1"]
dns_routing_enabled = false
{restricted}
[[send_connectors]]
name = "Internet"
address_spaces = ["partner.test;10"]
smart_hosts = ["192.0.2.2"]
dns_routing_enabled = false
{second}
"""


def route(tmp_path, sender, restricted, second=""):
    cfg = loads(CONNECTORS.format(restricted=restricted, second=second))
    spool = Spool(str(tmp_path / sender.replace("@", "_")), lambda f: defer.maybeDeferred(f))
    spool.prepare()
    agents = {c.name: Agent(c.name) for c in cfg.send_connectors}
    bouncer = Bouncer()
    manager = QueueManager(spool, Router(cfg.accepted_domains, cfg.send_connectors), agents, clock=task.Clock(),
                           bouncer=bouncer)
    manager.startService()
    incoming = spool.begin()
    incoming.write(b"Subject: t\r\n\r\nbody\r\n")
    stored = []
    incoming.commit(Envelope(sender=sender, recipients=(Recipient("bob@partner.test"),), size=30)) \
        .addCallback(stored.append)
    manager.submit(stored[0])
    assert os.listdir(spool.queue_dir) == []
    return {name: agent.calls for name, agent in agents.items()}, bouncer.bounced


ONLY_FABRIKAM = 'accept_messages_only_from = ["*@fabrikam.com", "ceo@contoso.com", "<>"]\n'


def test_only_the_senders_it_accepts_go_through_the_restricted_connector(tmp_path):
    assert route(tmp_path, "alice@fabrikam.com", ONLY_FABRIKAM) == (
        {"Partner link": ["alice@fabrikam.com"], "Internet": []}, [])
    assert route(tmp_path, "ceo@contoso.com", ONLY_FABRIKAM)[0]["Partner link"] == ["ceo@contoso.com"]
    assert route(tmp_path, "", ONLY_FABRIKAM)[0]["Partner link"] == [""]                # "<>": reports may
    # everyone else takes the next connector by cost
    assert route(tmp_path, "mallory@contoso.com", ONLY_FABRIKAM) == (
        {"Partner link": [], "Internet": ["mallory@contoso.com"]}, [])


def test_rejected_senders_and_no_connector_left_get_an_ndr(tmp_path):
    calls, bounced = route(tmp_path, "x@news.spam.test", 'reject_messages_from = ["*.spam.test"]\n',
                           second='reject_messages_from = ["*@news.spam.test"]\n')
    assert calls == {"Partner link": [], "Internet": []}
    [[(status, detail)]] = bounced
    assert status == "5.7.1" and "No send connector may carry this message to partner.test" in detail
    assert "on Partner link, the sender <x@news.spam.test> is in its reject_messages_from" in detail
    calls, bounced = route(tmp_path, "y@spam.test", 'reject_messages_from = ["*.spam.test"]\n')
    assert calls["Internet"] == ["y@spam.test"] and bounced == []     # "*.spam.test" is the domain too


@pytest.mark.parametrize("value", ['["not an address"]', '["*x@fabrikam.com"]', '["*.bad domain"]', '["a@"]', "[1]"])
def test_bad_entries_are_config_errors(value):
    with pytest.raises(ConfigError) as e:
        loads(CONNECTORS.format(restricted=f"accept_messages_only_from = {value}\n", second=""), "edge.toml")
    assert "edge.toml:7: send_connectors[0].accept_messages_only_from: " in str(e.value)
