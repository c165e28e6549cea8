"""The Podman runtime: each runner runs in its own container, one ``podman run`` each.

Why the CLI and not the REST socket: ``podman run -i --preserve-fds=5`` hands the
client's descriptors 0-7 on to the container's process unchanged, so the runner
sees exactly the eight pipes of :mod:`.pipes` it gets under the subprocess
runtime (each with its own back-pressure; fds 3-7 are the very same pipes, 0-2
are relayed by conmon). The REST API has no stdin attach in podman-py and no way
to pass descriptors at all.

Signals: killing the ``podman`` client does not stop a container, so
:meth:`PodmanRunner.signal_group` signals the container's init (``--init``,
catatonit, whose host pid ``--pidfile`` gives us) directly: SIGTERM is forwarded
to the runner, SIGKILL of a pid namespace's init ends every process in it.
Before the pidfile exists the client is signalled (it proxies the signal).

The end: the client's exit status is the container's. The container is not
``--rm``: once the client has exited we read ``State.OOMKilled`` (memory limit
exceeded is a reason the instance reports) and then remove it. Every container
carries the labels ``spacehub.hub`` and ``spacehub.instance``.

The hub ending: the client is the child of the instance's holder
(agent/runners/holder.py), not of the hub, so the client, its pipes and the
container all go on while no hub runs, and the next hub takes them back through
the holder as under the subprocess runtime. Containers of this hub that nobody
took back (their holder gone: a reboot) are removed when it starts:
:func:`remove_orphans`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from .. import images
from .base import LaunchSpec, RunnerProcess, Runtime
from .cgroups import detect as detect_cgroups
from .held import HeldRunner, adopt, start_held
from .pipes import EXTRA_FDS, ChannelStreams
from .process import ProcessRuntime

if TYPE_CHECKING:
    from ..config import HubConfig

logger = logging.getLogger("agent.podman")

LABEL_HUB: Final = "spacehub.hub"
LABEL_INSTANCE: Final = "spacehub.instance"
#: Where things are mounted inside a container.
PACKAGE_DIR: Final = "/package"
RUNNER_DIR: Final = "/runner"
#: The instance's scratch directory (the host's LaunchSpec.cwd), the one writable mount.
WORK_DIR: Final = "/work"
PYTHON_ROOT: Final = "/opt/spacehub/py"
#: PATH inside a container.
CONTAINER_PATH: Final = "/usr/local/bin:/usr/bin:/bin"
#: The instance's scratch space (the only writable place): a tmpfs, counted in its memory.
SCRATCH: Final = "/tmp:rw,size=64m,mode=1777"
#: Seconds a podman housekeeping command (inspect, rm, kill, stats) may take.
PODMAN_COMMAND_TIMEOUT: Final = 30.0
#: Python packages the runner imports, mounted read-only under PYTHON_ROOT.
RUNNER_PACKAGES: Final = ("spacehub", "scramjet")
#: Seconds between looks for the container's pidfile while it starts.
CONTAINER_PID_POLL: Final = 0.05
#: Seconds the client gets to pass on the container's last output after the container ended.
CLIENT_DRAIN_GRACE: Final = 2.0
MEMORY_LIMIT_REASON: Final = "Runner killed: memory limit exceeded"
_LDD_PATH: Final = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


async def podman(*args: str, timeout: float = PODMAN_COMMAND_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    """Run one podman command to its end (never raises on a non-zero status)."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            ["podman", *args], capture_stdout=True, capture_stderr=True, check=False
        )


def _podman_sync(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["podman", *args], capture_output=True, timeout=PODMAN_COMMAND_TIMEOUT, check=False)


