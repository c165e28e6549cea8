"""Test helpers: build Sequence packages, start the real `sth` (the shared harness, see harness/)."""

from __future__ import annotations

from harness.daemons import ROOT, HubProcess, run_sth
from harness.daemons import read_until as _read_until
from harness.packages import make_package, python_package

__all__ = ["ROOT", "HubProcess", "_read_until", "make_package", "python_package", "run_sth"]
