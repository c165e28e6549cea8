"""The whole suite runs on patched libraries, as the daemons do (spacehub.server.speedups),
unless SPACEHUB_SPEEDUPS=0: `make test` runs the link and HTTP tests once more that way."""

from __future__ import annotations

from spacehub.server import speedups

speedups.install()


from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

from harness.postgres import TemporaryPostgres  # noqa: E402


@pytest.fixture(scope="session")
def postgres() -> Iterator[TemporaryPostgres]:
    """One throw-away PostgreSQL cluster for the session (harness/postgres.py); each test
    takes a database of its own with ``postgres.new_database()``."""
    cluster = TemporaryPostgres()
    try:
        yield cluster
    finally:
        cluster.close()