# ---------------------------------------------------------------------------- probing
def probe() -> dict[str, Any]:
    """Whether Podman works here and which limits it can enforce (blocking).

    Rootless Podman on cgroup v1 ignores every limit; on cgroup v2 it enforces
    those whose controllers are delegated; rootful enforces what the mounted
    controllers allow.
    """
    try:
        result = _podman_sync("info", "--format", "json")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"available": False, "error": f"podman info failed: {exc}"}
    if result.returncode != 0:
        return {"available": False, "error": result.stderr.decode(errors="replace").strip()[-500:]}
    info = json.loads(result.stdout)
    host = info.get("host", {})
    version = str(host.get("cgroupVersion", ""))
    rootless = bool(host.get("security", {}).get("rootless", False))
    controllers = set(host.get("cgroupControllers") or [])
    if version == "v1" and not rootless:
        controllers = {c for c in ("memory", "cpu", "pids") if Path("/sys/fs/cgroup", c).is_dir()}
    elif version == "v1":
        controllers = set()
    enforced = {name: name in controllers for name in ("memory", "cpu", "pids")}
    return {
        "available": True,
        "version": str(info.get("version", {}).get("Version", "")),
        "cgroupVersion": version,
        "rootless": rootless,
        "ociRuntime": str(host.get("ociRuntime", {}).get("name", "")),
        "limitsEnforced": enforced,
    }


async def remove_orphans(hub_id: str, keep: Collection[str] = ()) -> list[str]:
    """Remove every container this hub left behind and did not take back; their names."""
    listed = await podman("ps", "-a", "--filter", f"label={LABEL_HUB}={hub_id}", "--format", "{{.Names}}")
    names = [n for n in listed.stdout.decode().split() if n and n not in keep]
    if names:
        await podman("rm", "--force", "--time", "0", *names)
    return names


# ---------------------------------------------------------------------------- host interpreters
@dataclass(frozen=True, slots=True)
class _Interpreter:
    """A host interpreter as a container sees it: the path to run and what to mount."""

    path: str
    mounts: tuple[str, ...]


def _library_dirs(files: list[str]) -> set[str]:
    """Directories of every shared library the given ELF files load (via ldd)."""
    dirs: set[str] = set()
    ldd = shutil.which("ldd")
    if ldd is None:
        return dirs
    for start in range(0, len(files), 64):
        result = subprocess.run(
            [ldd, *files[start : start + 64]],
            capture_output=True,
            timeout=PODMAN_COMMAND_TIMEOUT,
            check=False,
        )
        for line in result.stdout.decode(errors="replace").splitlines():
            match = _LDD_PATH.search(line)
            if match:
                dirs.add(os.path.dirname(match.group(1)))
    return dirs


def _outermost(paths: set[str]) -> tuple[str, ...]:
    """Drop paths inside another path of the set (one mount covers them)."""
    kept: list[str] = []
    for path in sorted(paths):
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return tuple(kept)


def _host_interpreter(executable: str, language: str) -> _Interpreter:
    """Resolve ``executable`` and find the trees and library directories it needs (blocking)."""
    real = os.path.realpath(shutil.which(executable) or executable)
    trees: set[str] = set()
    elf_files = [real]
    if language == "py":
        result = subprocess.run(
            [real, "-S", "-c", "import sys; print(sys.base_prefix); print(sys.base_exec_prefix)"],
            capture_output=True,
            timeout=PODMAN_COMMAND_TIMEOUT,
            check=True,
        )
        prefixes = {os.path.realpath(p) for p in result.stdout.decode().split()}
        trees |= prefixes
        for prefix in prefixes:
            dynload = Path(prefix, "lib", f"python{_py_version(real)}", "lib-dynload")
            elf_files += [str(p) for p in dynload.glob("*.so")]
        if any(p in ("/usr", "/") for p in prefixes):
            # A distribution python: its tree is /usr; mount the library dir, not all of /usr.
            trees -= {"/usr", "/"}
            version = _py_version(real)
            trees |= {
                d for d in (f"/usr/lib/python{version}", f"/usr/lib/python{version[0]}") if os.path.isdir(d)
            }
            trees.add(real)
    else:
        trees.add(real)
    trees |= _library_dirs(elf_files)
    return _Interpreter(path=real, mounts=_outermost(trees))


