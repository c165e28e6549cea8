"""Identities that daemons make once and keep on disk (the hub's and the manager's ids)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def persistent_id(path: Path, prefix: str) -> str:
    """The id stored at ``path``, or a new ``<prefix>-<8 hex>`` written there atomically."""
    try:
        value = path.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = f"{prefix}-{secrets.token_hex(4)}"
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)
    return value
