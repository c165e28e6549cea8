"""The whole suite runs on patched libraries, as the daemons do (spacehub.server.speedups),
unless SPACEHUB_SPEEDUPS=0: `make test` runs the link and HTTP tests once more that way."""

from __future__ import annotations

from spacehub.server import speedups

speedups.install()
