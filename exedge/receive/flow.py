"""
When a session reads, and in which order it answers: no SMTP in here.

Twisted's line receiver takes lines as fast as they arrive and a protocol
answers when it likes; twisted.mail's server answers pipelined commands
out of order that way (research §1). A mail server must answer every
command in order, must not take the next command while an answer is still
being worked out (a queue write, a stage's verdict, a tarpit), must stop
reading a client that does not read its replies, and must stop reading
message data that the disk cannot keep up with. L{Flow} keeps those
conditions and tells the transport; L{InOrder} sends each answer in turn,
at once or when it is ready.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer, task
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


@implementer(IPushProducer)
class Flow:
    """
    Whether a session takes commands (L{paused}) and reads its socket.

    No command is taken while an answer is pending or while the client is
    not reading its replies. The socket itself stops being read when the
    client is not reading, when message data waits for a slow disk, or when
    the client keeps talking past L{PAUSED_BUFFER_LIMIT} while an answer is
    pending; stopping it on every queue write would cost two epoll calls
    per message for nothing.

    Registered with the transport as its producer (L{watch_replies}): the
    transport says when replies pile up unread in its write buffer. It must
    be unregistered when the session closes (L{close}): Twisted's TLS layer
    postpones its shutdown while a producer is registered, and a TCP
    transport whose producer is paused hands its turn to the producer
    instead of closing.

    Once the client has closed its sending side (L{end_of_input}) the
    socket is never read again, but commands already read are still taken.

    Every connection ends (L{end}): closed after what was written, and
    aborted if it is not gone L{CLOSE_GRACE} seconds later (a client that
    does not read our last reply, or does not answer TLS's close_notify,
    must not keep its slot).
    """

    PAUSED_BUFFER_LIMIT = 64 * 1024
    # seconds a closing connection may take to go (our last reply read, TLS's
    # close_notify answered) before it is aborted: a well-behaved client
    # needs a round trip, and a silent one must not keep its slot
    CLOSE_GRACE = 5.0

    def __init__(self, transport, clock, *, buffered: Callable[[], int], take_more: Callable[[], None],
                 note: Callable[[str], None]):
        """
        C{buffered()}: bytes read but not taken yet; C{take_more()}: go on
        taking commands from them (called when the session may again);
        C{note(text)}: the protocol log, for why a connection was aborted.
        """
        self.transport = transport
        self.clock = clock
        self.buffered = buffered
        self.take_more = take_more
        self.note = note
        self.answer_pending = False
        self.write_blocked = False
        self.paused = False                  # no command may be taken now: answer_pending or write_blocked
        self.disk_blocked = False
        self.reading_stopped = False
        self.closed = False
        self.input_ended = False
        self.gone = False                    # the connection is lost
        self._watching = False
        self._grace_call = None

    def watch_replies(self) -> None:
        """From now on, a client that does not read its replies stops being read."""
        self.transport.registerProducer(self, True)
        self._watching = True

    def update(self) -> None:
        stop = self.write_blocked or self.disk_blocked or \
            (self.paused and self.buffered() > self.PAUSED_BUFFER_LIMIT)
        if stop != self.reading_stopped and not self.closed and not self.input_ended:
            self.reading_stopped = stop
            if stop:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def hold(self) -> None:
        """An answer is being worked out: take no command until L{release}."""
        self.answer_pending = self.paused = True
        self.update()

    def release(self) -> None:
        self.answer_pending = False
        self.paused = self.write_blocked
        self.update()
        if not self.paused:
            self.take_more()

    def wait_for_disk(self, draft) -> None:
        """Message data waits for the disk: read no more until C{draft} has drained."""
        if self.disk_blocked:
            return
        self.disk_blocked = True
        self.update()
        draft.when_drained(self._drained)

    def _drained(self) -> None:
        self.disk_blocked = False
        self.update()

    def end_of_input(self) -> None:
        """
        The client closed its sending side: nothing more will come, and the
        socket must not be read again (Twisted would report its end again).
        """
        self.input_ended = True

    def close(self) -> None:
        """No more reading decisions, and the transport is free to close (the producer let go)."""
        self.closed = True
        if self._watching:
            self._watching = False
            self.transport.unregisterProducer()

    @property
    def ending(self) -> bool:
        """The connection is closing (L{end}) or gone."""
        return self.gone or self._grace_call is not None

    def end(self) -> None:
        """Close the connection after what was written; abort it if it is not gone after CLOSE_GRACE."""
        if self.ending:
            return
        self.close()
        self.transport.loseConnection()
        self._grace_call = self.clock.callLater(
            self.CLOSE_GRACE, self.abort, f"connection not closed {self.CLOSE_GRACE:g} s after the end; aborted")

    def abort(self, why: str | None = None) -> None:
        """Drop the connection now, whatever is still unsent."""
        if self.gone:
            return
        self.close()
        if why is not None:
            self.note(why)
        self.transport.abortConnection()

    def lost(self) -> None:
        """The connection is gone: nothing more to close or abort."""
        self.gone = True
        if self._grace_call is not None and self._grace_call.active():
            self._grace_call.cancel()

    # -- IPushProducer: the transport's word on our replies ----------------------

    def pauseProducing(self) -> None:
        self.write_blocked = self.paused = True
        self.update()

    def resumeProducing(self) -> None:
        self.write_blocked = False
        self.paused = self.answer_pending
        self.update()
        if not self.paused:
            self.take_more()

    def stopProducing(self) -> None:
        pass


class InOrder:
    """
    Sends answers in the order the commands came: an answer that is ready
    goes at once; a Deferred one holds the flow until it fires; an answer
    that may have to wait (its C{tarpit} is true: C{delay_of(answer)}
    seconds) holds it too.

    C{send(answer)} writes it and returns whether the session goes on;
    C{on_error(failure)} turns a failed answer into one to send;
    C{on_broken(failure)} is told of a bug after that, and must end the
    session (never leave it paused for ever).
    """

    def __init__(self, flow: Flow, clock, *, send, delay_of, on_error, on_broken):
        self.flow = flow
        self.clock = clock
        self.send = send
        self.delay_of = delay_of
        self.on_error = on_error
        self.on_broken = on_broken

    def answer(self, result) -> None:
        if isinstance(result, defer.Deferred):
            self.flow.hold()
            result.addErrback(self.on_error)
            result.addCallback(self._emit, True)
            result.addErrback(self.on_broken)
        elif result.tarpit and self.delay_of(result) > 0:
            self._emit(result, False)
        else:
            self.send(result)            # the common case: ready, nothing held, nothing to release

    def _emit(self, answer, resume: bool) -> None:
        delay = self.delay_of(answer) if answer.tarpit else 0
        if delay > 0:
            if not resume:
                self.flow.hold()
            task.deferLater(self.clock, delay, self._send, answer, True).addErrback(self.on_broken)
        else:
            self._send(answer, resume)

    def _send(self, answer, resume: bool) -> None:
        if self.send(answer) and resume:
            self.flow.release()
