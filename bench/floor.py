"""The stack's floor: hypercorn's Trio worker serving an ASGI app that does nothing of ours.

.venv/bin/python -m bench.floor [CERT_DIR]     # TLS with CERT_DIR/server.pem and server.key, else plain

Prints ``API on HOST:PORT`` and ``Running`` (the lines bench.link's ``daemon()`` waits for), then
answers on 127.0.0.1:

- ``GET /version``: a constant JSON body of about the size of a hub's /version;
- ``GET /stream?N``: N bytes of zeros in 256 KiB pieces, chunked like a streamed hub response.

bench.link measures this process's CPU per call and per GB beside the manager's. Whatever
the Space path costs beyond it is ours; what it costs itself, no relay built on hypercorn
with TLS can avoid. It sets glibc's malloc thresholds as ``sth`` and ``cpm`` do
(spacehub.server.allocator).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from spacehub.server.allocator import tune_malloc
from spacehub.server.http import answer_lifespan

PIECE = 256 * 1024
_ZEROS = bytes(PIECE)
_VERSION = json.dumps(
    {"service": "@scramjet/host", "apiVersion": "v1", "version": "0.0.0-floor", "build": "floor"}
).encode()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    if scope["path"] == "/stream":
        total = int(scope["query_string"] or b"0")
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        while total > 0:
            piece = _ZEROS[: min(total, PIECE)]
            total -= len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(_VERSION)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": _VERSION})


async def main(cert_dir: Path | None) -> None:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.include_server_header = False
    if cert_dir is not None:
        config.certfile = str(cert_dir / "server.pem")
        config.keyfile = str(cert_dir / "server.key")
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, app, config)
        address = binds[0].split("://", 1)[1]
        print(f"API on {address}\nRunning", flush=True)


if __name__ == "__main__":
    tune_malloc()  # as sth and cpm do: the floor is the stack at its best, not glibc's page faults
    trio.run(main, Path(sys.argv[1]) if len(sys.argv) > 1 else None)
