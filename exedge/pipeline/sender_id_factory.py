"""
The C{sender_id} stage's factory: its name, hooks and options, without
the check (L{exedge.pipeline.sender_id}). That module imports pyspf and
dnspython, about 0.1 s of every start-up (python -X importtime), so it
is imported only when a configuration builds the stage.
"""

from __future__ import annotations

from zope.interface import implementer

from exedge.config import values as v

from .stage import IStageFactory


def _threads(value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise ValueError(f"threads is a number from 1 to 64, got {value!r}")
    return value


def _dns_timeout(value):
    seconds = float(v.parse_timespan(value))
    if not 1 <= seconds <= 300:
        raise ValueError(f"dns_timeout is 1s to 5m, got {value!r}")
    return seconds


@implementer(IStageFactory)
class SenderIdFactory:
    name = "sender_id"
    anti_spam = True
    hooks = ("on_mail", "on_rcpt", "on_message")
    options = {
        "fail_action": v.choice("StampStatus", "Reject", "Delete"),
        "temp_error_action": v.choice("StampStatus", "Reject"),
        "bypassed_recipients": v.list_of(v.address),
        "bypassed_sender_domains": v.list_of(lambda d: v.parse_domain(d, wildcard=True)),
        "dns_timeout": _dns_timeout,
        "threads": _threads,
    }
    defaults = {"fail_action": "StampStatus", "temp_error_action": "StampStatus", "bypassed_recipients": [],
                "bypassed_sender_domains": [], "dns_timeout": "20s", "threads": 4}

    def build(self, options, context=None):
        from .sender_id import SenderId
        config = getattr(context, "config", None)
        server = getattr(config, "server", None)
        return SenderId(**options, dns_servers=getattr(server, "dns_servers", ()),
                        fqdn=getattr(server, "fqdn", None))
