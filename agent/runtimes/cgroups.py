"""Limits for bare subprocess instances: a cgroup per instance where the hub can make one.

Theory of operation
-------------------
At start the hub looks at its own cgroups (``/proc/self/cgroup``) and picks, for each of
memory, cpu and pids, where it may make child groups:

- **cgroup v2** (one unified hierarchy at ``/sys/fs/cgroup``): the hub's own group, when it
  is writable (root, or systemd's delegated subtree with ``Delegate=yes``) and has the
  controller. The hub moves itself into a leaf ``hub`` group first (v2 lets a group hand
  controllers to its children only while it holds no process), then enables the
  controllers for ``instances/``.
- **cgroup v1** (a hierarchy per controller, as on hybrid hosts such as our CI machine):
  the hub's group in each controller's hierarchy, when writable.

Each instance gets ``spacehub/<instance id>`` under those groups, its limits written
before the runner starts; the runner's child joins them between fork and exec, so
nothing it starts escapes. A memory limit is hard (swap included where the kernel
accounts it) and the kernel's OOM killer ends the instance; the hub then reads the
group's OOM count and reports "memory limit exceeded", as for Podman.

Where no controller is writable, memory and pids fall back to ``setrlimit`` (address
space and processes of the user) and CPU is not limited; one log line says so, and
``/config`` lists what this hub enforces and how.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

__all__ = ["MEMORY_LIMIT_REASON", "CgroupLimiter", "InstanceLimits", "detect"]

logger = logging.getLogger("agent.runtimes")

#: The reason an instance killed for its memory limit ends with (the same as Podman's).
MEMORY_LIMIT_REASON: Final = "Runner killed: memory limit exceeded"
CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
#: The group every instance's group lives in, under the hub's own.
PARENT: Final = "spacehub"
#: CFS period for CPU quotas, µs.
CPU_PERIOD_US: Final = 100_000
CONTROLLERS: Final = ("memory", "cpu", "pids")


@dataclass(frozen=True)
class InstanceLimits:
    """What one instance may use; None: no limit."""

    memory_mb: float | None = None
    cpus: float | None = None
    pids: int | None = None

    @classmethod
    def from_request(cls, limits: dict[str, object]) -> InstanceLimits:
        """From a start's ``limits`` (checked by the API already)."""

        def number(*names: str) -> float | None:
            for name in names:
                value = limits.get(name)
                if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
                    return float(value)
            return None

        pids = number("pids")
        return cls(number("memory"), number("cpu", "cpus"), int(pids) if pids else None)

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.memory_mb, self.cpus, self.pids))


