"""hypercorn, configured once for both daemons.

Only configuration lives here; the patches of hypercorn's internals that the
benchmarks earned are in :mod:`spacehub.server.speedups`, applied by each daemon's
entry point.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hypercorn.config import Config as HypercornConfig

from . import limits

__all__ = ["hypercorn_config"]


def hypercorn_config(
    hostname: str,
    port: int,
    log: logging.Logger,
    *,
    app_queue: int = limits.HTTP_APP_QUEUE_MESSAGES,
    websocket_max_message: int | None = None,
    tls: tuple[Path, Path] | None = None,
) -> HypercornConfig:
    """A hypercorn config serving ``hostname:port``: no access log, no Server header,
    request bodies read only as fast as the app takes them (``app_queue`` messages
    ahead), ``limits.SHUTDOWN_GRACE`` seconds for open exchanges at shutdown, and TLS
    from ``tls`` = (certificate, key) when given."""
    config = HypercornConfig()
    host = f"[{hostname}]" if ":" in hostname else hostname
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = log.getChild("http")
    config.graceful_timeout = limits.SHUTDOWN_GRACE
    config.include_server_header = False
    config.max_app_queue_size = app_queue
    if websocket_max_message is not None:
        config.websocket_max_message_size = websocket_max_message
    if tls is not None:
        config.certfile, config.keyfile = str(tls[0]), str(tls[1])
    return config
