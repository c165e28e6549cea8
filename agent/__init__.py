"""The Spacehub hub, ``sth``: keeps Sequences and runs them as Instances."""

from spacehub import __version__

__all__ = ["__version__"]
