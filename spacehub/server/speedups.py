"""Every patch of a third-party library's internals, in one place.

Each patch here was measured (``bench/``) to matter on the hot path of a stream, and
needs something its library offers no setting for. They are kept apart from the code
that configures the libraries, and each one:

- names the distribution and the exact version it was written against; on any other
  version it is skipped with one log line (the daemon runs, only slower);
- is applied by :func:`install`, called once from each daemon's entry point (``sth``,
  ``cpm``), never as a side effect of building a configuration;
- can be undone: :func:`uninstall` puts every original back (tests use it);
- is off altogether with ``SPACEHUB_SPEEDUPS=0`` in the environment.

``docs/architecture.md`` lists them, with what each buys, in one table.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from . import limits

__all__ = ["ENV_SWITCH", "PATCHES", "Patch", "describe", "enabled", "install", "installed", "uninstall"]

logger = logging.getLogger("spacehub.speedups")

#: The environment variable that turns every patch off when set to ``0``.
ENV_SWITCH: Final = "SPACEHUB_SPEEDUPS"

#: Undoes one patch.
Undo = Callable[[], None]


@dataclass(frozen=True, slots=True)
class Patch:
    """One patch: what it changes, the versions it was written for, and how to apply it."""

    name: str
    #: distribution name -> the version the patch was written and measured against
    written_for: dict[str, str]
    #: applies the patch; returns how to undo it, or None when it cannot apply here
    apply: Callable[[], Undo | None]

    def mismatch(self) -> str | None:
        """Why this patch does not fit the installed libraries, or None when it does."""
        for distribution, version in self.written_for.items():
            found = installed_version(distribution)
            if found is None:
                return f"{distribution} is not installed"
            if found != version:
                return f"written for {distribution} {version}, found {found}"
        return None


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (its import name is the same), from the
    ``<name>-<version>.dist-info`` (or ``.egg-info``) beside the package.

    Not ``importlib.metadata``: that imports email, csv and zipfile, about 1.8 MB of RSS in a
    hub that runs alone, for four names.
    """
    spec = importlib.util.find_spec(distribution)
    if spec is None or not spec.submodule_search_locations:
        return None
    site = Path(next(iter(spec.submodule_search_locations))).parent
    prefix = f"{distribution.lower().replace('-', '_')}-"
    for entry in site.iterdir():
        name = entry.name.lower()
        for suffix in (".dist-info", ".egg-info"):
            if name.startswith(prefix) and name.endswith(suffix):
                return entry.name[len(prefix) : -len(suffix)].split("-py", 1)[0]
    return None


# -- socket-reads: hypercorn reads 256 KiB per socket read ------------------------------------


def _socket_reads() -> Undo | None:
    """hypercorn's Trio server reads 64 KiB per ``receive_some`` from a module constant
    with no setting for it; every read then goes through h11, the stream and the app's
    queue. Streaming 1 GB into the hub, that per-read cost was about a third of its CPU.
    The constant is read on every call, so setting it before serving is enough; the
    request queue (``max_app_queue_size``) still bounds what is read ahead."""
    import hypercorn.trio.tcp_server as tcp_server

    original = getattr(tcp_server, "MAX_RECV", None)
    if not isinstance(original, int):
        return None
    tcp_server.MAX_RECV = limits.SOCKET_READ_BYTES

    def undo() -> None:
        tcp_server.MAX_RECV = original

    return undo


# -- c-unmask: websocket frames unmasked in C ----------------------------------------------------


class CMasker:
    """wsproto's ``XorMaskerSimple``, with the XOR done by ``websockets.speedups``.

    A websocket client masks every frame it sends (RFC 6455 §5.3), so every byte a hub
    sends up its link arrives XORed with a 4-byte key, and wsproto (under hypercorn)
    undoes it in Python at about 1.2 GB/s: an eighth of the manager's CPU while it
    relayed a 1 GB ``/output``. ``websockets`` (already a dependency) ships the same
    operation in C at some 20 GB/s. wsproto builds its masker by the module-level name
    ``XorMaskerSimple`` for each masked frame and feeds it the payload piece by piece;
    this class keeps that contract, the key rotating across pieces.
    """

    __slots__ = ("_key",)

    #: websockets' C function: apply_mask(data, 4-byte key) -> data XOR key repeated
    apply_mask: Callable[[bytes | bytearray, bytes], bytes] | None = None

    def __init__(self, masking_key: bytes | bytearray) -> None:
        self._key = bytes(masking_key)

    def process(self, data: bytes | bytearray) -> bytearray:
        if not data:
            return bytearray(data)
        apply_mask = CMasker.apply_mask
        assert apply_mask is not None  # installed only when websockets has its C speedups
        key = self._key
        unmasked = bytearray(apply_mask(data, key))
        # The next piece of the same frame goes on with the next key byte.
        rotation = len(data) % 4
        if rotation:
            self._key = key[rotation:] + key[:rotation]
        return unmasked


def _c_unmask() -> Undo | None:
    from wsproto import frame_protocol

    try:
        from websockets.speedups import apply_mask
    except ImportError:  # a build without its C extension: wsproto's own masker stays
        return None
    original = getattr(frame_protocol, "XorMaskerSimple", None)
    if not isinstance(original, type):
        return None
    CMasker.apply_mask = apply_mask
    frame_protocol.XorMaskerSimple = CMasker  # type: ignore[misc,assignment]

    def undo() -> None:
        frame_protocol.XorMaskerSimple = original  # type: ignore[misc,assignment]

    return undo


# -- draining-tls-reads: one read hands over every TLS record received ----------------------------


