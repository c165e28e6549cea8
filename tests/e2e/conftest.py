from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import HubProcess, run_sth


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """One real `sth` per test module; finished instances stay listed 30 s."""
    root: Path = tmp_path_factory.mktemp("sequences")
    with run_sth(root, "--instance-lifetime", "30", "--kill-grace", "1") as process:
        yield process
        assert process.alive(), "sth died during the tests"
