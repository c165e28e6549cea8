"""``GET /load-check``: CPU, memory and disk of the hub's machine (psutil).

Kept to the psutil API that Debian 12's psutil 5.9 has.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil

from spacehub.models import FilesystemLoad, LoadCheck


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def _filesystem(path: Path) -> FilesystemLoad:
    mount = _mount_point(path)
    device, fstype = str(mount), ""
    for partition in psutil.disk_partitions(all=True):
        if Path(partition.mountpoint) == mount:
            device, fstype = partition.device, partition.fstype
    usage = psutil.disk_usage(str(mount))
    return {
        "fs": device,
        "type": fstype,
        "size": usage.total,
        "used": usage.used,
        "available": usage.free,
        "use": round(usage.percent, 2),
        "mount": str(mount),
    }


def load_check(paths: list[Path]) -> LoadCheck:
    """The seed's load-check shape. ``paths``: the directories whose filesystems
    matter (the sequences root first); each filesystem is listed once."""
    memory = psutil.virtual_memory()
    seen: set[str] = set()
    filesystems = []
    for path in paths:
        try:
            entry = _filesystem(path)
        except OSError:
            continue
        if entry["mount"] not in seen:
            seen.add(entry["mount"])
            filesystems.append(entry)
    return {
        "avgLoad": round(os.getloadavg()[0], 2),
        # Percent of all CPUs since the previous call (the first call measures
        # since import; callers call it every few seconds).
        "currentLoad": psutil.cpu_percent(interval=None),
        "memFree": memory.available,
        "memUsed": memory.total - memory.available,
        "fsSize": filesystems,
    }