class DrainingTLSStream:
    """The parts of ``trio.SSLStream`` hypercorn's ``TCPServer`` uses, draining on read.

    trio's ``SSLStream.receive_some`` returns the plaintext of one TLS record (at most
    16 KiB) even when its socket read brought in four; hypercorn's read loop then runs
    once per record, and each pass (a timeout scope, h11 or wsproto, the app's queue)
    costs more than the decryption: relaying 1 GB from a hub, about a fifth of the
    manager's CPU. When records are already waiting in the stream's incoming buffer,
    a read here decrypts them all at once, up to ``max_bytes``, without waiting;
    otherwise it is trio's own read. Reading from the ``SSLObject`` directly is what
    ``SSLStream`` does itself; anything OpenSSL wants to send back (a TLS 1.3 key
    update) stays in the outgoing buffer, flushed by the stream's next operation.
    Errors are left to ``SSLStream``: on any, the wrapper returns what it has, or hands
    the read to trio, which meets the error itself.

    ``send_eof`` is deliberately missing: hypercorn takes the AttributeError to mean
    TLS, as it does for ``SSLStream`` itself.
    """

    __slots__ = ("_handshaken", "_incoming", "_ssl_object", "_tls", "transport_stream")

    def __init__(self, tls: trio.SSLStream[Any]) -> None:
        self._tls = tls
        self._ssl_object: ssl.SSLObject = tls._ssl_object  # see the class docstring
        self._incoming: ssl.MemoryBIO = tls._incoming
        #: drained reads only after the handshake, which stays trio's
        self._handshaken = False
        self.transport_stream = tls.transport_stream

    async def do_handshake(self) -> None:
        await self._tls.do_handshake()
        self._handshaken = True

    def selected_alpn_protocol(self) -> str | None:
        protocol: str | None = self._tls.selected_alpn_protocol()
        return protocol

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._tls.send_all(data)

    async def aclose(self) -> None:
        await self._tls.aclose()

    # Not a coroutine function: while it waits on the socket, an idle link keeps trio's
    # frames only, none of ours (at 5,000 links one frame is 1.3 MB).
    def receive_some(self, max_bytes: int | None = None) -> Awaitable[bytes | bytearray]:
        if self._handshaken and max_bytes is not None and self._incoming.pending:
            drained = self._drain(max_bytes)
            if drained:
                return _ready(drained)
        return self._tls.receive_some(max_bytes)

    def _drain(self, max_bytes: int) -> bytearray:
        """Decrypt the whole records already received, up to ``max_bytes``."""
        gathered = bytearray()
        while len(gathered) < max_bytes and self._incoming.pending:
            try:
                more = self._ssl_object.read(max_bytes - len(gathered))
            except ssl.SSLError:  # a partial record (want-read), close_notify, a bad record: trio's
                break
            if not more:
                break
            gathered += more
        return gathered


async def _ready(data: bytearray) -> bytearray:
    return data


def _draining_tls_reads() -> Undo | None:
    import hypercorn.trio.run as hypercorn_run

    server = getattr(hypercorn_run, "TCPServer", None)
    names = trio.SSLStream.__init__.__code__.co_names
    if server is None or "_ssl_object" not in names or "_incoming" not in names:
        return None

    def draining_server(app: Any, config: Any, context: Any, state: Any, stream: Any) -> Any:
        if isinstance(stream, trio.SSLStream):
            stream = DrainingTLSStream(stream)
        return server(app, config, context, state, stream)

    hypercorn_run.TCPServer = draining_server  # type: ignore[assignment,attr-defined]

    def undo() -> None:
        hypercorn_run.TCPServer = server  # type: ignore[attr-defined]

    return undo


#: Every patch, in the order they are applied.
PATCHES: Final = (
    Patch("socket-reads", {"hypercorn": "0.18.0"}, _socket_reads),
    Patch("c-unmask", {"wsproto": "1.3.2", "websockets": "17.4"}, _c_unmask),
    Patch("draining-tls-reads", {"trio": "0.35.0", "hypercorn": "0.18.0"}, _draining_tls_reads),
)

_undo: dict[str, Undo] = {}
#: why each patch not in place was skipped, for :func:`describe`
_skipped: dict[str, str] = {}


def enabled() -> bool:
    """Whether the environment allows the patches (``SPACEHUB_SPEEDUPS=0`` does not)."""
    return os.environ.get(ENV_SWITCH, "1").strip() != "0"


def install(log: logging.Logger = logger, only: Collection[str] | None = None) -> frozenset[str]:
    """Apply every patch (or those named in ``only``) that fits the installed libraries (once;
    again is a no-op); the names of those in place. Nothing at all with ``SPACEHUB_SPEEDUPS=0``."""
    if not enabled():
        return installed()
    for patch in PATCHES:
        if patch.name in _undo or (only is not None and patch.name not in only):
            continue
        reason = patch.mismatch()
        undo = patch.apply() if reason is None else None
        if undo is None:
            reason = reason or "what it patches is not there"
            if _skipped.get(patch.name) != reason:
                log.info("speed-up %s skipped: %s", patch.name, reason)
            _skipped[patch.name] = reason
            continue
        _skipped.pop(patch.name, None)
        _undo[patch.name] = undo
    return installed()


def describe() -> str:
    """One line for a daemon's log: the patches in place, and why any is not."""
    if not enabled():
        return f"speed-ups off ({ENV_SWITCH}=0)"
    parts = [f"speed-ups: {', '.join(_undo) or 'none'}"]
    parts += [f"{name} skipped ({reason})" for name, reason in _skipped.items()]
    return "; ".join(parts)


def installed() -> frozenset[str]:
    """The names of the patches in place now."""
    return frozenset(_undo)


def uninstall() -> None:
    """Put back every original the patches replaced."""
    for name in reversed(list(_undo)):
        _undo.pop(name)()
