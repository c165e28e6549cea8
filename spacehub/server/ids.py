"""Identities that daemons make once and keep on disk (the hub's and the manager's ids)."""

from __future__ import annotations

import secrets
from pathlib import Path

from .files import write_atomic


def persistent_id(path: Path, prefix: str) -> str:
    """The id stored at ``path``, or a new ``<prefix>-<8 hex>`` written there atomically."""
    try:
        value = path.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = f"{prefix}-{secrets.token_hex(4)}"
    write_atomic(path, f"{value}\n".encode())
    return value
