"""Unmask the hubs' websocket frames in C.

A websocket client masks every frame it sends (RFC 6455 §5.3), so every byte a hub
sends up its link arrives XORed with a 4-byte key, and the manager's websocket
parser (wsproto, under hypercorn) undoes it in Python: about 1.2 GB/s, which was an
eighth of the manager's CPU while it relayed a 1 GB ``/output``. ``websockets``
(the hub's link client, already a dependency) ships the same operation as a C
function at some 20 GB/s; :func:`install` puts it behind wsproto's masker.

wsproto (1.3, pinned) builds its masker by the module-level name ``XorMaskerSimple``
for each masked frame, and feeds it the payload piece by piece as the frame
arrives; :class:`CMasker` keeps that contract, the key rotating across pieces.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from wsproto import frame_protocol

logger = logging.getLogger("cpm.link")

#: websockets' C speedup: apply_mask(data, 4-byte key) -> data XOR key repeated
ApplyMask = Callable[[bytes | bytearray, bytes], bytes]

_c_apply_mask: ApplyMask | None
try:
    from websockets.speedups import apply_mask as _c_apply_mask
except ImportError:  # a build without its C extension: wsproto's own masker stays
    _c_apply_mask = None

APPLY_MASK: Final = _c_apply_mask
#: wsproto's masker, kept for the fallback and for tests
PYTHON_MASKER: Final = frame_protocol.XorMaskerSimple


class CMasker:
    """wsproto's ``XorMaskerSimple``, with the XOR done by ``websockets.speedups``."""

    __slots__ = ("_key",)

    def __init__(self, masking_key: bytes | bytearray) -> None:
        self._key = bytes(masking_key)

    def process(self, data: bytes | bytearray) -> bytearray:
        if not data:
            return bytearray(data)
        assert APPLY_MASK is not None  # install() puts this class in place only then
        key = self._key
        unmasked = bytearray(APPLY_MASK(data, key))
        # The next piece of the same frame goes on with the next key byte.
        rotation = len(data) % 4
        if rotation:
            self._key = key[rotation:] + key[:rotation]
        return unmasked


def install() -> bool:
    """Use :class:`CMasker` for every masked frame wsproto parses in this process;
    False (and nothing changed) when websockets has no C speedups here."""
    if not isinstance(getattr(frame_protocol, "XorMaskerSimple", None), type):
        raise RuntimeError("wsproto.frame_protocol.XorMaskerSimple is gone: check the pinned wsproto version")
    if APPLY_MASK is None:
        logger.info("websockets has no C speedups here: websocket frames are unmasked in Python")
        return False
    frame_protocol.XorMaskerSimple = CMasker  # type: ignore[misc,assignment]
    return True
