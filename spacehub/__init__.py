"""Spacehub: the client library and the wire formats every side shares.

Kept import-light on purpose: the Python runner imports ``spacehub.protocol`` inside
every instance, so nothing heavy (httpx, trio) may be imported here.
"""

__version__ = "0.1.0"