def _py_version(executable: str) -> str:
    result = subprocess.run(
        [executable, "-S", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        timeout=PODMAN_COMMAND_TIMEOUT,
        check=True,
    )
    return result.stdout.decode().strip()


def _runner_packages() -> list[tuple[str, str]]:
    """(host package dir, container path) for each package the Python runner imports."""
    found = []
    for name in RUNNER_PACKAGES:
        try:
            module = __import__(name)
        except ImportError:
            continue
        locations = list(getattr(module, "__path__", []) or [])
        if locations:
            found.append((str(Path(locations[0]).resolve()), f"{PYTHON_ROOT}/{name}"))
    return found


# ---------------------------------------------------------------------------- the runner
def _open_oom_counter(pid: int) -> int | None:
    """An open descriptor on the OOM-kill counter of ``pid``'s memory cgroup
    (v1 ``memory.oom_control``, v2 ``memory.events``), or None.

    Podman 4.3 with runc on cgroup v1 does not set ``State.OOMKilled`` when the
    victim is the runner rather than the container's init, so the hub reads the
    kernel's own counter when the container ends.
    """
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            candidates.append(f"/sys/fs/cgroup/memory{path}/memory.oom_control")
        elif controllers == "":
            candidates.append(f"/sys/fs/cgroup{path}/memory.events")
    for candidate in candidates:
        with contextlib.suppress(OSError):
            return os.open(candidate, os.O_RDONLY)
    return None


def _oom_kills(fd: int) -> int:
    try:
        text = os.pread(fd, 4096, 0).decode()
    except OSError:
        return 0
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0


def container_name(hub_id: str, instance_id: str) -> str:
    return f"spacehub-{hub_id}-{instance_id}"


class PodmanRunner(ChannelStreams):
    """A runner in a container; ``pid`` is the podman client's, which its holder keeps
    (agent/runners/holder.py), so the container and its pipes outlive the hub."""

    def __init__(self, held: HeldRunner, name: str, pidfile: Path) -> None:
        super().__init__(held._streams)
        self._process = held
        self.pid = held.pid
        self.name = name
        self._pidfile = pidfile
        self._container_pid: int | None = None
        self._removed = False
        self._client_ended = False
        #: why the container ended, when the runtime knows better than the exit code
        self.exit_reason: str | None = None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    @property
    def ended_at(self) -> str | None:
        return self._process.ended_at

    def _init_pid(self) -> int | None:
        if self._container_pid is None:
            with contextlib.suppress(OSError, ValueError):
                self._container_pid = int(self._pidfile.read_text().strip())
        return self._container_pid

    async def wait(self) -> int:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._end_client_after_container)
            code = await self._process.wait()
            nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            code = await self._collect(code)
        # catatonit (and podman) report a runner killed by signal N as 128+N; the
        # subprocess runtime says -N: keep the hub's view the same for both.
        if 128 < code < 128 + signal.NSIG:
            return -(code - 128)
        return code

    async def _end_client_after_container(self) -> None:
        """Stop the client once the container is gone.

        The client relays the container's stdout and stderr: while the hub is not
        reading them (a flooded, unread stdout) it stays blocked on a full pipe
        after the container ended, and would never exit by itself. What it still
        held is lost, as it would be in a dead process's buffers.
        """
        pid = self._init_pid()
        while pid is None:
            await trio.sleep(CONTAINER_PID_POLL)
            pid = self._init_pid()
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = None  # already gone
        # Opened while the container lives: its cgroup goes with the container.
        counter = _open_oom_counter(pid)
        try:
            if pidfd is not None:
                await trio.lowlevel.wait_readable(pidfd)
            if counter is not None and _oom_kills(counter) > 0:
                self.exit_reason = MEMORY_LIMIT_REASON
        finally:
            for fd in (pidfd, counter):
                if fd is not None:
                    os.close(fd)
        await trio.sleep(CLIENT_DRAIN_GRACE)
        self._client_ended = True
        self._process.signal_group(signal.SIGKILL)

    async def _collect(self, code: int) -> int:
        """Learn how the container ended (memory limit? its exit code when the
        client had to be ended), then remove it; the exit code to report."""
        if self._removed:
            return code
        inspected = await podman("inspect", "--format", "{{.State.OOMKilled}} {{.State.ExitCode}}", self.name)
        fields = inspected.stdout.decode().split() if inspected.returncode == 0 else []
        if fields[:1] == ["true"]:
            self.exit_reason = MEMORY_LIMIT_REASON
        if self._client_ended and len(fields) == 2 and fields[1].lstrip("-").isdigit():
            code = int(fields[1])
        await podman("rm", "--force", "--time", "0", self.name)
        self._removed = True
        with contextlib.suppress(OSError):
            self._pidfile.unlink()
        return code

    def signal_group(self, sig: signal.Signals) -> None:
        if self._process.returncode is not None:
            return  # the container ended with its client; its pid namespace is gone
        target = self._init_pid()
        if target is None:
            self._process.signal_group(sig)  # the client: podman proxies it once the container runs
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(target, sig)

    async def stats(self) -> dict[str, Any]:
        """Memory and CPU of the container, as ``podman stats`` reports them."""
        result = await podman("stats", "--no-stream", "--no-reset", "--format", "json", self.name, timeout=10)
        if result.returncode != 0:
            return {}
        try:
            entry = json.loads(result.stdout)[0]
        except (ValueError, IndexError, KeyError):
            return {}
        return {
            "container": self.name,
            "memUsage": entry.get("mem_usage", ""),
            "memPercent": entry.get("mem_percent", ""),
            "cpuPercent": entry.get("cpu_percent", ""),
            "pids": entry.get("pids", ""),
        }

    async def detach(self) -> None:
        """The hub goes: the container, its client and its holder stay."""
        await self._process.detach()

    async def aclose(self) -> None:
        if self._process.returncode is None:
            # The hub is giving up on it (shutdown, failed start): the container must not leak.
            with trio.move_on_after(PODMAN_COMMAND_TIMEOUT):
                await podman("kill", "--signal", "KILL", self.name)
                await self._process.wait()
        if not self._removed:
            with trio.move_on_after(PODMAN_COMMAND_TIMEOUT):
                await podman("rm", "--force", "--time", "0", self.name)
                self._removed = True
        with contextlib.suppress(OSError):
            self._pidfile.unlink()
        await self._process.aclose()


