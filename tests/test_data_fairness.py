"""
Fair DATA slots (min_inbound_data_rate): when a connector's
max_inbound_data_sessions are all taken, a DATA evicts the session in DATA
furthest below the minimum rate instead of getting 451 4.3.2.

Sessions on one server's StringSessions with a task.Clock (the data-rate
credit is read from the injected clock; the window is 30 s), from several
peer addresses; the refusals and evictions counted in /metrics' text.
"""

from __future__ import annotations

import os

import pytest

from exedge.config import ConfigError, loads
from exedge.metrics import Metrics
from exedge.queue.incoming import SPILL_THRESHOLD
from exedge.receive.rate import WINDOW, DataRate
from exedge.testing import StringSession
from harness import config_text

MESSAGE = b"From: a@sender.test\r\nTo: bob@example.com\r\nSubject: s\r\n\r\nhello\r\n"
TWO_SLOTS = "max_inbound_data_sessions = 2\nmax_inbound_data_sessions_per_source = \"unlimited\"\n" \
            "connection_inactivity_timeout = \"30m\"\nconnection_timeout = \"1h\"\ntarpit_interval = 0"
LINE = b"x" * 78 + b"\r\n"
TRANSACTION = b"EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<bob@example.com>\r\n"


class Server:
    """Sessions from several addresses on one server context (its table, clock, spool and metrics)."""

    def __init__(self, tmp_path, limits: str = TWO_SLOTS):
        self.spool_dir = str(tmp_path / "spool")
        self.s = StringSession(loads(config_text(2525, internet=limits)), self.spool_dir)
        self.s.context.metrics = self.metrics = Metrics()
        self.clock = self.s.clock

    def session(self, peer: str):
        """A new session from C{peer}, MAIL and RCPT done; (proto, transport)."""
        self.s.peer = peer
        self.s.reconnect()
        assert self.s.codes(TRANSACTION)[-1] == "250 2.1.5"
        return self.s.proto, self.s.transport

    def data(self, proto, transport) -> bytes:
        transport.clear()
        proto.dataReceived(b"DATA\r\n")
        return transport.value()

    def enter(self, proto, transport) -> None:
        """DATA, its 354; the transport cleared (what it holds later was written after)."""
        answer = self.data(proto, transport)
        assert answer.startswith(b"354"), answer
        transport.clear()

    def in_data(self) -> int:
        return self.s.context.connectors.in_data(self.s.proto.connector)

    def incoming(self) -> list[str]:
        return os.listdir(os.path.join(self.spool_dir, "incoming"))

    def counted(self, reason: str) -> float:
        for line in self.metrics.render().decode().splitlines():
            if line.startswith("exedge_data_sessions_refused_total{") and f'reason="{reason}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def trickle(proto, transport, octets: int = 4) -> None:
    transport.clear()
    proto.dataReceived(b"x" * octets)


@pytest.fixture
def server(tmp_path):
    return Server(tmp_path)