@dataclass
class InstanceGroup:
    """The cgroup directories of one instance (one per v1 controller, or one v2 group)."""

    paths: list[Path]
    version: int
    #: the directory whose OOM count tells a memory kill, if memory is limited
    memory_path: Path | None = None
    #: rlimits the child sets on itself (the fallback), (resource, value)
    rlimits: list[tuple[int, int]] = field(default_factory=list)

    def procs_files(self) -> list[str]:
        return [str(path / "cgroup.procs") for path in self.paths]

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of this instance for its memory limit."""
        if self.memory_path is None:
            return False
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            text = (self.memory_path / name).read_text()
        except OSError:
            return False
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit() and int(value) > 0:
                return True
        if self.version == 1:  # kernels without the oom_kill counter: the limit was hit
            with contextlib.suppress(OSError, ValueError):
                return int((self.memory_path / "memory.failcnt").read_text()) > 0
        return False

    def remove(self) -> None:
        """Remove the groups (best effort: they are empty once the instance's group is gone)."""
        for path in self.paths:
            with contextlib.suppress(OSError):
                path.rmdir()


class CgroupLimiter:
    """Makes instance groups where the hub can (see the module docstring)."""

    def __init__(self, version: int, parents: dict[str, Path]) -> None:
        #: 1 or 2; 0 when no controller is usable (the rlimit fallback)
        self.version = version
        #: controller -> the directory instance groups are made in
        self.parents = parents

    @property
    def enforced(self) -> dict[str, bool]:
        fallback = {"memory": True, "cpu": False, "pids": True}
        return {c: c in self.parents or (not self.parents and fallback[c]) for c in CONTROLLERS}

    def describe(self) -> dict[str, object]:
        """What ``/config`` shows."""
        how = f"cgroup v{self.version}" if self.parents else "rlimit (no writable cgroup)"
        return {"enforced": self.enforced, "how": how}

    def make(self, instance_id: str, limits: InstanceLimits) -> InstanceGroup | None:
        """The instance's group with ``limits`` written, or rlimits to set; None when nothing
        is asked. ``OSError`` when a group cannot be made."""
        if not limits.any:
            return None
        if not self.parents:
            return InstanceGroup([], 0, rlimits=_rlimits(limits))
        if self.version == 2:
            path = (
                self.parents["memory" if "memory" in self.parents else next(iter(self.parents))] / instance_id
            )
            path.mkdir(exist_ok=True)
            group = InstanceGroup([path], 2)
            if limits.memory_mb is not None and "memory" in self.parents:
                _write(path / "memory.max", str(int(limits.memory_mb * 1024 * 1024)))
                with contextlib.suppress(OSError):
                    _write(path / "memory.swap.max", "0")
                group.memory_path = path
            if limits.cpus is not None and "cpu" in self.parents:
                _write(path / "cpu.max", f"{int(limits.cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}")
            if limits.pids is not None and "pids" in self.parents:
                _write(path / "pids.max", str(limits.pids))
            return group
        group = InstanceGroup([], 1)
        try:
            for controller, parent in self.parents.items():
                path = parent / instance_id
                path.mkdir(exist_ok=True)
                group.paths.append(path)
                if controller == "memory" and limits.memory_mb is not None:
                    size = str(int(limits.memory_mb * 1024 * 1024))
                    _write(path / "memory.limit_in_bytes", size)
                    with contextlib.suppress(OSError):  # swap accounting may be off
                        _write(path / "memory.memsw.limit_in_bytes", size)
                    group.memory_path = path
                elif controller == "cpu" and limits.cpus is not None:
                    _write(path / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                    _write(path / "cpu.cfs_quota_us", str(int(limits.cpus * CPU_PERIOD_US)))
                elif controller == "pids" and limits.pids is not None:
                    _write(path / "pids.max", str(limits.pids))
        except OSError:
            group.remove()
            raise
        return group


def _write(path: Path, value: str) -> None:
    with open(path, "w") as file:
        file.write(value)


def _rlimits(limits: InstanceLimits) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    if limits.memory_mb is not None:
        out.append((resource.RLIMIT_AS, int(limits.memory_mb * 1024 * 1024)))
    if limits.pids is not None:
        out.append((resource.RLIMIT_NPROC, limits.pids))
    return out


def _own_groups() -> dict[str, str]:
    """controller (or "" for v2) -> this process's group path, from /proc/self/cgroup."""
    groups: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                groups[controller] = path
    return groups


def _writable(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def detect() -> CgroupLimiter:
    """Where this hub may make instance groups (blocking; once, at start)."""
    groups = _own_groups()
    v1 = {c: CGROUP_ROOT / c / groups[c].lstrip("/") for c in CONTROLLERS if c in groups}
    v1 = {c: p for c, p in v1.items() if (CGROUP_ROOT / c).is_dir() and _writable(p)}
    if v1:
        parents: dict[str, Path] = {}
        for controller, path in v1.items():
            try:
                (path / PARENT).mkdir(exist_ok=True)
            except OSError:
                continue
            parents[controller] = path / PARENT
        if parents:
            return CgroupLimiter(1, parents)
    if (CGROUP_ROOT / "cgroup.controllers").is_file() and "" in groups:
        limiter = _detect_v2(CGROUP_ROOT / groups[""].lstrip("/"))
        if limiter is not None:
            return limiter
    return CgroupLimiter(0, {})


def _detect_v2(own: Path) -> CgroupLimiter | None:
    try:
        available = set((own / "cgroup.controllers").read_text().split())
    except OSError:
        return None
    wanted = [c for c in CONTROLLERS if c in available]
    if not wanted or not _writable(own):
        return None
    try:
        # No process may stay in a group that hands controllers to its children: the hub
        # moves itself into a leaf of its own first.
        hub_leaf = own / "hub"
        hub_leaf.mkdir(exist_ok=True)
        for pid in (own / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                _write(hub_leaf / "cgroup.procs", pid)
        _write(own / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))
        parent = own / PARENT
        parent.mkdir(exist_ok=True)
        _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))
    except OSError as exc:
        logger.info("cgroup v2 at %s not usable for instance limits: %s", own, exc)
        return None
    return CgroupLimiter(2, {c: parent for c in wanted})


def join_in_child(group: InstanceGroup | None) -> None:
    """Between fork and exec: put the child in its instance's groups, or set its rlimits."""
    if group is None:
        return
    pid = str(os.getpid())
    for procs in group.procs_files():
        with open(procs, "w") as file:
            file.write(pid)
    for which, value in group.rlimits:
        resource.setrlimit(which, (value, value))
