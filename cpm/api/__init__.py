"""The manager's HTTP API: ``/api/v1`` (version, spaces, CA), the Space API, the proxy to hubs.

``ManagerApp`` lives in :mod:`cpm.api.app`; this package imports nothing itself, so the
console (which ``app`` registers) can use :mod:`cpm.api.joining` without an import cycle.
"""