def test_a_newcomer_evicts_the_slowest_session_below_the_rate(server):
    slow = [server.session("127.0.0.4"), server.session("127.0.0.5")]
    for proto, transport in slow:
        server.enter(proto, transport)
        # past the spill threshold (a file in incoming/ each), far more than one window can credit
        proto.dataReceived(b"Subject: slow\r\n\r\n" + LINE * (SPILL_THRESHOLD // len(LINE) + 1))
    assert server.in_data() == 2 and len(server.incoming()) == 2
    # 4 octets a second: far below 1024; the first session a little slower still
    for second in range(int(WINDOW) + 5):
        server.clock.advance(1)
        trickle(*slow[1])
        if second % 2:
            trickle(*slow[0])
    newcomer = server.session("127.0.0.1")
    answer = server.data(*newcomer)
    assert answer.startswith(b"354"), answer
    # the slowest one was told why and its connection closed; the other kept its slot
    (evicted, evicted_t), (kept, kept_t) = slow
    assert evicted_t.value().startswith(b"421 4.4.2 ")
    assert b"Data rate too low, closing connection" in evicted_t.value()
    assert evicted_t.disconnecting or evicted_t.disconnected
    assert evicted.draft is None and evicted.reader is None
    assert kept_t.value() == b"" and kept.draft is not None
    assert server.in_data() == 2
    # the evicted session's draft is gone from incoming/: the kept one's remains
    assert len(server.incoming()) == 1
    proto, transport = newcomer
    transport.clear()
    proto.dataReceived(MESSAGE + b".\r\n")
    assert transport.value().startswith(b"250 2.6.0"), transport.value()
    assert len(server.s.sink.messages) == 1
    assert server.counted("evicted_slow") == 1
    assert server.counted("connector_limit") == 0
    evicted.connectionLost()
    assert server.in_data() == 1        # released once, at the eviction, not again


def test_a_session_sending_steadily_is_not_evicted(server):
    fast, slow = server.session("127.0.0.4"), server.session("127.0.0.5")
    for proto, transport in (fast, slow):
        server.enter(proto, transport)
    for _ in range(int(WINDOW) * 3):
        server.clock.advance(1)
        trickle(*fast, octets=1100)        # just above 1024 octets a second (one long line: the rate is what counts)
    newcomer = server.session("127.0.0.1")
    # the slow one went quiet after its 354 (no octet in 3 windows): it is the one to go, not the fast one
    assert server.data(*newcomer).startswith(b"354")
    assert fast[1].value() == b"" and slow[1].value().startswith(b"421 4.4.2")
    # now both slots are busy with sessions at or above the rate: the next DATA waits
    for _ in range(int(WINDOW) * 2):
        server.clock.advance(1)
        trickle(*fast, octets=1100)
        trickle(*newcomer, octets=2048)
    late = server.session("127.0.0.6")
    answer = server.data(*late)
    assert answer.startswith(b"451 4.3.2 "), answer
    assert late[0].txn is not None       # the transaction is kept: DATA again later
    assert fast[1].value() == b"" and newcomer[1].value() == b""
    assert server.counted("connector_limit") == 1 and server.counted("evicted_slow") == 1


def test_only_an_address_holding_no_slot_evicts(server):
    """
    A slowloris address waiting with another session can take neither the
    slot of another slowloris address nor its own (it would renew its
    credit), but a normal client's address, holding none, can. An address
    evicted for slowness evicts nobody until it has finished a message.
    """
    a, b = server.session("127.0.0.4"), server.session("127.0.0.5")
    for proto, transport in (a, b):
        server.enter(proto, transport)
    server.clock.advance(WINDOW * 2)
    waiting = server.session("127.0.0.4")          # an address that holds a slot already
    assert server.data(*waiting).startswith(b"451 4.3.2")
    assert a[1].value() == b"" and b[1].value() == b""
    assert server.data(*server.session("127.0.0.1")).startswith(b"354")
    assert a[1].value().startswith(b"421 4.4.2") and b[1].value() == b""      # equal credit: the one in DATA longest
    newcomer = server.s.proto, server.s.transport
    # 127.0.0.4 holds no slot now, 127.0.0.5 one (slow); but .4 had a session evicted: no chain of
    # evictions from it (its waiting sessions would take the slow slots as fast as they turn slow)
    assert server.data(*waiting).startswith(b"451 4.3.2")
    assert b[1].value() == b""
    # a free slot it may take; once one of its sessions has finished a message, it may evict again
    newcomer[0].dataReceived(MESSAGE + b".\r\n")
    server.enter(*waiting)
    waiting[0].dataReceived(MESSAGE + b".\r\n")
    assert waiting[1].value().startswith(b"250 2.6.0")
    server.enter(*server.session("127.0.0.6"))        # the connector full again: .5 (slow) and .6
    server.clock.advance(WINDOW * 2)                   # both slow now
    # an address holding a slot evicts nobody, not even from one holding as many
    assert server.data(*server.session("127.0.0.6")).startswith(b"451 4.3.2")
    assert b[1].value() == b""
    assert server.data(*server.session("127.0.0.4")).startswith(b"354")
    assert b[1].value().startswith(b"421 4.4.2")


def test_a_rate_of_zero_never_evicts(tmp_path):
    server = Server(tmp_path, TWO_SLOTS + "\nmin_inbound_data_rate = 0")
    slow = [server.session("127.0.0.4"), server.session("127.0.0.5")]
    for proto, transport in slow:
        server.enter(proto, transport)
    server.clock.advance(WINDOW * 10)
    assert server.data(*server.session("127.0.0.1")).startswith(b"451 4.3.2")
    assert all(t.value() == b"" for _, t in slow)
    assert server.counted("connector_limit") == 1


def test_the_per_source_limit_is_not_evicted_for(tmp_path):
    server = Server(tmp_path, TWO_SLOTS.replace('"unlimited"', "1"))
    slow = server.session("127.0.0.4")
    server.enter(*slow)
    server.clock.advance(WINDOW * 2)
    assert server.data(*server.session("127.0.0.4")).startswith(b"451 4.3.2")
    assert slow[1].value() == b""
    assert server.counted("source_limit") == 1 and server.counted("evicted_slow") == 0


def test_a_session_the_disk_holds_up_is_not_evicted(server):
    """Reading stopped by us (the disk behind): its slowness is not the client's."""
    held, slow = server.session("127.0.0.4"), server.session("127.0.0.5")
    for proto, transport in (held, slow):
        server.enter(proto, transport)
    held[0].flow.disk_blocked = True
    server.clock.advance(WINDOW * 3)
    trickle(*slow)
    assert server.data(*server.session("127.0.0.1")).startswith(b"354")
    assert held[1].value() == b"" and slow[1].value().startswith(b"421 4.4.2")


# -- the credit's arithmetic ------------------------------------------------------------


def test_credit_starts_at_the_window_and_a_burst_buys_no_more():
    rate = DataRate(1024, since=100.0)
    assert rate.credit(100.0) == WINDOW
    rate.read(10 * 1024 * 1024, 100.0)             # 10 MiB at once: still one window, not 10,240 s
    assert rate.credit(100.0) == WINDOW
    assert rate.credit(100.0 + WINDOW) == 0
    rate = DataRate(1024, since=0.0)
    for t in range(1, 600):
        rate.read(1024, float(t))                  # exactly the rate: never below
    assert rate.credit(599.0) == WINDOW
    rate.read(4, 700.0)                            # silence for 101 s
    assert rate.credit(700.0) < 0


# -- the key -----------------------------------------------------------------------------


def test_min_inbound_data_rate_parses():
    base = '[[receive_connectors]]\nname = "R"\nbindings = ["127.0.0.1:2525"]\nremote_ip_ranges = ["10.0.0.0/8"]\n'
    assert loads(base, source="t.toml").receive_connectors[0].min_inbound_data_rate == 1024
    assert loads(base + 'min_inbound_data_rate = "unlimited"\n').receive_connectors[0].min_inbound_data_rate is None
    assert loads(base + 'min_inbound_data_rate = 0\n').receive_connectors[0].min_inbound_data_rate == 0
    with pytest.raises(ConfigError) as info:
        loads(base + "min_inbound_data_rate = -1\n", source="t.toml")
    assert str(info.value.problems[0]).startswith("t.toml:5: ")
    assert "min_inbound_data_rate" in str(info.value.problems[0])
