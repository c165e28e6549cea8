"""The hub's link to its manager: the client service and its state machine."""

from .client import LinkClient, LinkRefused
from .state import LinkState, LinkTrigger

__all__ = ["LinkClient", "LinkRefused", "LinkState", "LinkTrigger"]
