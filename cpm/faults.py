"""Fault injection, for chaos tests and for operators rehearsing failures without root.

Off unless ``cpm serve --fault-injection``; then ``POST /api/v1/faults`` (and ``DELETE`` to
clear) is served, to callers on loopback only. What it does to the links of the hubs it
names (``"hub": "<id>"`` or ``"*"``):

- ``cut``: close each link now (code 1011), as a crashed proxy does; the hub reconnects.
- ``partition``: for that many seconds nothing passes either way, as in a network partition:
  messages are held, not lost (TCP holds them too), and pass when it ends; a link silent past
  its limits is closed by both ends before then, as a real one would be.
- ``delay``: for ``for`` seconds, every message each way waits this long first.
- ``registryWrites``: for that many seconds, a registry transaction that would write fails
  (as a full or read-only disk does); reads go on.

Faults end by themselves; nothing here is written to disk.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Final

import trio

from .errors import BadRequest

__all__ = ["MAX_FAULT_SECONDS", "Faults", "LinkFault"]

#: The longest a fault may be asked to last.
MAX_FAULT_SECONDS: Final = 3600.0


@dataclass(slots=True)
class LinkFault:
    #: trio time the partition ends (0: none)
    partition_until: float = 0.0
    #: seconds each message waits, until delay_until
    delay: float = 0.0
    delay_until: float = 0.0

    def held(self, now: float) -> float:
        """Seconds the partition still holds messages (0: none)."""
        return max(0.0, self.partition_until - now)

    def delaying(self, now: float) -> float:
        return self.delay if now < self.delay_until else 0.0


class Faults:
    """The faults in force. Links look theirs up by hub id on each message (a dict lookup)."""

    def __init__(self) -> None:
        self._links: dict[str, LinkFault] = {}
        self._any = LinkFault()
        #: time.monotonic() registry writes work again (the registry runs in worker threads)
        self.registry_fails_until = 0.0

    def for_hub(self, hub_id: str) -> LinkFault | None:
        if not self._links and not (self._any.partition_until or self._any.delay_until):
            return None
        return self._links.get(hub_id, self._any)

    def registry_writes_fail(self) -> bool:
        return time.monotonic() < self.registry_fails_until

    def clear(self) -> None:
        self._links.clear()
        self._any = LinkFault()
        self.registry_fails_until = 0.0

    def apply(self, spec: Any) -> dict[str, Any]:
        """Take a fault request (the JSON body); what will be done: ``cut`` is left to the
        caller, who holds the links."""
        if not isinstance(spec, dict):
            raise BadRequest('expected {"hub": "<id>" or "*", "cut", "partition", "delay", "registryWrites"}')
        unknown = set(spec) - {"hub", "cut", "partition", "delay", "for", "registryWrites"}
        if unknown:
            raise BadRequest(f"unknown fault fields: {', '.join(sorted(unknown))}")
        hub = spec.get("hub", "*")
        if not isinstance(hub, str) or not hub:
            raise BadRequest('hub is a hub id or "*"')
        cut = spec.get("cut", False)
        if not isinstance(cut, bool):
            raise BadRequest("cut is true or false")
        partition = _seconds(spec, "partition")
        delay = _seconds(spec, "delay")
        lasting = _seconds(spec, "for")
        registry = _seconds(spec, "registryWrites")
        if delay and not lasting:
            raise BadRequest("a delay needs a duration: for (seconds)")
        now = trio.current_time()
        if partition or delay:
            fault = self._any if hub == "*" else self._links.setdefault(hub, LinkFault())
            if partition:
                fault.partition_until = now + partition
            if delay:
                fault.delay, fault.delay_until = delay, now + lasting
        if registry:
            self.registry_fails_until = time.monotonic() + registry
        applied = {"hub": hub, "cut": cut, "partition": partition, "delay": delay, "for": lasting}
        return {**applied, "registryWrites": registry}


def _seconds(spec: dict[str, Any], name: str) -> float:
    value = spec.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"{name} is a number of seconds")
    if not 0 <= value <= MAX_FAULT_SECONDS:
        raise BadRequest(f"{name} is 0 to {MAX_FAULT_SECONDS:g} seconds")
    return float(value)
