"""The manager's HTTP API: ``/api/v1`` (version, spaces, CA), the Space API, the proxy to hubs."""

from .app import ManagerApp

__all__ = ["ManagerApp"]
