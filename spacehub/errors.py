"""The root of every exception Spacehub raises on purpose.

Each package keeps its own tree under :class:`SpacehubError`, drawn in that package's
``errors.py``; catching ``SpacehubError`` catches them all, and nothing else::

    SpacehubError
    ├── spacehub.client.ClientError           what the clients and ``si`` raise
    ├── spacehub.cli.config.ConfigError       a bad ``si`` configuration file
    ├── spacehub.protocol.ProtocolError       bytes that break the link or runner protocols
    ├── spacehub.server.errors.ServerError    the daemons' shared layer
    │   └── HttpError (status)                every error an API answers with
    │       ├── agent.errors.HubError         the hub's tree
    │       └── cpm.errors.ManagerError       the manager's tree
    └── spacehub.localspace.LocalSpaceError   ``make run`` could not bring a Space up

Kept import-free: the Python runner imports ``spacehub.protocol`` in every instance.
"""

from __future__ import annotations

__all__ = ["SpacehubError"]


class SpacehubError(Exception):
    """Base of every error Spacehub raises on purpose."""
