"""The supervisor owns every Instance: it starts them in its nursery, lists them,
forwards events between them, restarts them per their policy, and takes back at
start the ones a hub before it left running.

What survives the hub
---------------------
Every instance has a state directory, ``<sequences root>/.state/<id>``: its
``state.json`` (what it was started with, its status, restart policy and count,
and whether a stop was asked for: the desired state), its holder's files and its
stream spools. When the hub stops (SIGTERM, ``kill -9``, a crash, an upgrade) its
instances go on under their holders; the next hub walks these directories before
it serves its API (:meth:`Supervisor._take_back`): a live holder hands its runner
back; a gone one (a reboot, a power loss) means the instance ended, and its
restart policy says whether it starts again. ``--end-instances-on-exit`` (and
``sth stop-instances``) is how instances are ended with the hub, on purpose.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import uuid
from collections import deque
from collections.abc import Collection
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from .. import limits
from ..errors import BadRequest, HubError, InstanceExists, InstanceNotFound, NotFound, SequenceStartFailed
from ..runtimes.base import LaunchSpec
from ..runtimes.held import HolderGone
from .instance import RESTART_POLICIES, STATE_FILE, Instance
from .lifecycle import Status
from .spool import write_json_atomic

if TYPE_CHECKING:
    from ..config import HubConfig
    from ..runtimes.base import RunnerProcess, Runtime
    from ..sequences.store import Sequence, SequenceStore
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
#: Where the instances' state directories live (see the module docstring).
STATE_DIRS: Final = ".state"
#: The ended instances remembered for the manager, in STATE_DIRS.
HISTORY_FILE: Final = "_history.json"  # no instance id starts with "_"
#: Seconds before the first restart of an instance; each restart in a row doubles it.
RESTART_BACKOFF_FIRST: Final = 1.0
#: The longest wait between two restarts.
RESTART_BACKOFF_CAP: Final = 60.0
#: An instance that ran this long before it ended is restarted after the first backoff again.
RESTART_BACKOFF_RESET_AFTER: Final = 60.0
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
    def __init__(
        self,
        config: HubConfig,
        runtime: Runtime,
        topics: TopicRouter | None = None,
        store: SequenceStore | None = None,
    ) -> None:
        self._config = config
        self._topics = topics
        self._runtime = runtime
        self._store = store
        self._instances: dict[str, Instance] = {}
        #: this hub's API as its instances reach it (context.hub, this.hub); set once it serves
        self.hub_url = ""
        self._nursery: trio.Nursery | None = None
        self._import_roots = _import_roots()
        self._state_root = config.sequences_root / STATE_DIRS
        #: ids with a restart waiting for its backoff, and the scope that cancels it
        self._pending_restarts: dict[str, trio.CancelScope] = {}
        #: counters for /metrics: restarts done by policy
        self.restarts_total = 0
        #: for /metrics: instances taken back from the hub before at start
        self.taken_back = 0
        #: ended instances, newest last, kept across hub restarts (HISTORY_FILE)
        self.history: deque[dict[str, Any]] = deque(maxlen=limits.INSTANCE_HISTORY_RECORDS)
        with contextlib.suppress(OSError, ValueError, TypeError):
            saved = json.loads((self._state_root / HISTORY_FILE).read_text())
            self.history.extend(item for item in saved if isinstance(item, dict))
        self._stopping = False
        self._forward_send, self._forward_receive = trio.open_memory_channel[tuple[Instance, str, Any]](
            FORWARD_QUEUE
        )

    @property
    def keeps_instances(self) -> bool:
        """Whether instances outlive this hub (the runtime keeps them through holders)."""
        return (
            bool(getattr(self._runtime, "keeps_instances", False)) and not self._config.end_instances_on_exit
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            instances = await nursery.start(self._run_instances)
            await self._take_back()
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    self._stopping = True
                    for scope in self._pending_restarts.values():
                        scope.cancel()
                    if self.keeps_instances:
                        live = [i for i in self._instances.values() if i.is_live]
                        if live:
                            logger.info("leaving %d instance(s) running for the next hub", len(live))
                        for instance in self._instances.values():
                            instance.detach()
                    else:
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
        assert instance.state_dir is not None
        return LaunchSpec(
            instance_id=instance.id,
            argv=argv,
            env=env,
            cwd=work_dir,
            package_dir=sequence.directory,
            state_dir=instance.state_dir,
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
        restart = payload.get("restart", "never")
        if restart not in RESTART_POLICIES:
            raise BadRequest(f"restart must be one of: {', '.join(RESTART_POLICIES)}")
        if instance_id in self._instances or instance_id in self._pending_restarts:
            raise InstanceExists("Instance with a given ID already exists")
        # A state directory nobody lists is an old one's (ended, forgotten): not ours.
        shutil.rmtree(self._state_root / instance_id, ignore_errors=True)
        return await self._start(sequence, self._start_fields(payload, instance_id, restart), restarts=0)

    @staticmethod
    def _start_fields(payload: dict[str, Any], instance_id: str, restart: str) -> dict[str, Any]:
        return {
            "id": instance_id,
            "appConfig": payload.get("appConfig") or {},
            "args": payload.get("args") or [],
            "inputTopic": payload.get("inputTopic") or None,
            "outputTopic": payload.get("outputTopic") or None,
            "limits": payload.get("limits") or {},
            "restart": restart,
        }

    def _instance(
        self,
        sequence: Sequence,
        fields: dict[str, Any],
        *,
        restarts: int,
        adopted: RunnerProcess | None = None,
        restored: dict[str, Any] | None = None,
    ) -> Instance:
        # Private: a launch carries the instance's environment and appConfig.
        self._state_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        state_dir = self._state_root / fields["id"]
        state_dir.mkdir(mode=0o700, exist_ok=True)
        return Instance(
            instance_id=fields["id"],
            sequence=sequence,
            app_config=fields.get("appConfig") or {},
            args=fields.get("args") or [],
            runtime=self._runtime,
            config=self._config,
            launch=self._launch_spec,
            input_topic=fields.get("inputTopic") or None,
            output_topic=fields.get("outputTopic") or None,
            limits_request=fields.get("limits") or {},
            on_event=self._forward_event,
            on_removed=self._forget,
            on_ended=self._ended,
            topics=self._topics,
            state_dir=state_dir,
            restart=str(fields.get("restart") or "never"),
            restarts=restarts,
            adopted=adopted,
            restored=restored,
        )

    def _list(self, instance: Instance) -> None:
        old = self._instances.get(instance.id)
        if old is not None and old is not instance:
            old.forget_now()  # an ended one its restart replaces
        self._instances[instance.id] = instance
        if instance.id not in instance.sequence.instances:
            instance.sequence.instances.append(instance.id)

    async def _start(self, sequence: Sequence, fields: dict[str, Any], *, restarts: int) -> Instance:
        assert self._nursery is not None
        instance = self._instance(sequence, fields, restarts=restarts)
        self._launch_spec(instance)  # refuse what cannot run before anything is listed
        self._list(instance)
        await self._nursery.start(instance.run)
        return instance

    def _forget(self, instance: Instance) -> None:
        if self._instances.get(instance.id) is instance:
            del self._instances[instance.id]
            if instance.id in instance.sequence.instances:
                instance.sequence.instances.remove(instance.id)
            if instance.id not in self._pending_restarts:
                shutil.rmtree(self._state_root / instance.id, ignore_errors=True)

    # ------------------------------------------------------------------ restarts
    def _wants_restart(self, instance: Instance) -> bool:
        if instance.stop_requested or self._stopping:
            return False
        if instance.restart == "always":
            return True
        return instance.restart == "on-failure" and instance.status is Status.ERRORED

    def _remember(self, instance: Instance) -> None:
        """Keep an ended instance in the history the manager gets (once per run)."""
        info = dict(instance.info())
        if any(h.get("id") == info["id"] and h.get("started") == info.get("started") for h in self.history):
            return
        self.history.append(info)
        with contextlib.suppress(OSError):
            self._state_root.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_json_atomic(self._state_root / HISTORY_FILE, list(self.history))

    def _ended(self, instance: Instance) -> None:
        """An instance ended: remember it, and start it again after its backoff if its
        policy says so."""
        self._remember(instance)
        if self._nursery is None or not self._wants_restart(instance):
            return
        if self._instances.get(instance.id) is not instance or instance.id in self._pending_restarts:
            return
        scope = trio.CancelScope()
        self._pending_restarts[instance.id] = scope
        instance.restart_scope = scope
        self._nursery.start_soon(self._restart_later, instance, scope)

    def _backoff(self, instance: Instance) -> float:
        ran = instance.ran_seconds()
        if ran is not None and ran >= RESTART_BACKOFF_RESET_AFTER:
            return RESTART_BACKOFF_FIRST
        return float(min(RESTART_BACKOFF_CAP, RESTART_BACKOFF_FIRST * 2 ** min(instance.restarts, 10)))

    async def _restart_later(self, ended: Instance, scope: trio.CancelScope) -> None:
        fields = ended.saved_state()
        restarts = ended.restarts
        delay = self._backoff(ended)
        try:
            with scope:
                while True:
                    await trio.sleep(delay)
                    restarts += 1
                    self.restarts_total += 1
                    logger.info("restarting instance %s (%s, restart %d)", ended.id, ended.restart, restarts)
                    try:
                        await self._start(ended.sequence, fields, restarts=restarts)
                        return
                    except HubError as exc:
                        logger.warning("instance %s did not start again: %s", ended.id, exc.message)
                        delay = min(RESTART_BACKOFF_CAP, delay * 2)
                        # Listed as it ended last (the failed start is not) until it runs again.
                        ended.restarts = restarts
                        self._instances.setdefault(ended.id, ended)
        finally:
            self._pending_restarts.pop(ended.id, None)
            ended.restart_scope = None
            if ended.removed and self._instances.get(ended.id) is ended and self._nursery is not None:
                self._nursery.start_soon(self._forget_later, ended)

    async def _forget_later(self, instance: Instance) -> None:
        await trio.sleep(self._config.instance_lifetime)
        self._forget(instance)

    # ------------------------------------------------------------------ taking back
    async def _take_back(self) -> None:
        """Take back every instance a hub before left (see the module docstring)."""
        assert self._nursery is not None
        taken = 0
        started = trio.current_time()
        kept: set[str] = set()
        try:
            entries = sorted(self._state_root.iterdir())
        except FileNotFoundError:
            entries = []
        for state_dir in entries:
            if state_dir.is_dir() and await self._take_back_one(state_dir):
                kept.add(state_dir.name)
                taken += 1
        # Containers of a Podman hub before that nobody took back (their holders gone).
        remove_orphans = getattr(self._runtime, "remove_orphans", None)
        if remove_orphans is not None:
            await remove_orphans(logger, keep=kept)
        # Scratch directories nobody owns now (instances that ended with a hub before).
        with contextlib.suppress(FileNotFoundError):
            for work_dir in (self._config.sequences_root / WORK_DIRS).iterdir():
                if work_dir.name not in kept:
                    shutil.rmtree(work_dir, ignore_errors=True)
        self.taken_back = len(kept)
        if taken:
            logger.info("took back %d instance(s) in %.0f ms", taken, (trio.current_time() - started) * 1000)

    async def _take_back_one(self, state_dir: Path) -> bool:
        """Take back or list the instance of ``state_dir``; whether its runner runs."""
        assert self._nursery is not None
        try:
            saved = json.loads((state_dir / STATE_FILE).read_text())
            instance_id = str(saved["id"])
            sequence = self._sequence(str(saved["sequence"]))
        except (OSError, ValueError, KeyError, TypeError, NotFound) as exc:
            # A start that never got as far as its first state, or a sequence deleted
            # meanwhile: nothing to take back; its runner, if any, must not run unowned.
            logger.warning("instance state %s not taken back: %s", state_dir.name, exc)
            await self._let_go_of(state_dir)
            return False
        restarts = int(saved.get("restarts") or 0)
        try:
            process = await self._runtime.adopt(instance_id, state_dir, saved.get("limits") or {})
        except HolderGone:
            return await self._ended_offline(state_dir, sequence, saved, restarts)
        except (OSError, trio.TooSlowError) as exc:
            logger.warning("instance %s not taken back: %s", instance_id, exc)
            return await self._ended_offline(state_dir, sequence, saved, restarts)
        instance = self._instance(sequence, saved, restarts=restarts, adopted=process, restored=saved)
        self._list(instance)
        await self._nursery.start(instance.run)
        return True

    async def _ended_offline(
        self, state_dir: Path, sequence: Sequence, saved: dict[str, Any], restarts: int
    ) -> bool:
        """An instance whose holder is gone: it ended while no hub ran."""
        assert self._nursery is not None
        exit_info: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            exit_info = json.loads((state_dir / "exit.json").read_text())
        code = exit_info.get("code")
        if saved.get("exitcode") is not None:  # it had ended under the hub before
            code, ended, reason = saved["exitcode"], saved.get("ended"), str(saved.get("reason") or "")
        elif isinstance(code, int):
            ended = exit_info.get("ended")
            reason = f"Runner ended while no hub ran (exit code {code})"
            code = code if code >= 0 else 128 - code
        else:
            code, ended = None, None
            reason = "Runner gone while no hub ran (the machine restarted, or its holder was killed)"
        instance = self._instance(sequence, saved, restarts=restarts, restored=saved)
        self._list(instance)
        logger.info("instance %s ended while no hub ran: %s", instance.id, reason)
        # Listed with its end; its restart policy applies as to any end (run_ended calls _ended).
        await self._nursery.start(partial(instance.run_ended, exitcode=code, ended=ended, reason=reason))
        return False  # nothing of it runs: its container and scratch directory may go

    async def _let_go_of(self, state_dir: Path) -> None:
        with contextlib.suppress(HolderGone, OSError, trio.TooSlowError):
            process = await self._runtime.adopt(state_dir.name, state_dir, {})
            process.signal_group(signal.SIGKILL)
            with trio.move_on_after(self._config.kill_grace):
                await process.wait()
            await process.aclose()
        shutil.rmtree(state_dir, ignore_errors=True)

    def _sequence(self, sequence_id: str) -> Sequence:
        if self._store is None:
            raise NotFound("no sequence store")
        return self._store.get(sequence_id)

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
