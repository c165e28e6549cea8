"""The supervisor owns every Instance: it starts them in its nursery, lists them,
forwards events between them, and ends them all when the hub shuts down."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import uuid
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from ..errors import BadRequest, InstanceExists, InstanceNotFound, SequenceStartFailed
from ..runtimes.base import LaunchSpec
from .instance import Instance

if TYPE_CHECKING:
    from ..config import HubConfig
    from ..runtimes.base import Runtime
    from ..sequences.store import Sequence
    from ..topics import TopicRouter

#: Instance ids a client may choose: the original requires 36 characters (a UUID);
#: we take any short name that is safe in paths and URLs.
INSTANCE_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: The runners, run inside every instance of their language.
PYTHON_RUNNER: Final = Path(__file__).resolve().parent.parent / "runners" / "python" / "runner.py"
NODE_RUNNER: Final = Path(__file__).resolve().parent.parent / "runners" / "node" / "runner.js"
#: Where the instances' scratch directories live, under the sequences root (the
#: store ignores names starting with a dot).
WORK_DIRS: Final = ".instances"
#: Events waiting to be forwarded between instances; past it, forwarding drops
#: events (it is best effort) rather than holding the sender back.
FORWARD_QUEUE: Final = 256
#: Environment variables passed through from the hub to runners.
PASSED_ENV: Final = ("PATH", "LANG", "LC_ALL", "TZ", "HOME")

logger = logging.getLogger("agent.supervisor")


def _import_roots() -> list[str]:
    """Directories that make ``spacehub.protocol`` and ``scramjet`` importable
    in the runner, whatever interpreter runs it."""
    import spacehub

    roots = [str(Path(spacehub.__file__).resolve().parent.parent)]
    try:
        import scramjet
    except ImportError:
        return roots
    locations = getattr(scramjet, "__path__", None) or []
    for location in locations:
        root = str(Path(location).resolve().parent)
        if root not in roots:
            roots.append(root)
    return roots


class Supervisor:
    def __init__(self, config: HubConfig, runtime: Runtime, topics: TopicRouter | None = None) -> None:
        self._config = config
        self._topics = topics
        self._runtime = runtime
        self._instances: dict[str, Instance] = {}
        #: this hub's API as its instances reach it (context.hub, this.hub); set once it serves
        self.hub_url = ""
        self._nursery: trio.Nursery | None = None
        self._import_roots = _import_roots()
        # Scratch directories of instances from a previous run: nothing owns them now.
        shutil.rmtree(config.sequences_root / WORK_DIRS, ignore_errors=True)
        self._forward_send, self._forward_receive = trio.open_memory_channel[tuple[Instance, str, Any]](
            FORWARD_QUEUE
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            instances = await nursery.start(self._run_instances)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await self._end_all()
                    instances.cancel()

    async def _run_instances(self, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        """The nursery of the instances, shielded from the hub's shutdown: they must
        live on to see their SIGTERM and exit (see :meth:`_end_all`); ``run`` cancels
        them once that is done."""
        with trio.CancelScope(shield=True) as scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._forwarder)
                task_status.started(scope)

    async def _end_all(self) -> None:
        """On hub shutdown: SIGTERM every live instance, and wait for them to end;
        ``run`` then cancels them, so that those still alive after the grace get
        their SIGKILL."""
        live = [i for i in self._instances.values() if i.is_live]
        if not live:
            return
        logger.info("stopping %d instance(s)", len(live))
        for instance in live:
            instance.terminate()
        with trio.move_on_after(self._config.kill_grace):
            for instance in live:
                await instance.wait_ended()

    # ------------------------------------------------------------------ queries
    def get(self, instance_id: str) -> Instance:
        try:
            return self._instances[instance_id]
        except KeyError:
            raise InstanceNotFound(f"Instance {instance_id} not found") from None

    def list(self) -> list[Instance]:
        return list(self._instances.values())

    # ------------------------------------------------------------------ start
    def _launch_spec(self, instance: Instance) -> LaunchSpec:
        sequence = instance.sequence
        if sequence.package.language == "py":
            # -S: no site processing (.pth files, editable-install finders); the
            # runner gets its import roots through PYTHONPATH. Saves ~15 ms a start.
            argv = [self._config.python or sys.executable, "-S", str(PYTHON_RUNNER)]
        else:
            # No engines.python3: a Node.js sequence, as on the original platform.
            node = self._config.node_path()
            if node is None:
                raise SequenceStartFailed(
                    f"Sequence {sequence.id} is a Node.js sequence but this hub has no Node.js:"
                    " install nodejs (node on PATH) or set the hub's node option"
                )
            argv = [node, str(NODE_RUNNER)]
        # Every instance gets a scratch directory of its own as its working
        # directory; it is removed with the instance.
        work_dir = self._config.sequences_root / WORK_DIRS / instance.id
        work_dir.mkdir(parents=True, exist_ok=True)
        env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
        env.setdefault("PATH", os.defpath)
        env.update(self._config.runner_env)
        info = {
            "appConfig": instance.app_config,
            "args": instance.args,
            "instanceId": instance.id,
            # ms a Node.js sequence lingers after its output ended (its exitTimeout)
            "exitTimeout": round(self._config.node_exit_timeout * 1000),
            "sequence": {"id": sequence.id, "config": sequence.config()},
        }
        if instance.input_topic:
            info["inputTopic"] = instance.input_topic
        if instance.output_topic:
            info["outputTopic"] = instance.output_topic
        env.update(
            {
                "PYTHONPATH": os.pathsep.join(self._import_roots),
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONIOENCODING": "utf-8",
                "SPACEHUB_SEQUENCE_DIR": str(sequence.directory),
                "SPACEHUB_SEQUENCE_MAIN": sequence.package.main,
                "SPACEHUB_INSTANCE_ID": instance.id,
                "SPACEHUB_WORK_DIR": str(work_dir),
                "SPACEHUB_HUB_URL": self.hub_url,
                "SPACEHUB_RUNNER_INFO": _json(info),
            }
        )
        return LaunchSpec(
            instance_id=instance.id,
            argv=argv,
            env=env,
            cwd=work_dir,
            package_dir=sequence.directory,
            limits=dict(instance.limits_request),
        )

    async def start(self, sequence: Sequence, payload: dict[str, Any]) -> Instance:
        """Start an instance of ``sequence``; returns once its runner handshook."""
        if self._nursery is None:
            raise RuntimeError("supervisor is not running")
        instance_id = payload.get("instanceId") or str(uuid.uuid4())
        if not isinstance(instance_id, str) or not INSTANCE_ID_PATTERN.match(instance_id):
            raise BadRequest(
                "instanceId must be 1-64 characters: letters, digits, '_', '.', '-',"
                " starting with a letter or digit"
            )
        if instance_id in self._instances:
            raise InstanceExists("Instance with a given ID already exists")
        instance = Instance(
            instance_id=instance_id,
            sequence=sequence,
            app_config=payload.get("appConfig") or {},
            args=payload.get("args") or [],
            runtime=self._runtime,
            config=self._config,
            launch=self._launch_spec,
            input_topic=payload.get("inputTopic") or None,
            output_topic=payload.get("outputTopic") or None,
            limits_request=payload.get("limits") or {},
            on_event=self._forward_event,
            on_removed=self._forget,
            topics=self._topics,
        )
        self._launch_spec(instance)  # refuse what cannot run before anything is listed
        self._instances[instance_id] = instance
        sequence.instances.append(instance_id)
        await self._nursery.start(instance.run)
        return instance

    def _forget(self, instance: Instance) -> None:
        if self._instances.get(instance.id) is instance:
            del self._instances[instance.id]
        if instance.id in instance.sequence.instances:
            instance.sequence.instances.remove(instance.id)

    def _forward_event(self, source: Instance, name: str, message: Any) -> None:
        """The event hub: an instance's event reaches every other running instance."""
        if len(self._instances) < 2:
            return
        try:
            self._forward_send.send_nowait((source, name, message))
        except trio.WouldBlock:
            logger.warning("event %s from %s not forwarded: forwarding queue full", name, source.id)

    async def _forwarder(self) -> None:
        async for source, name, message in self._forward_receive:
            for instance in list(self._instances.values()):
                if instance is not source and instance.is_live:
                    await _deliver(instance, name, message, source.id)

    async def kill_and_wait(self, instances: Collection[Instance]) -> None:
        """Kill ``instances`` and wait until each has ended (for forced deletes)."""
        for instance in instances:
            if instance.is_live:
                with contextlib.suppress(BadRequest):  # ended meanwhile
                    await instance.kill()
        for instance in instances:
            await instance.wait_ended()


async def _deliver(instance: Instance, name: str, message: Any, source: str) -> None:
    try:
        await instance.send_event(name, message, source=source)
    except Exception as exc:  # noqa: BLE001 - a forwarded event is best effort; log why it failed
        logger.debug("event %s not forwarded to %s: %s", name, instance.id, exc)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, separators=(",", ":"))
