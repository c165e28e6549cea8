"""spacehub.server.allocator: with the thresholds set, freeing a few stream-sized buffers at once no
longer hands their pages back to the kernel only to fault them in again."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from spacehub.server import allocator

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only"
)

# Four 300 KiB buffers (a link frame, its TLS output, ...) made and freed together, 50 times,
# once to warm up and once counted: page faults of the second round.
CHURN = textwrap.dedent(
    """
    import resource, sys
    from spacehub.server.allocator import tune_malloc
    if sys.argv[1] == "tuned" and not tune_malloc():
        sys.exit("mallopt refused")

    def churn():
        for _ in range(50):
            pieces = [bytearray(300 * 1024) for _ in range(4)]
            del pieces

    churn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(mode: str) -> int:
    # A process of its own: the thresholds are process-wide and cannot be put back.
    done = subprocess.run(
        [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, timeout=60, check=True
    )
    return int(done.stdout.strip())


def test_buffers_freed_together_are_reused_without_page_faults() -> None:
    untuned, tuned = _faults("default"), _faults("tuned")
    pages = 50 * 4 * 300 * 1024 // 4096
    assert untuned > pages // 4, f"glibc's defaults no longer churn ({untuned} faults): still needed?"
    assert tuned < pages // 100


def test_the_thresholds_cover_a_link_frame() -> None:
    from spacehub.protocol.link import FRAME_HEADER_SIZE, MAX_FRAME_PAYLOAD

    # A frame with its header, plus TLS's per-record overhead, stays under the mmap threshold.
    assert MAX_FRAME_PAYLOAD + FRAME_HEADER_SIZE + 64 * 1024 < allocator.MMAP_THRESHOLD
    assert allocator.TRIM_THRESHOLD >= allocator.MMAP_THRESHOLD