class PodmanRuntime:
    """Runs each runner with ``podman run``; see the module docstring."""

    name = "podman"
    #: its containers outlive the hub (their clients held by agent/runners/holder.py)
    keeps_instances = True

    def __init__(self, config: HubConfig, hub_id: str) -> None:
        self._config = config
        self._hub_id = hub_id
        # pidfiles of running containers (dot-names in the sequences root are the hub's own)
        self._state = config.sequences_root / ".podman"
        self._state.mkdir(mode=0o700, exist_ok=True)
        self._interpreters: dict[tuple[str, str], _Interpreter] = {}
        self._packages = _runner_packages()
        self._images_checked: set[str] = set()

    # -- images and interpreters (blocking parts run in a thread, once each)
    def _image(self, language: str) -> tuple[str, bool]:
        """(image, whether it is built-in and wants the host interpreter mounted)."""
        own = self._config.runner_image_py if language == "py" else self._config.runner_image_node
        if own:
            return own, False
        return (images.PY_IMAGE if language == "py" else images.NODE_IMAGE), True

    async def _ready_image(self, image: str, builtin: bool) -> None:
        if image in self._images_checked:
            return
        if builtin:
            built = await trio.to_thread.run_sync(images.ensure_builtin_images)
            if built:
                logger.info("built runner image(s): %s", ", ".join(built))
        self._images_checked.add(image)

    async def _interpreter(self, executable: str, language: str) -> _Interpreter:
        key = (executable, language)
        if key not in self._interpreters:
            try:
                found = await trio.to_thread.run_sync(_host_interpreter, executable, language)
            except (OSError, subprocess.SubprocessError) as exc:
                raise OSError(f"cannot use {executable} in a container: {exc}") from None
            self._interpreters[key] = found
        return self._interpreters[key]

    # -- the command line
    def _limits(self, spec: LaunchSpec) -> list[str]:
        memory = spec.limits.get("memory", self._config.default_memory_mb)
        cpus = spec.limits.get("cpu", spec.limits.get("cpus", self._config.default_cpus))
        pids = spec.limits.get("pids", self._config.default_pids)
        args = []
        if isinstance(memory, (int, float)) and not isinstance(memory, bool) and memory > 0:
            args += ["--memory", f"{int(memory)}m", "--memory-swap", f"{int(memory)}m"]
        if isinstance(cpus, (int, float)) and not isinstance(cpus, bool) and cpus > 0:
            args += ["--cpus", f"{float(cpus):g}"]
        if isinstance(pids, int) and not isinstance(pids, bool) and pids > 0:
            args += ["--pids-limit", str(pids)]
        return args

    async def command(self, spec: LaunchSpec, name: str, pidfile: Path) -> list[str]:
        """The ``podman run`` argv for ``spec`` (the environment is passed by name)."""
        runner = Path(spec.argv[-1])
        language = "py" if runner.suffix == ".py" else "node"
        image, builtin = self._image(language)
        await self._ready_image(image, builtin)
        mounts: list[tuple[str, str]] = [
            (str(spec.package_dir), PACKAGE_DIR),
            (str(runner.parent), RUNNER_DIR),
        ]
        scratch = Path(spec.cwd).resolve() != Path(spec.package_dir).resolve()
        if builtin:
            interpreter = await self._interpreter(spec.argv[0], language)
            program = interpreter.path
            mounts += [(path, path) for path in interpreter.mounts]
        else:
            program = "python3" if language == "py" else "node"
        if language == "py":
            mounts += self._packages
        argv = [
            "podman",
            "run",
            "--interactive",
            f"--preserve-fds={EXTRA_FDS}",
            "--init",
            "--pull=never",
            "--replace",  # a leftover of the same name (a hub killed mid-start) must not block it
            "--log-driver=none",
            f"--pidfile={pidfile}",
            f"--name={name}",
            f"--label={LABEL_HUB}={self._hub_id}",
            f"--label={LABEL_INSTANCE}={spec.instance_id}",
            f"--network={self._config.podman_network}",
            "--cap-drop=ALL",
            "--security-opt=no-new-privileges",
            "--read-only",
            f"--tmpfs={SCRATCH}",
            *self._limits(spec),
            f"--workdir={WORK_DIR if scratch else PACKAGE_DIR}",
        ]
        for source, target in mounts:
            argv.append(f"--volume={source}:{target}:ro")
        if scratch:
            argv.append(f"--volume={spec.cwd}:{WORK_DIR}:rw")
        for variable in self._container_env(spec):
            argv += ["--env", variable]
        argv += [image, program, *spec.argv[1:-1], f"{RUNNER_DIR}/{runner.name}"]
        return argv

    def _container_env(self, spec: LaunchSpec) -> list[str]:
        """``--env`` values: NAME alone (podman takes the value from its own
        environment, so nothing secret shows in ``ps``) or NAME=VALUE for the
        few that differ inside a container."""
        fixed = {
            "PATH": CONTAINER_PATH,
            "HOME": "/tmp",
            "PYTHONPATH": PYTHON_ROOT,
            "SPACEHUB_SEQUENCE_DIR": PACKAGE_DIR,
        }
        if "SPACEHUB_WORK_DIR" in spec.env:
            fixed["SPACEHUB_WORK_DIR"] = WORK_DIR
        names = [f"{k}={v}" for k, v in fixed.items()]
        names += [k for k in spec.env if k not in fixed]
        return names

    async def spawn(self, spec: LaunchSpec) -> RunnerProcess:
        name = container_name(self._hub_id, spec.instance_id)
        pidfile = self._state / f"{name}.pid"
        argv = await self.command(spec, name, pidfile)
        # The client's own environment: the hub's (podman needs it) plus the
        # runner's variables, which ``--env NAME`` passes on into the container.
        env = {**os.environ, **{k: v for k, v in spec.env.items() if k not in ("PATH", "HOME")}}
        argv[0] = shutil.which("podman") or "/usr/bin/podman"
        held = await start_held(spec.state_dir, argv=argv, env=env, cwd=spec.cwd, cgroup_procs=[], rlimits=[])
        return PodmanRunner(held, name, pidfile)

    async def adopt(self, instance_id: str, state_dir: Path, limits: dict[str, object]) -> RunnerProcess:
        """Take back a container a hub before left running, through its client's holder."""
        name = container_name(self._hub_id, instance_id)
        return PodmanRunner(await adopt(state_dir), name, self._state / f"{name}.pid")

    async def remove_orphans(self, log: logging.Logger, keep: Collection[str] = ()) -> None:
        """Remove the containers a previous run of this hub left behind, but those of
        the instances in ``keep`` (taken back)."""
        removed = await remove_orphans(self._hub_id, {container_name(self._hub_id, i) for i in keep})
        if removed:
            log.warning(
                "removed %d container(s) left by a previous run: %s", len(removed), ", ".join(removed)
            )


