from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import HubProcess, run_sth

#: Every instance test runs once per runtime: `process` always, `podman` where it works.
RUNTIMES = ("process", "podman")


@functools.cache
def podman_works() -> bool:
    from agent.runtimes.podman import podman_available

    return podman_available()


def require_runtime(runtime: str) -> None:
    if runtime == "podman" and not podman_works():
        pytest.skip("podman runtime: `podman info` fails here (install podman, see docs/podman.md)")


@pytest.fixture(scope="module", params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    require_runtime(name)
    return name


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, runtime: str) -> Iterator[HubProcess]:
    """One real `sth` per test module and runtime; finished instances stay listed 30 s."""
    root: Path = tmp_path_factory.mktemp("sequences")
    # Node.js instances linger 0.3 s after their output ended here, not the default 10 s
    # (test_node_sequences.py has a hub of its own for that).
    args = ("--instance-lifetime", "30", "--kill-grace", "1", "--node-exit-timeout", "0.3")
    with run_sth(root, "--runtime", runtime, *args) as process:
        yield process
        assert process.alive(), "sth died during the tests"
