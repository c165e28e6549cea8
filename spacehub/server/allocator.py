"""glibc malloc settings for the daemons, which move large buffers all the time.

A stream crosses a daemon in pieces of about 256 KiB (the link's frames, TLS output, h11
bodies). glibc serves such sizes from mmap at first, then from the heap once its dynamic
threshold has risen, but it gives the top of the heap back to the kernel as soon as more than
twice that threshold lies free there. Freeing a few pieces at once does that, and the next
pieces touch fresh pages again: a hub relaying 1 GB through the link took about 290,000 page
faults (more than one per 4 KiB relayed) and about a tenth of its CPU on them (bench/README.md).

:func:`tune_malloc` fixes the thresholds instead: pieces up to :data:`MMAP_THRESHOLD` come from
the heap, and up to :data:`TRIM_THRESHOLD` of free heap top stays mapped. So a daemon keeps at
most that much more resident than it would otherwise. It is a no-op on a C library without
``mallopt`` (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Final

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_malloc"]

logger = logging.getLogger(__name__)

#: Allocations at least this large get their own mmap; smaller ones come from the heap.
MMAP_THRESHOLD: Final = 1024 * 1024
#: Free memory at the top of the heap beyond this goes back to the kernel.
TRIM_THRESHOLD: Final = 2 * 1024 * 1024

# <malloc.h>
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3


def tune_malloc() -> bool:
    """Set glibc's mmap and trim thresholds (see the module's docstring); False where there is no
    ``mallopt`` or it refused."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    mmap_set: int = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    trim_set: int = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    done = mmap_set == 1 and trim_set == 1
    if not done:
        logger.debug("mallopt refused the thresholds; keeping the C library's defaults")
    return done
