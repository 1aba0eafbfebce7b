"""The dsn room: delivery status notifications (NDRs now, delay DSNs later)."""

from .bouncer import Bouncer
from .ndr import FailedRecipient, build_ndr, wants_delay_notice, wants_ndr

__all__ = ["Bouncer", "FailedRecipient", "build_ndr", "wants_delay_notice", "wants_ndr"]
