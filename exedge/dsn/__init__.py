"""The dsn room: delivery status notifications (NDRs now, delay DSNs later)."""

from .bouncer import Bouncer
from .ndr import FailedRecipient, build_ndr, wants_ndr

__all__ = ["Bouncer", "FailedRecipient", "build_ndr", "wants_ndr"]
