"""The NAT tests' topology fixture (the namespaces themselves: harness/netns.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.netns import CLOUD_IP, NsClient, Topology, netns_unavailable

__all__ = ["CLOUD_IP", "NsClient", "Topology", "netns_unavailable", "topology"]


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """Edge behind NAT, router, cloud; torn down (processes, then namespaces) no matter what."""
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    topo = Topology(log_dir=tmp_path_factory.mktemp("netns-logs"))
    try:
        topo.build()
        yield topo
    finally:
        topo.destroy()
