"""Test helpers for the manager (the shared harness, see harness/manager.py)."""

from __future__ import annotations

from harness.manager import CPM, ManagerProcess, cpm, run_cpm

__all__ = ["CPM", "ManagerProcess", "cpm", "run_cpm"]
