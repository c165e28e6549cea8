"""Tell systemd how the daemon is doing: sd_notify, without libsystemd.

A ``Type=notify`` unit gets ``$NOTIFY_SOCKET``, the address of an ``AF_UNIX``
datagram socket: a filesystem path, or a name in the abstract namespace written
with a leading ``@``. Each datagram is newline-separated ``KEY=VALUE`` lines:
``READY=1`` once the service is usable (``systemctl start`` waits for it),
``STATUS=...`` for ``systemctl status``, ``STOPPING=1`` when shutdown begins, and
``WATCHDOG=1`` as the keep-alive of ``WatchdogSec=``.

Why by hand: the protocol is one ``sendto`` and the python-systemd bindings are a
compiled dependency we would have to carry onto every device.

Outside systemd (no ``$NOTIFY_SOCKET``) every call here is a cheap no-op, so the
daemons call it unconditionally. ``$NOTIFY_SOCKET`` stays in the environment on
purpose, because the watchdog keeps using it; processes the hub starts inherit it,
but systemd's default ``NotifyAccess=main`` ignores datagrams from any PID but
the daemon's, and ``WATCHDOG_PID`` tells them the watchdog is not theirs.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Final

import trio

__all__ = ["lifecycle", "notify", "watchdog", "watchdog_interval"]

logger = logging.getLogger("spacehub.notify")

#: Longest a send may block when systemd's receive queue is full: a lost
#: datagram is better than a stalled event loop (the next ping comes soon).
SEND_TIMEOUT: Final = 0.5


def _address(value: str) -> str | None:
    """``$NOTIFY_SOCKET`` as a ``socket`` address; None if it is not a unix one."""
    if value.startswith("@"):
        return "\0" + value[1:]  # the abstract namespace
    if value.startswith("/"):
        return value
    return None  # e.g. "vsock:..." (VMs), which a service on a device never gets


def notify(state: str) -> bool:
    """Send ``state`` (``"READY=1"``, ``"READY=1\\nSTATUS=..."``, ...) to systemd.

    Returns whether it was sent: False when not run by systemd, or when the send
    failed (logged at debug level; notification is best-effort by design).
    """
    value = os.environ.get("NOTIFY_SOCKET", "")
    if not value:
        return False
    address = _address(value)
    if address is None:
        logger.debug("NOTIFY_SOCKET %r is not an AF_UNIX address; not notifying", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto(state.encode(), address)
    except OSError as exc:
        logger.debug("sd_notify %r to %s failed: %s", state, value, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds of ``WatchdogSec=``, or None when no watchdog is asked of this process.

    systemd sets ``WATCHDOG_USEC`` and ``WATCHDOG_PID``; a ``WATCHDOG_PID`` naming
    another process (we were started by the daemon, not by systemd) means no.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    try:
        microseconds = int(usec)
        if pid and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    if microseconds <= 0:
        return None
    return microseconds / 1_000_000


async def watchdog(
    *, interval: float | None = None, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Ping ``WATCHDOG=1`` every half ``interval`` (default: ``watchdog_interval()``)
    until cancelled; returns at once when there is no watchdog to feed.

    The pings come from the event loop itself, so a loop that hangs stops them and
    systemd restarts the daemon: that is the point.
    """
    if interval is None:
        interval = watchdog_interval()
    task_status.started()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval / 2)


async def lifecycle(status: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Start this in the daemon's nursery once its API listens: sends ``READY=1``
    with ``STATUS=<status>``, feeds the watchdog when one is configured, and sends
    ``STOPPING=1`` as soon as the nursery is cancelled (the start of shutdown, not
    its end, so ``systemctl status`` says "deactivating" while requests drain)."""
    notify("READY=1\nSTATUS=" + " ".join(status.splitlines()))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(watchdog)
            task_status.started()
            await trio.sleep_forever()
    finally:
        notify("STOPPING=1")
