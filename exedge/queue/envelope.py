"""
What travels with a message: the SMTP envelope and where it came from.
Stored beside the data in the spool, as JSON (never pickle: the spool is
data, not code).
"""

from __future__ import annotations

import json
import sys

import attrs


@attrs.frozen
class Recipient:
    address: str
    notify: tuple[str, ...] = ()      # RFC 3461 NOTIFY; () = not given
    orcpt: str | None = None          # RFC 3461 ORCPT, "rfc822;user@example.com"


@attrs.frozen(kw_only=True)
class Envelope:
    sender: str                        # "" for the null reverse-path
    recipients: tuple[Recipient, ...]
    ret: str | None = None             # FULL | HDRS
    envid: str | None = None
    auth: str | None = None            # RFC 4954 AUTH= to pass on (xtext; "<>" for none)
    body: str | None = None            # 7BIT | 8BITMIME
    # octets stored, as they will be sent: our Received field and the
    # stages' edits included (what routing checks against max_message_size)
    size: int = 0
    receive_connector: str = ""
    peer: str = ""                     # "ip:port"
    helo: str = ""
    received_at: float = 0.0
    message_id: str = ""               # the Message-ID field, for the tracking log (escaped, capped)
    subject: str = ""                  # the Subject field as written (escaped, capped), for the tracking log
    session: str = ""                  # the receive session's id, tying protocol log and queue id
    notes: dict = attrs.field(factory=dict)   # str -> str that pipeline stages keep with the message (on_route reads them)

    def to_json(self) -> bytes:
        # by hand rather than attrs.asdict: this runs once per message on a
        # spool thread, holding the GIL the reactor wants
        data = {f: getattr(self, f) for f in _SCALARS}
        data["recipients"] = [{"address": r.address, "notify": list(r.notify), "orcpt": r.orcpt}
                              for r in self.recipients]
        return json.dumps(data, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    @classmethod
    def from_json(cls, raw: bytes) -> "Envelope":
        data = json.loads(raw)
        data["recipients"] = tuple(
            Recipient(r["address"], tuple(r.get("notify", ())) or (), r.get("orcpt"))
            for r in data["recipients"]
        )
        # what many queued messages share (their connector, peer, HELO,
        # sender) held once: recovery reads a million envelopes back
        for key in _SHARED:
            value = data.get(key)
            if isinstance(value, str):
                data[key] = sys.intern(value)
        return cls(**data)


_SCALARS = tuple(f.name for f in attrs.fields(Envelope) if f.name != "recipients")
_SHARED = ("sender", "receive_connector", "helo", "body", "ret", "auth")