def make_runtime(config: HubConfig, hub_id: str, log: logging.Logger) -> Runtime:
    """The runtime ``config`` asks for (blocking: probes Podman, builds missing images).

    Raises OSError when Podman is asked for and does not work here.
    """
    if config.runtime != "podman":
        limiter = detect_cgroups()
        config.process_limits = limiter.describe()
        enforced = [name for name, ok in limiter.enforced.items() if ok]
        log.info(
            "instance limits: %s enforced through %s",
            ", ".join(enforced) or "none",
            config.process_limits["how"],
        )
        if not limiter.enforced["cpu"]:
            log.warning("instance CPU limits cannot be enforced here (no writable cpu cgroup)")
        return ProcessRuntime(limiter)
    status = probe()
    config.podman_status = status
    if not status["available"]:
        raise OSError(f"--runtime podman: podman does not work here: {status.get('error', '')}")
    enforced = status["limitsEnforced"]
    missing = [name for name, ok in enforced.items() if not ok]
    log.info(
        "podman %s (cgroup %s, %s): limits enforced: %s",
        status["version"],
        status["cgroupVersion"],
        "rootless" if status["rootless"] else "rootful",
        ", ".join(name for name, ok in enforced.items() if ok) or "none",
    )
    if missing:
        log.warning("podman cannot enforce these instance limits here: %s", ", ".join(missing))
    if not (config.runner_image_py and config.runner_image_node):
        try:
            built = images.ensure_builtin_images()
        except images.ImageError as exc:
            raise OSError(f"--runtime podman: {exc}") from None
        if built:
            log.info("built runner image(s): %s", ", ".join(built))
    return PodmanRuntime(config, hub_id)


def podman_available() -> bool:
    """Whether ``podman info`` works here (for tests and the benchmark)."""
    try:
        return _podman_sync("info", "--format", "{{.Host.OCIRuntime.Name}}").returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


if __name__ == "__main__":  # pragma: no cover - a manual probe
    json.dump(probe(), sys.stdout, indent=2)
