"""agent.api.http.tune_hypercorn: the socket read size we rely on hypercorn honouring."""

from __future__ import annotations

import hypercorn.trio.tcp_server
import pytest

from agent import limits
from agent.api.http import tune_hypercorn


def test_sets_hypercorns_socket_read_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hypercorn.trio.tcp_server, "MAX_RECV", 2**16)
    tune_hypercorn()
    assert hypercorn.trio.tcp_server.MAX_RECV == limits.SOCKET_READ_BYTES


def test_refuses_a_hypercorn_without_the_constant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(hypercorn.trio.tcp_server, "MAX_RECV")
    with pytest.raises(RuntimeError, match="pinned hypercorn"):
        tune_hypercorn()
