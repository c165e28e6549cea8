"""Which id this hub goes by: the one its Space gave it once it has joined, else its own.

One id everywhere: ``/status``, ``/config``, every sequence's ``location`` and the labels
of its Podman containers use the id the Space knows the hub by. A hub that never joined
keeps the id it made for itself on first start.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Final

from spacehub.server.ids import persistent_id

__all__ = ["LINK_FILE", "hub_id", "joined_hub_id"]

#: Where the link keeps what the join gave it (the hub id, the space, the manager's URL).
LINK_FILE: Final = "link.json"

logger = logging.getLogger("agent.link")


def joined_hub_id(data_dir: Path, space: str) -> str | None:
    """The hub id ``link.json`` records for ``space``, if this hub joined it."""
    path = data_dir / LINK_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("ignoring %s: %s", path, exc)
        return None
    if not isinstance(record, dict) or record.get("space") != space:
        return None
    found = record.get("hubId")
    return found if isinstance(found, str) and found else None


def hub_id(data_dir: Path, sequences_root: Path, space: str) -> str:
    """The id this hub goes by now (see the module docstring)."""
    joined = joined_hub_id(data_dir, space) if space else None
    return joined or persistent_id(sequences_root / ".hub-id", "sth")
