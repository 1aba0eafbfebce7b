"""
The queue room: the durable spool, start-up recovery and the per-next-hop
delivery queues.
"""

from .envelope import Envelope, Recipient
from .manager import DeliveryQueue, Outcome, QueueManager, QueueStatus
from .spool import IncomingMessage, Spool, StoredMessage

__all__ = [
    "DeliveryQueue", "Envelope", "IncomingMessage", "Outcome", "QueueManager",
    "QueueStatus", "Recipient", "Spool", "StoredMessage",
]
