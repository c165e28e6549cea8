"""The manager's registry: spaces, hubs, tokens, and the replicas' shared state.

:mod:`.core` is the registry itself; :mod:`.database` what it needs of an engine, with
:mod:`.sqlite` (the embedded default) and :mod:`.postgres` (replicas) providing it.
"""

from .core import *  # noqa: F403
from .core import __all__ as _core_all
from .database import SCHEMA_VERSION, Database  # noqa: F401
from .postgres import PostgresDatabase, is_postgres_url
from .sqlite import BUSY_TIMEOUT_SECONDS, SqliteDatabase, migrate

__all__ = [
    *_core_all,
    "BUSY_TIMEOUT_SECONDS",
    "Database",
    "PostgresDatabase",
    "SqliteDatabase",
    "is_postgres_url",
    "migrate",
]
