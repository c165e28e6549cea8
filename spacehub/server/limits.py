"""Every bound the shared server layer keeps, by name (the daemons' own are in
``agent.limits`` and the manager's modules)."""

from __future__ import annotations

from typing import Final

KiB: Final = 1024
MiB: Final = 1024 * KiB

#: Largest JSON request body (start payloads, events, stop/kill options).
MAX_JSON_BODY_BYTES: Final = 1 * MiB
#: Deepest nesting of arrays and objects accepted in a JSON body: deeper is refused
#: with 400 before the parser's recursion could cost the daemon.
MAX_JSON_DEPTH: Final = 64
#: Most bytes the HTTP server reads from a socket at once (hypercorn's own is 64 KiB).
#: Each read costs a pass through h11 and the request's queue, so a larger read
#: takes about a third off the hub's CPU per GB streamed in (see bench/README.md).
SOCKET_READ_BYTES: Final = 256 * KiB
#: Most of an unread request body read (and dropped) before answering an error,
#: and for how long (seconds): so that a client still sending it gets the answer.
DRAIN_BODY_BYTES: Final = 1 * MiB
DRAIN_SECONDS: Final = 1.0
#: Request-body messages hypercorn may queue ahead of the app (each at most one
#: socket read): with SOCKET_READ_BYTES, at most 1 MiB per streaming request.
HTTP_APP_QUEUE_MESSAGES: Final = 4
#: Seconds open HTTP exchanges get to finish when a daemon shuts down.
SHUTDOWN_GRACE: Final = 1.0
