"""
The extension points of exedge. Rooms meet at these interfaces and at
nothing else.
"""

from zope.interface import Attribute, Interface


class IMessageStore(Interface):
    """Where the receive side puts messages (the spool)."""

    def begin():
        """
        Start a message. Returns an object with C{write(bytes)},
        C{commit(envelope) -> Deferred[StoredMessage]} (fires only once the
        message is durable) and C{abort()}; its C{queue_id} is already set.
        """


class IQueueSink(Interface):
    """Who learns of committed messages (the queue manager)."""

    def submit(message):
        """Route and enqueue a committed L{exedge.queue.spool.StoredMessage}."""


class IDeliveryAgent(Interface):
    """
    Carries messages for one send connector to their next hop (a drop
    directory, or SMTP to smart hosts or MX hosts).
    """

    connector = Attribute("the L{exedge.config.SendConnector} served")
    concurrency = Attribute("how many deliveries of one queue may be in flight at once")

    def deliver(message, recipients):
        """
        Deliver C{message} to the recipients with these indexes. Returns a
        Deferred firing with a list of L{exedge.queue.manager.Outcome}, one
        per recipient; a failed Deferred is a transient failure of the
        whole attempt.
        """
