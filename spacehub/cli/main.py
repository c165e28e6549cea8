"""`si`: the command-line client (the command tree of the original CLI that applies to Spacehub).

Every command is a function ``(ctx, args) -> int | None``; :func:`main` parses the arguments, runs
it and turns the client's exceptions into exit code 1 with the server's message on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Final, NoReturn

from spacehub.errors import SpacehubError

from .. import __version__
from ..client._calls import DEFAULT_TOPIC_TYPE
from ..client.errors import ApiError, ClientError, NotFound
from ..client.hub import HubClient, InstanceClient, ResponseStream
from ..client.pack import pack as pack_directory
from ..client.space import ManagerClient, SpaceClient
from . import config as cfg
from .output import Progress, format_log, print_json, print_table, print_value

__all__ = ["main"]

#: How long `inst restart` waits for the old instance to end (seconds).
RESTART_WAIT: Final = 30.0
_CHUNK: Final = 64 * 1024


class UsageError(SpacehubError):
    """A command used wrongly (reported like a server error: message, exit code 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


class Context:
    """What a command needs: the configuration, the output format, and clients made on demand."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config = cfg.load(args.profile)
        self.format: str = args.format or self.config.get("log").get("format", "pretty")
        if self.format not in ("pretty", "json"):
            self.format = "pretty"
        self._closers: list[Callable[[], None]] = []

    def close(self) -> None:
        for close in reversed(self._closers):
            close()

    @property
    def production(self) -> bool:
        return bool(self.config.get("env") == "production")

    def _verify(self) -> str | bool:
        ca = self.config.get("caFile")
        if not ca:
            return True
        if not Path(ca).is_file():
            raise UsageError(
                f"caFile {ca}: no such file ({cfg.PATH_SETTINGS['caFile']}; si config set caFile <path>)"
            )
        return str(ca)

    def manager(self) -> ManagerClient:
        url = self.config.get("middlewareApiUrl")
        if not url:
            raise UsageError("no manager URL: si config set middlewareApiUrl https://<manager>/api/v1")
        client = ManagerClient(url, token=self.config.get("token") or None, verify=self._verify())
        self._closers.append(client.close)
        return client

    def space(self, name: str | None = None) -> SpaceClient:
        space = name or self.config.get("space")
        if not space:
            raise UsageError("no Space chosen: si space use <name>")
        return self.manager().space(space)

    def hub(self) -> HubClient:
        if self.production:
            hub_id = self.config.get("hub")
            if not hub_id:
                raise UsageError("no hub chosen: si hub use <id>")
            return self.space().hub(hub_id)
        client = HubClient(self.config.get("apiUrl"), verify=self._verify())
        self._closers.append(client.close)
        return client

    def out(self, value: Any) -> None:
        print_value(value, self.format)

    def seq_id(self, value: str) -> str:
        return self.config.resolve(value, "lastSequenceId", "sequence")

    def inst_id(self, value: str) -> str:
        return self.config.resolve(value, "lastInstanceId", "instance")

    def instance(self, value: str) -> InstanceClient:
        return self.hub().instance(self.inst_id(value))


# ====================================================================== helpers
def _json_arg(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        raise UsageError(f"{what} is not valid JSON: {error}") from error


def _payload(text: str | None) -> Any:
    """An event payload: JSON if it parses, else the text itself."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _stdin_chunks() -> Iterator[bytes]:
    stream = sys.stdin.buffer
    while True:
        chunk = stream.read1(_CHUNK) if hasattr(stream, "read1") else stream.read(_CHUNK)
        if not chunk:
            return
        yield chunk


def _source(file: str | None) -> Path | Iterator[bytes]:
    return Path(file) if file and file != "-" else _stdin_chunks()


def _upload_progress(label: str) -> Progress:
    return Progress(label)


def _copy_to_stdout(stream: ResponseStream) -> None:
    """Pipe a stream to stdout as it comes; a progress bar when stdout is not the terminal."""
    out = sys.stdout.buffer
    progress = Progress("Downloading", enabled=sys.stderr.isatty() and not sys.stdout.isatty())
    try:
        for chunk in stream.iter_bytes(progress):
            out.write(chunk)
            out.flush()
    finally:
        stream.close()
        progress.finish()


def _print_records(ctx: Context, stream: ResponseStream) -> None:
    """An NDJSON log: as it is for ``--format json``, one line of text per record otherwise."""
    with stream:
        for record in stream.iter_json():
            if ctx.format == "json":
                print_json(record)
            else:
                print(format_log(record), flush=True)


def _start_options(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.config_file and args.config_string:
        raise UsageError("use one of --config-file and --config-string")
    if args.config_file:
        options["app_config"] = _json_arg(Path(args.config_file).read_text(), "--config-file")
    elif args.config_string:
        options["app_config"] = _json_arg(args.config_string, "--config-string")
    if "app_config" in options and not isinstance(options["app_config"], dict):
        raise UsageError("the app config must be a JSON object")
    if args.args is not None:
        value = _json_arg(args.args, "--args")
        if not isinstance(value, list):
            raise UsageError("--args must be a JSON array, e.g. '[\"a\", 1]'")
        options["args"] = value
    if args.limits is not None:
        options["limits"] = _json_arg(args.limits, "--limits")
    for key in ("inst_id", "input_topic", "output_topic", "restart"):
        value = getattr(args, key)
        if value is not None:
            options["instance_id" if key == "inst_id" else key] = value
    return options


def _start(ctx: Context, sequence_id: str, args: argparse.Namespace) -> None:
    instance = ctx.hub().sequence(sequence_id).start(**_start_options(ctx, args))
    ctx.config.remember(lastInstanceId=instance.id)
    # People and scripts alike want the new id: `INST=$(si seq deploy ...)` works.
    ctx.out({"id": instance.id, "sequenceId": sequence_id} if ctx.format == "json" else instance.id)


def _send(ctx: Context, source: str, progress_label: str = "Uploading") -> str:
    if source == "-":
        source = ctx.config.resolve(source, "lastPackagePath", "package")
    if not Path(source).exists():
        raise UsageError(f"{source}: no such file or directory")
    progress = _upload_progress(progress_label)
    try:
        sequence = ctx.hub().send_sequence(Path(source), progress=progress)
    finally:
        progress.finish()
    ctx.config.remember(lastSequenceId=sequence.id)
    return sequence.id


# ====================================================================== seq
def seq_pack(ctx: Context, args: argparse.Namespace) -> None:
    directory = Path(args.path)
    if args.stdout:
        pack_directory(directory, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    output = Path(args.output) if args.output else Path(f"{directory.resolve()}.tar.gz")
    pack_directory(directory, output)
    ctx.config.remember(lastPackagePath=str(output.resolve()))
    ctx.out({"path": str(output)} if ctx.format == "json" else str(output))


def seq_send(ctx: Context, args: argparse.Namespace) -> None:
    sequence_id = _send(ctx, args.path)
    ctx.out({"id": sequence_id} if ctx.format == "json" else sequence_id)


def seq_update(ctx: Context, args: argparse.Namespace) -> None:
    progress = _upload_progress("Uploading")
    try:
        ctx.out(ctx.hub().sequence(ctx.seq_id(args.id)).update(Path(args.path), progress=progress))
    finally:
        progress.finish()


def seq_start(ctx: Context, args: argparse.Namespace) -> None:
    _start(ctx, ctx.seq_id(args.id), args)


def seq_deploy(ctx: Context, args: argparse.Namespace) -> None:
    path = Path(args.path)
    if args.output:
        if not path.is_dir():
            raise UsageError("--output needs a directory to pack")
        pack_directory(path, args.output)
        ctx.config.remember(lastPackagePath=str(Path(args.output).resolve()))
        path = Path(args.output)
    _start(ctx, _send(ctx, str(path)), args)


_SEQ_COLUMNS: Final = [
    ("ID", lambda s: s.get("id")),
    ("NAME", lambda s: (s.get("config") or {}).get("name")),
    ("VERSION", lambda s: (s.get("config") or {}).get("version")),
    ("INSTANCES", lambda s: len(s.get("instances") or [])),
    ("CREATED", lambda s: s.get("created")),
]


def seq_list(ctx: Context, args: argparse.Namespace) -> None:
    sequences = ctx.hub().list_sequences()
    if args.name:
        sequences = [s for s in sequences if (s.get("config") or {}).get("name") == args.name]
    print_table(sequences, _SEQ_COLUMNS, ctx.format)


def seq_info(ctx: Context, args: argparse.Namespace) -> None:
    ctx.out(ctx.hub().sequence(ctx.seq_id(args.id)).info())


def seq_use(ctx: Context, args: argparse.Namespace) -> None:
    info = ctx.hub().sequence(ctx.seq_id(args.id)).info()
    ctx.config.remember(lastSequenceId=str(info["id"]))
    ctx.out({"id": info["id"]} if ctx.format == "json" else f"Using sequence {info['id']}")


def seq_delete(ctx: Context, args: argparse.Namespace) -> None:
    ctx.out(ctx.hub().sequence(ctx.seq_id(args.id)).delete(force=args.force))


def seq_prune(ctx: Context, args: argparse.Namespace) -> int:
    hub = ctx.hub()
    deleted: list[str] = []
    failed = 0
    for sequence in hub.list_sequences():
        try:
            hub.sequence(sequence["id"]).delete(force=args.force)
            deleted.append(sequence["id"])
        except ApiError as error:
            failed += 1
            print(f"Error: {sequence['id']}: {error.message}", file=sys.stderr)
    ctx.out({"deleted": deleted} if ctx.format == "json" else f"Deleted {len(deleted)} sequence(s)")
    return 1 if failed else 0


# ====================================================================== inst
_INST_COLUMNS: Final = [
    ("ID", lambda i: i.get("id")),
    (
        "SEQUENCE",
        lambda i: (
            (i.get("sequence") or {}).get("id") if isinstance(i.get("sequence"), dict) else i.get("sequence")
        ),
    ),
    (
        "NAME",
        lambda i: (
            ((i.get("sequence") or {}).get("config") or {}).get("name")
            if isinstance(i.get("sequence"), dict)
            else None
        ),
    ),
    ("STATUS", lambda i: i.get("status")),
    ("STARTED", lambda i: i.get("started")),
]


def inst_list(ctx: Context, args: argparse.Namespace) -> None:
    print_table(ctx.hub().list_instances(), _INST_COLUMNS, ctx.format)


def inst_use(ctx: Context, args: argparse.Namespace) -> None:
    info = ctx.instance(args.id).info()
    ctx.config.remember(lastInstanceId=str(info["id"]))
    ctx.out({"id": info["id"]} if ctx.format == "json" else f"Using instance {info['id']}")


def inst_info(ctx: Context, args: argparse.Namespace) -> None:
    ctx.out(ctx.instance(args.id).info())


def inst_health(ctx: Context, args: argparse.Namespace) -> None:
    ctx.out(ctx.instance(args.id).health())


def inst_log(ctx: Context, args: argparse.Namespace) -> None:
    _print_records(ctx, ctx.instance(args.id).log())


def inst_stream(name: str) -> Callable[[Context, argparse.Namespace], None]:
    def command(ctx: Context, args: argparse.Namespace) -> None:
        _copy_to_stdout(getattr(ctx.instance(args.id), name)())

    return command


def inst_input(ctx: Context, args: argparse.Namespace) -> None:
    progress = _upload_progress("Sending")
    try:
        ctx.instance(args.id).input(
            _source(args.file), content_type=args.content_type, end=args.end, progress=progress
        )
    finally:
        progress.finish()


def inst_stdin(ctx: Context, args: argparse.Namespace) -> None:
    progress = _upload_progress("Sending")
    try:
        ctx.instance(args.id).stdin(_source(args.file), progress=progress)
    finally:
        progress.finish()


def inst_attach(ctx: Context, args: argparse.Namespace) -> None:
    """Our stdin → its stdin; its stdout and stderr → ours, until its stdout ends."""
    instance = ctx.instance(args.id)
    errors: list[BaseException] = []

    def pump(stream: ResponseStream, out: IO[bytes]) -> None:
        try:
            for chunk in stream:
                out.write(chunk)
                out.flush()
        except (ClientError, OSError) as error:
            errors.append(error)

    def feed() -> None:
        try:
            instance.stdin(_stdin_chunks())
        except (ClientError, OSError) as error:
            errors.append(error)

    stdout, stderr = instance.stdout(), instance.stderr()
    stdout.open()
    stderr.open()
    threads = [
        threading.Thread(target=pump, args=(stderr, sys.stderr.buffer), daemon=True),
        threading.Thread(target=feed, daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        pump(stdout, sys.stdout.buffer)
    finally:
        stdout.close()
        stderr.close()
    threads[0].join(timeout=1.0)
    real = [e for e in errors if not isinstance(e, ApiError | OSError) or getattr(e, "status", 0) != 410]
    if real and not isinstance(real[0], ClientError):
        raise real[0]


def inst_event_emit(ctx: Context, args: argparse.Namespace) -> None:
    ctx.instance(args.id).send_event(args.name, _payload(args.payload))
    ctx.out({"accepted": "OK"} if ctx.format == "json" else f"Event {args.name} sent")


def inst_event_on(ctx: Context, args: argparse.Namespace) -> None:
    instance = ctx.instance(args.id)
    if args.stream:
        with instance.events(args.name) as events:
            for message in events.iter_json():
                print_json(message)
        return
    message = instance.next_event(args.name) if args.next else instance.last_event(args.name)
    print_json(message, indent=None if ctx.format == "json" else 2)


def inst_stop(ctx: Context, args: argparse.Namespace) -> None:
    ctx.out(ctx.instance(args.id).stop(args.timeout, can_call_keepalive=True))


def inst_kill(ctx: Context, args: argparse.Namespace) -> None:
    ctx.out(ctx.instance(args.id).kill(remove_immediately=args.remove_immediately))


def inst_restart(ctx: Context, args: argparse.Namespace) -> None:
    """Kill it, wait until it ended, start its sequence again with the same options."""
    hub = ctx.hub()
    old = hub.instance(ctx.inst_id(args.id))
    info = old.info()
    if info.get("status") in ("running", "starting", "initializing"):
        old.kill(remove_immediately=True)
    gone = False
    deadline = time.monotonic() + RESTART_WAIT
    while True:
        try:
            status = old.info().get("status")
        except NotFound:
            gone = True
            break
        if status in ("completed", "errored"):
            break
        if time.monotonic() > deadline:
            raise UsageError(f"instance {old.id} did not end within {RESTART_WAIT:.0f} s")
        time.sleep(0.1)
    sequence = info.get("sequence")
    sequence_id = sequence.get("id") if isinstance(sequence, dict) else sequence
    options: dict[str, Any] = {"app_config": info.get("appConfig") or {}, "args": info.get("args") or []}
    if gone:  # the id is free again only once the old instance is no longer listed
        options["instance_id"] = old.id
    topics: dict[str, Any] = {"input_topic": info.get("requires"), "output_topic": info.get("provides")}
    for option, topic in topics.items():
        if isinstance(topic, str) and topic:
            options[option] = topic
    instance = hub.sequence(str(sequence_id)).start(**options)
    ctx.config.remember(lastInstanceId=instance.id)
    ctx.out({"id": instance.id, "sequenceId": sequence_id})


# ====================================================================== topic
_TOPIC_COLUMNS: Final = [
    ("NAME", lambda t: t.get("topicName") or t.get("topic") or t.get("name") or t.get("id")),
    ("CONTENT TYPE", lambda t: t.get("contentType")),
]


def topic_create(ctx: Context, args: argparse.Namespace) -> None:
    ctx.out(ctx.hub().create_topic(args.name, args.content_type))


def topic_list(ctx: Context, args: argparse.Namespace) -> None:
    print_table(ctx.hub().list_topics(), _TOPIC_COLUMNS, ctx.format)


def topic_delete(ctx: Context, args: argparse.Namespace) -> None:
    ctx.out(ctx.hub().delete_topic(args.name))


def topic_send(ctx: Context, args: argparse.Namespace) -> None:
    progress = _upload_progress("Sending")
    try:
        ctx.hub().send_topic(
            args.name, _source(args.file), content_type=args.content_type, end=args.end, progress=progress
        )
    finally:
        progress.finish()


def topic_get(ctx: Context, args: argparse.Namespace) -> None:
    _copy_to_stdout(ctx.hub().get_topic(args.name, content_type=args.content_type))


# ====================================================================== hub
def hub_version(ctx: Context, args: argparse.Namespace) -> None:
    ctx.out(ctx.hub().version())


def hub_load(ctx: Context, args: argparse.Namespace) -> None:
    ctx.out(ctx.hub().load_check())


def hub_logs(ctx: Context, args: argparse.Namespace) -> None:
    _print_records(ctx, ctx.hub().log())


def _need_production(ctx: Context, what: str) -> None:
    if not ctx.production:
        raise UsageError(f"{what} works through a Space: si config set env production")


def _hub_state(hub: dict[str, Any]) -> str:
    """connected, unhealthy or disconnected (derived from the older fields for older managers)."""
    state = hub.get("state")
    if isinstance(state, str):
        return state
    if not hub.get("isConnectionActive"):
        return "disconnected"
    return "connected" if hub.get("healthy") else "unhealthy"


_HUB_COLUMNS: Final = [
    ("ID", lambda h: h.get("id")),
    ("STATE", _hub_state),
    ("LAST SEEN", lambda h: h.get("lastSeen") or h.get("lastHeartbeat") or "never"),
    ("TAGS", lambda h: ",".join(h.get("tags") or []) or None),
    ("DESCRIPTION", lambda h: h.get("description") or None),
]


def hub_list(ctx: Context, args: argparse.Namespace) -> None:
    _need_production(ctx, "hub list")
    print_table(ctx.space().hubs(), _HUB_COLUMNS, ctx.format)


def hub_info(ctx: Context, args: argparse.Namespace) -> None:
    if not ctx.production:
        ctx.out(ctx.hub().status())
        return
    hub_id = args.id or ctx.config.get("hub")
    if not hub_id:
        raise UsageError("which hub? si hub info <id>")
    ctx.out(ctx.space().hub_info(hub_id))


def hub_use(ctx: Context, args: argparse.Namespace) -> None:
    _need_production(ctx, "hub use")
    space = ctx.space()
    if args.id is None:
        hubs = space.hubs()
        if len(hubs) != 1:
            listed = ", ".join(str(h.get("id")) for h in hubs) or "none"
            raise UsageError(f"which hub? the Space has {len(hubs)} ({listed}): si hub use <id>")
        hub_id = str(hubs[0].get("id"))
    else:
        hub_id = str(space.hub_info(args.id).get("id", args.id))
    ctx.config.set("hub", hub_id)
    ctx.out({"hub": hub_id} if ctx.format == "json" else f"Using hub {hub_id}")


# ====================================================================== space
def space_list(ctx: Context, args: argparse.Namespace) -> None:
    print_table(ctx.manager().spaces(), [("ID", lambda s: s.get("id") or s.get("name"))], ctx.format)


def space_use(ctx: Context, args: argparse.Namespace) -> None:
    ctx.space(args.name).version()  # fails unless the token opens it
    ctx.config.set("space", args.name)
    ctx.out({"space": args.name} if ctx.format == "json" else f"Using space {args.name}")


def space_info(ctx: Context, args: argparse.Namespace) -> None:
    name = args.name or ctx.config.get("space")
    for record in ctx.manager().spaces():
        if name in (record.get("id"), record.get("name")):
            ctx.out(record)
            return
    raise UsageError(f"no space {name!r} open to this token")


def space_version(ctx: Context, args: argparse.Namespace) -> None:
    ctx.out(ctx.space(args.name).version())


# ================================================================= join-token
def join_token_create(ctx: Context, args: argparse.Namespace) -> None:
    _need_production(ctx, "join-token create")
    expires: float | str | None = args.expires
    # A number is seconds from now; anything else an ISO-8601 time for the manager to read.
    if isinstance(expires, str) and re.fullmatch(r"[0-9]+(\.[0-9]*)?", expires):
        expires = float(expires)
    tags = [tag.strip() for tag in (args.tags or "").split(",") if tag.strip()]
    made = ctx.space().create_join_token(expires=expires, description=args.description, tags=tags)
    if ctx.format == "json":
        ctx.out(made)
        return
    shown = made.get("cloudInit") if args.cloud_init else made.get("command")
    if shown is None:
        print(f"si: no command: {made.get('commandError')}; the token alone:", file=sys.stderr)
        shown = made["token"]
    print(shown.rstrip("\n"))


_JOIN_TOKEN_COLUMNS: Final = [
    ("ID", lambda t: t.get("id")),
    ("EXPIRES", lambda t: t.get("expires")),
    ("TAGS", lambda t: ",".join(t.get("tags") or []) or None),
    ("DESCRIPTION", lambda t: t.get("description") or None),
]


def join_token_list(ctx: Context, args: argparse.Namespace) -> None:
    _need_production(ctx, "join-token list")
    print_table(ctx.space().join_tokens(), _JOIN_TOKEN_COLUMNS, ctx.format)


def join_token_revoke(ctx: Context, args: argparse.Namespace) -> None:
    _need_production(ctx, "join-token revoke")
    revoked = ctx.space().revoke_join_token(args.id)
    ctx.out(revoked if ctx.format == "json" else f"revoked {revoked.get('id')}")


# ====================================================================== config
def config_print(ctx: Context, args: argparse.Namespace) -> None:
    shown = ctx.config.effective()
    if shown.get("token"):
        shown["token"] = "***"
    ctx.out({"profile": ctx.config.profile_name, "configPath": str(ctx.config.dir), **shown})


def config_session(ctx: Context, args: argparse.Namespace) -> None:
    ctx.out(ctx.config.session)


def config_set(ctx: Context, args: argparse.Namespace) -> None:
    where = ctx.config.profile_path(ctx.config.profile_name)
    if args.key == "json":
        ctx.config.set_json(args.value)
        shown: dict[str, Any] = {k: ctx.config.get(k) for k in json.loads(args.value)}
    else:
        ctx.config.set(args.key, args.value)
        shown = {args.key: ctx.config.get(args.key)}
    if shown.get("token"):
        shown["token"] = "***"
    if ctx.format == "json":
        print_json(shown)
    else:
        for key, value in shown.items():
            text = value if isinstance(value, str) else json.dumps(value)
            print(f"{key} set to {text} (profile {ctx.config.profile_name}, {where})")


def config_reset(ctx: Context, args: argparse.Namespace) -> None:
    ctx.config.reset(args.key)


def config_use(ctx: Context, args: argparse.Namespace) -> None:
    ctx.config.use_profile(args.name)
    ctx.out({"profile": args.name} if ctx.format == "json" else f"Using profile {args.name}")


def profile_list(ctx: Context, args: argparse.Namespace) -> None:
    rows = [{"name": n, "current": n == ctx.config.profile_name} for n in ctx.config.profiles()]
    print_table(
        rows, [("NAME", lambda r: r["name"]), ("IN USE", lambda r: "*" if r["current"] else "")], ctx.format
    )


def profile_create(ctx: Context, args: argparse.Namespace) -> None:
    ctx.config.create_profile(args.name)


def profile_remove(ctx: Context, args: argparse.Namespace) -> None:
    ctx.config.remove_profile(args.name)


# ====================================================================== the parser
Command = Callable[[Context, argparse.Namespace], "int | None"]


def _common() -> argparse.ArgumentParser:
    """Options every command takes, wherever they are written (``si --format json seq ls`` or after)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--format",
        choices=["pretty", "json"],
        default=argparse.SUPPRESS,
        help="output format (default: the profile's)",
    )
    common.add_argument(
        "--config", dest="profile", metavar="PROFILE", default=argparse.SUPPRESS, help="profile to use"
    )
    return common


def _group(parent: Any, name: str, help: str, aliases: Sequence[str] = ()) -> Any:
    parser = parent.add_parser(name, help=help, aliases=list(aliases), description=help)
    sub = parser.add_subparsers(
        dest=f"{name}_command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    return sub


def _command(
    sub: Any, name: str, command: Command, help: str, aliases: Sequence[str] = ()
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=help, aliases=list(aliases), parents=[_COMMON]
    )
    parser.set_defaults(command=command)
    return parser


def _start_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--config-file", help="JSON file with the app config")
    parser.add_argument("-s", "--config-string", help="the app config as a JSON string")
    parser.add_argument("--inst-id", help="the new instance's id (36 characters)")
    parser.add_argument("--input-topic", help="feed the input from this topic")
    parser.add_argument("--output-topic", help="send the output to this topic")
    parser.add_argument("--args", help="arguments for the sequence, a JSON array: '[\"a\", 1]'")
    parser.add_argument("--limits", help="resource limits as JSON: '{\"memory\": 512}'")
    parser.add_argument(
        "--restart",
        choices=("never", "on-failure", "always"),
        help="start it again when it ends, after a reboot too (default never)",
    )


_COMMON: Final = _common()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="si", description="Spacehub command-line client", parents=[_COMMON])
    parser.add_argument("-v", "--version", action="version", version=f"si {__version__}")
    top = parser.add_subparsers(dest="group", metavar="GROUP", required=True, parser_class=_Parser)

    # seq
    seq = _group(top, "seq", "sequences: pack, send, start, list, delete", ["sequence"])
    p = _command(seq, "pack", seq_pack, "pack a directory into a tar.gz (honours .siignore)")
    p.add_argument("path", help="the sequence's directory (with package.json)")
    p.add_argument("-o", "--output", help="the archive to write (default: <dir>.tar.gz)")
    p.add_argument("-c", "--stdout", action="store_true", help="write the archive to stdout")
    p = _command(seq, "send", seq_send, "upload a package (a tar.gz, or a directory packed on the fly)")
    p.add_argument("path", help="tar.gz file or directory; '-' for the last packed")
    p = _command(seq, "update", seq_update, "replace a sequence's package")
    p.add_argument("id", help="sequence id ('-' for the last)")
    p.add_argument("path", help="tar.gz file or directory")
    p = _command(seq, "start", seq_start, "start an instance of a sequence")
    p.add_argument("id", help="sequence id ('-' for the last)")
    _start_arguments(p)
    p = _command(seq, "deploy", seq_deploy, "pack (if a directory), send and start", ["run"])
    p.add_argument("path", help="tar.gz file or directory")
    p.add_argument("-o", "--output", help="also keep the packed archive here")
    _start_arguments(p)
    p = _command(seq, "list", seq_list, "list sequences", ["ls"])
    p.add_argument("-n", "--name", help="only sequences of this name")
    p = _command(seq, "info", seq_info, "show a sequence")
    p.add_argument("id", help="sequence id ('-' for the last)")
    p = _command(seq, "use", seq_use, "make a sequence the last one ('-')", ["select"])
    p.add_argument("id", help="sequence id")
    p = _command(seq, "delete", seq_delete, "delete a sequence", ["rm"])
    p.add_argument("id", help="sequence id ('-' for the last)")
    p.add_argument("-f", "--force", action="store_true", help="kill its running instances first")
    p = _command(seq, "prune", seq_prune, "delete every sequence")
    p.add_argument("-f", "--force", action="store_true", help="kill running instances first")

    # inst
    inst = _group(top, "inst", "instances: streams, events, stop, kill", ["instance"])
    _command(inst, "list", inst_list, "list instances", ["ls"])
    for name, command, text, aliases in (
        ("use", inst_use, "make an instance the last one ('-')", ["select"]),
        ("info", inst_info, "show an instance", []),
        ("health", inst_health, "show an instance's health", []),
        ("log", inst_log, "follow an instance's log", []),
        ("output", inst_stream("output"), "print an instance's output until it ends", []),
        ("stdout", inst_stream("stdout"), "print an instance's stdout until it ends", []),
        ("stderr", inst_stream("stderr"), "print an instance's stderr until it ends", []),
        ("attach", inst_attach, "connect your terminal to an instance's stdin, stdout and stderr", ["stdio"]),
        ("restart", inst_restart, "kill an instance and start its sequence again with the same options", []),
    ):
        p = _command(inst, name, command, text, aliases)
        p.add_argument("id", help="instance id ('-' for the last)")
    p = _command(inst, "input", inst_input, "send a file (or stdin) to an instance's input")
    p.add_argument("id", help="instance id ('-' for the last)")
    p.add_argument("file", nargs="?", help="file to send (default: stdin)")
    p.add_argument("-t", "--content-type", default="text/plain", help="the input's type (default text/plain)")
    p.add_argument("-e", "--end", action="store_true", help="end the input after this")
    p = _command(inst, "stdin", inst_stdin, "send a file (or stdin) to an instance's stdin")
    p.add_argument("id", help="instance id ('-' for the last)")
    p.add_argument("file", nargs="?", help="file to send (default: stdin)")
    p = _command(inst, "stop", inst_stop, "ask an instance to stop (it may keep itself alive)")
    p.add_argument("id", help="instance id ('-' for the last)")
    p.add_argument("timeout", type=int, nargs="?", default=7000, help="ms it gets to stop (default 7000)")
    p = _command(inst, "kill", inst_kill, "kill an instance")
    p.add_argument("id", help="instance id ('-' for the last)")
    p.add_argument(
        "--removeImmediately", "--remove-immediately", dest="remove_immediately", action="store_true"
    )
    event = _group(inst, "event", "send and receive an instance's events")
    p = _command(event, "emit", inst_event_emit, "send an event to an instance", ["invoke"])
    p.add_argument("id", help="instance id ('-' for the last)")
    p.add_argument("name", help="event name")
    p.add_argument("payload", nargs="?", help="the message (JSON, or text)")
    p = _command(event, "on", inst_event_on, "print an instance's event (the last one, or the next)")
    p.add_argument("id", help="instance id ('-' for the last)")
    p.add_argument("name", help="event name")
    p.add_argument("-n", "--next", action="store_true", help="wait for the next one")
    p.add_argument("-s", "--stream", action="store_true", help="print every one from now on")

    # topic
    topic = _group(top, "topic", "topics: create, list, send, get, delete")
    p = _command(topic, "create", topic_create, "create a topic")
    p.add_argument("name")
    p.add_argument("-t", "--content-type", default=DEFAULT_TOPIC_TYPE, help=f"(default {DEFAULT_TOPIC_TYPE})")
    _command(topic, "list", topic_list, "list topics", ["ls"])
    p = _command(topic, "delete", topic_delete, "delete a topic", ["rm"])
    p.add_argument("name")
    p = _command(topic, "send", topic_send, "send a file (or stdin) to a topic")
    p.add_argument("name")
    p.add_argument("file", nargs="?", help="file to send (default: stdin)")
    p.add_argument("-t", "--content-type", default=DEFAULT_TOPIC_TYPE, help=f"(default {DEFAULT_TOPIC_TYPE})")
    p.add_argument("-e", "--end", action="store_true", default=None, help="mark the end of the data")
    p = _command(topic, "get", topic_get, "print a topic's data from now on")
    p.add_argument("name")
    p.add_argument("-t", "--content-type", default=DEFAULT_TOPIC_TYPE, help=f"(default {DEFAULT_TOPIC_TYPE})")

    # hub
    hub = _group(top, "hub", "the hub: version, load, logs; hubs of a Space")
    _command(hub, "version", hub_version, "the hub's version")
    _command(hub, "load", hub_load, "the hub's load (CPU, memory, disks)")
    _command(hub, "logs", hub_logs, "follow the hub's log")
    _command(hub, "list", hub_list, "the hubs of the Space", ["ls"])
    p = _command(hub, "info", hub_info, "a hub of the Space (or the hub's status)")
    p.add_argument("id", nargs="?")
    p = _command(hub, "use", hub_use, "talk to this hub of the Space from now on", ["select"])
    p.add_argument("id", nargs="?", help="the hub's id (default: the Space's only hub)")

    # space
    space = _group(top, "space", "Spaces of the manager")
    _command(space, "list", space_list, "the Spaces the token opens", ["ls"])
    p = _command(space, "use", space_use, "talk to this Space from now on", ["select"])
    p.add_argument("name")
    p = _command(space, "info", space_info, "a Space's record")
    p.add_argument("name", nargs="?")
    p = _command(space, "version", space_version, "the Space's manager version")
    p.add_argument("name", nargs="?")

    # join-token
    join = _group(top, "join-token", "one-time tokens (and the command) that join new hubs to the Space")
    p = _command(join, "create", join_token_create, "make one; prints the line to paste on the new machine")
    p.add_argument("--expires", help="seconds from now, or an ISO-8601 time (default: 1 hour)")
    p.add_argument("--description", help="what the hub that joins is shown as")
    p.add_argument("--tags", metavar="A,B", help="tags the hub that joins gets")
    p.add_argument("--cloud-init", action="store_true", help="print cloud-init user-data instead of the line")
    _command(join, "list", join_token_list, "the tokens a hub can still use (never the secrets)", ["ls"])
    p = _command(join, "revoke", join_token_revoke, "revoke a token by its id", ["rm"])
    p.add_argument("id")

    # config
    conf = _group(top, "config", "profiles and settings (in ~/.si or $SI_CONFIG_PATH)")
    _command(conf, "print", config_print, "the profile in use", ["p"])
    _command(conf, "session", config_session, "what '-' stands for")
    p = _command(conf, "set", config_set, "change a setting of the profile")
    p.add_argument("key", choices=[*cfg.SETTABLE, "json"])
    p.add_argument("value")
    p = _command(conf, "reset", config_reset, "a setting (or 'all') back to its default")
    p.add_argument("key", choices=[*cfg.DEFAULT_PROFILE, "all"])
    p = _command(conf, "use", config_use, "switch to a profile")
    p.add_argument("name")
    prof = _group(conf, "profile", "list, switch, create, remove profiles")
    _command(prof, "list", profile_list, "the profiles", ["ls"])
    p = _command(prof, "use", config_use, "switch to a profile")
    p.add_argument("name")
    p = _command(prof, "create", profile_create, "a new profile with the defaults")
    p.add_argument("name")
    p = _command(prof, "remove", profile_remove, "delete a profile", ["rm"])
    p.add_argument("name")
    return parser


def _error(message: str) -> int:
    print(f"Error: {message}", file=sys.stderr, flush=True)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.format = getattr(args, "format", None)
    args.profile = getattr(args, "profile", None)
    ctx: Context | None = None
    try:
        ctx = Context(args)
        command: Command = args.command
        return command(ctx, args) or 0
    except ApiError as error:
        return _error(f"{error.message} (HTTP {error.status})")
    except (ClientError, UsageError, cfg.ConfigError) as error:
        return _error(str(error))
    except FileNotFoundError as error:
        return _error(f"{error.filename}: no such file" if error.filename else str(error))
    except BrokenPipeError:
        # The reader went away (si inst output | head): not an error.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if ctx is not None:
            ctx.close()


def _run(argv: Iterable[str] | None = None) -> None:
    sys.exit(main(None if argv is None else list(argv)))


if __name__ == "__main__":
    _run()
