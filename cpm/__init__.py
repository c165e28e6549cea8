"""The Spacehub manager, ``cpm``: Spaces, the hubs that join them, and the Space API."""

from spacehub import __version__

__all__ = ["__version__"]
