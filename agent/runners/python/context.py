"""The ``context`` a sequence gets as ``run``'s first argument (the original's AppContext)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from spacehub.protocol.runner import (
    Code,
)

from .base import _as_seconds, _KeepAlive, _NdjsonHandler, _SequenceLogger

if TYPE_CHECKING:
    from .control import ControlChannel
    from .hub_client import HubClient


class AppContext:
    """The ``context`` a sequence's ``run`` gets; names follow the original Python runner."""

    def __init__(self, runner: ControlChannel, config: dict[str, Any]) -> None:
        self._runner = runner
        self.config = config
        self.instance_id = runner.instance_id
        self.logger: logging.Logger = _SequenceLogger("Sequence", logging.DEBUG)
        self.logger.addHandler(_NdjsonHandler(runner.log))
        self.logger.propagate = False
        self._handlers: dict[str, list[Callable[..., Any]]] = {}
        self._stop_handlers: list[Any] = []
        self._health_check: Callable[[], Any] | None = None
        self._hub: HubClient | None = None

    @property
    def instanceId(self) -> str:  # the original runner's spelling
        return self.instance_id

    @property
    def hub(self) -> HubClient:
        """A client of the hub this instance runs on (see ``hub_client``); made on first use."""
        if self._hub is None:
            from .hub_client import HubClient

            self._hub = HubClient(os.environ.get("SPACEHUB_HUB_URL", ""))
        return self._hub

    def on(self, event_name: str, callback: Callable[..., Any] | None = None) -> Any:
        """Call ``callback(message)`` on each event ``event_name`` from the hub.

        A plain function runs in the control thread (it answers while the loop is busy);
        an ``async def`` one runs on the loop. Without ``callback``, a decorator.
        """
        if callback is None:

            def register(fn: Callable[..., Any]) -> Callable[..., Any]:
                self.on(event_name, fn)
                return fn

            return register
        self._handlers.setdefault(event_name, []).append(callback)
        return callback

    def handlers(self, event_name: str) -> list[Callable[..., Any]]:
        return list(self._handlers.get(event_name, ()))

    @property
    def has_handlers(self) -> bool:
        return any(self._handlers.values())

    def emit(self, event_name: str, message: Any = "") -> None:
        """Send an event to the hub (any thread); ``message`` must be JSON-serialisable."""
        self._runner.send(Code.EVENT, {"eventName": event_name, "message": message})

    def set_stop_handler(self, handler: Any) -> None:
        """``handler(timeout_seconds, can_keep_alive)``, sync or async; several may be set."""
        self._stop_handlers.append(handler)

    def stop_handlers(self) -> list[Any]:
        return list(self._stop_handlers)

    def set_health_check(self, health_check: Callable[[], Any]) -> None:
        """``health_check()`` returns ``{"healthy": bool}`` or a bool; sync or async."""
        self._health_check = health_check

    @property
    def health_check(self) -> Callable[[], Any] | None:
        return self._health_check

    def keep_alive(self, timeout: float | str = 0) -> _KeepAlive:
        """Ask the hub not to kill the instance after the current stop.

        ``timeout`` is in seconds, as in the original runner (where awaiting this slept
        that long); ALIVE carries it in milliseconds: ``{"keepAlive": int(timeout * 1000)}``.
        The message is sent when this is called; awaiting the result sleeps ``timeout``.
        """
        seconds = _as_seconds(timeout)
        self._runner.keep_alive(seconds)
        return _KeepAlive(seconds)
