"""``cpm``: the manager's command line.

``cpm [serve] [options]`` runs the manager; the other commands administer its state
(spaces, tokens, hubs) by opening the same SQLite file directly, which is safe while
the server runs (WAL mode, short transactions): a token made here works at once, a
hub revoked here is cut off within a few seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import trio

from spacehub.models import HubRecord
from spacehub.server import speedups
from spacehub.server.allocator import tune_malloc
from spacehub.server.config import size_argument
from spacehub.server.http import REQUEST_ID
from spacehub.server.logformat import LOG_FORMATS, ContextFilter, JsonFormatter

from . import __version__, admin
from .config import LOG_LEVELS, ConfigError, ManagerConfig, load_config
from .errors import ManagerError, SpaceNotFound
from .joining import PackageShelf, cloud_init, configured_base_url, join_line
from .metrics import metrics_token
from .registry import Registry, iso_utc
from .service import open_registry, prepare, run_manager
from .tls import ca_fingerprint

COMMANDS = ("serve", "space", "token", "join-token", "hub", "ca-fingerprint", "metrics-token")
_LOG_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, help="TOML config file; flags given here override it")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="where the registry and certificates live (default: $STATE_DIRECTORY under systemd,"
        " else ~/.local/share/spacehub-cpm)",
    )
    parser.add_argument(
        "--registry",
        metavar="URL",
        help="keep the registry in PostgreSQL, shared by every replica: postgresql://USER@HOST/DB"
        " (default: SQLite in the data dir; docs/replicas.md)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpm",
        description="Spacehub manager: Spaces, the hubs that join them, and the Space API. "
        "With no command, runs `cpm serve`.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"cpm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the manager (the default)")
    _common(serve)
    serve.add_argument("-P", "--port", type=int, help="API port (default 9000; 0 picks a free one)")
    serve.add_argument("-H", "--hostname", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("-L", "--log-level", choices=LOG_LEVELS, help="log level (default info)")
    serve.add_argument(
        "--topic-log-bytes",
        type=size_argument,
        metavar="BYTES",
        help="most bytes a Space-wide topic keeps for consumer hubs that have not taken them"
        " (a hub whose link is down); then its producers wait (default 512M; K, M, G suffixes)",
    )
    serve.add_argument(
        "--fault-injection",
        action="store_true",
        default=None,
        help="serve POST /api/v1/faults to loopback callers: cut, partition or delay hub links, fail"
        " registry writes (tests and rehearsals; docs/operations.md)",
    )
    serve.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="text (default) or json: one object a line, for log shippers",
    )
    serve.add_argument("--tls-cert", type=Path, help="serve this certificate instead of the generated one")
    serve.add_argument("--tls-key", type=Path, help="the key of --tls-cert")
    serve.add_argument("--tls-ca", type=Path, help="the CA of --tls-cert, served at /api/v1/ca.pem")
    serve.add_argument(
        "--no-tls", dest="tls", action="store_false", default=None, help="plain HTTP (only on loopback)"
    )
    serve.add_argument(
        "--public-name",
        action="append",
        dest="public_names",
        metavar="NAME",
        help="a DNS name or IP the generated server certificate carries (repeatable)",
    )
    serve.add_argument(
        "--public-url",
        metavar="URL",
        help="how new machines reach this manager, https://HOST[:PORT], for join commands"
        " (default: the address the API was called at)",
    )
    serve.add_argument(
        "--package",
        type=Path,
        metavar="FILE",
        help="the spacehub_<version>_all.deb new hubs install from this manager"
        " (default: found in the data dir's packages/, apt's cache or make deb's build/)",
    )
    serve.add_argument(
        "--space",
        action="append",
        dest="spaces",
        metavar="NAME",
        help="make this space if missing (repeatable)",
    )
    serve.add_argument(
        "--advertise-url",
        metavar="URL",
        help="how the other replicas reach this one, https://HOST:PORT (with --registry postgresql://;"
        " default: the public URL, else the listening address)",
    )
    serve.add_argument("--heartbeat-interval", type=float, metavar="SECONDS", help="(default 10)")
    serve.add_argument("--missed-heartbeats", type=int, metavar="N", help="before unhealthy (default 3)")
    serve.add_argument("--ping-interval", type=float, metavar="SECONDS", help="(default 10)")
    serve.add_argument(
        "--pong-timeout",
        type=float,
        metavar="SECONDS",
        help="grace for a late message: links silent for heartbeat interval + this are closed (default 10)",
    )

    space = commands.add_parser("space", help="spaces").add_subparsers(dest="action", required=True)
    create = space.add_parser("create", help="make a space")
    create.add_argument("name")
    _common(create)
    _common(space.add_parser("list", help="list the spaces"))

    token = commands.add_parser("token", help="API bearer tokens").add_subparsers(
        dest="action", required=True
    )
    create = token.add_parser("create", help="make an API token; prints it (shown only once)")
    create.add_argument("--space", required=True)
    create.add_argument("--description", default="")
    _common(create)
    revoke = token.add_parser("revoke", help="revoke an API token, given as the token or its id")
    revoke.add_argument("--space", required=True)
    revoke.add_argument("token", nargs="?", help="the token (shk_...) or its listed id")
    revoke.add_argument("--all", action="store_true", help="revoke every token of the space")
    _common(revoke)
    listing = token.add_parser("list", help="list a space's API tokens (ids, never the secrets)")
    listing.add_argument("--space", required=True)
    _common(listing)

    join = commands.add_parser("join-token", help="one-time join tokens").add_subparsers(
        dest="action", required=True
    )
    create = join.add_parser(
        "create", help="make a one-time join token; prints it (or the command that uses it)"
    )
    create.add_argument("--space", required=True)
    create.add_argument(
        "--ttl", type=float, default=3600.0, metavar="SECONDS", help="lifetime (default 3600)"
    )
    create.add_argument("--description", default="", help="what the hub that joins with it is shown as")
    create.add_argument("--tags", default="", metavar="A,B", help="tags the hub that joins with it gets")
    shown = create.add_mutually_exclusive_group()
    shown.add_argument(
        "--command",
        dest="command_line",
        action="store_true",
        help="print the line to paste as root on the new machine (docs/joining.md)",
    )
    shown.add_argument("--cloud-init", action="store_true", help="print cloud-init user-data that joins")
    create.add_argument(
        "--public-url",
        metavar="URL",
        help="how the new machine reaches this manager (default: public_url of the config,"
        " else its hostname and port)",
    )
    create.add_argument("--package", type=Path, metavar="FILE", help="the .deb the manager hands out")
    _common(create)
    listing = join.add_parser("list", help="the join tokens a hub can still use (ids, never the secrets)")
    listing.add_argument("--space", required=True)
    listing.add_argument("--all", action="store_true", help="used, expired and revoked ones too")
    _common(listing)
    revoke = join.add_parser("revoke", help="revoke a join token, given as the token or its listed id")
    revoke.add_argument("--space", required=True)
    revoke.add_argument("token")
    _common(revoke)

    hub = commands.add_parser("hub", help="hubs").add_subparsers(dest="action", required=True)
    listing = hub.add_parser("list", help="list a space's hubs")
    listing.add_argument("--space", required=True)
    listing.add_argument("--json", action="store_true", help="print JSON")
    _common(listing)
    revoke = hub.add_parser("revoke", help="revoke a hub's key for good (its link is closed)")
    revoke.add_argument("id")
    revoke.add_argument("--reason", required=True)
    _common(revoke)

    _common(commands.add_parser("ca-fingerprint", help="print the SHA-256 fingerprint of the manager's CA"))
    _common(
        commands.add_parser(
            "metrics-token", help="print the token Prometheus scrapes /metrics with (made if missing)"
        )
    )
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    # `cpm`, `cpm -P 9001`: serving is the default command.
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "-V", "--version")):
        argv = ["serve", *argv]
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides: dict[str, Any] = {"data_dir": args.data_dir, "registry": getattr(args, "registry", None)}
    if args.command == "join-token" and args.action == "create":
        overrides.update(public_url=args.public_url, package=args.package)
    if args.command == "serve":
        for name in (
            "port",
            "hostname",
            "log_level",
            "log_format",
            "fault_injection",
            "tls",
            "tls_cert",
            "tls_key",
            "tls_ca",
            "public_names",
            "public_url",
            "package",
            "spaces",
            "heartbeat_interval",
            "missed_heartbeats",
            "ping_interval",
            "pong_timeout",
            "topic_log_bytes",
            "advertise_url",
        ):
            overrides[name] = getattr(args, name)
    try:
        config = load_config(args.config, overrides)
        if args.command == "serve":
            return _serve(config)
        return _admin(args, config)
    except ConfigError as exc:
        print(f"cpm: {exc}", file=sys.stderr)
        return 2
    except ManagerError as exc:
        print(f"cpm: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cpm: {exc}", file=sys.stderr)
        return 1


def _setup_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
        handler.addFilter(ContextFilter(request=REQUEST_ID.get))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("cpm", "spacehub"):
        logger = logging.getLogger(name)
        logger.setLevel(_LOG_LEVELS[level])
        logger.addHandler(handler)
    # The registry's connection pool logs every failed reconnection; the manager says once
    # that the database is unavailable, and again when it is back.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)


#: The cyclic garbage collector's thresholds for the serving manager (Python's are 700, 10, 10).
#: A manager holds thousands of long-lived links, and every collection of the oldest generation
#: walks all of their objects: with the defaults, 5,000 idle hubs spent about half of the
#: manager's CPU in the collector (bench/README.md, fleet). The price: cyclic garbage waits
#: longer, up to 20,000 new objects (a few MB) before the youngest generation is collected.
GC_THRESHOLDS: Final = (20_000, 20, 100)


def _serve(config: ManagerConfig) -> int:
    _setup_logging(config.log_level, config.log_format)
    gc.set_threshold(*GC_THRESHOLDS)
    tune_malloc()
    speedups.install()
    # Make the files first (and fail before printing anything if we cannot).
    registry, fingerprint = prepare(config)
    registry.close()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_serve_until_signal, config, fingerprint)
    return 0


async def _serve_until_signal(config: ManagerConfig, fingerprint: str | None) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(run_manager, config)
            # Tools and tests wait for these lines.
            print(f"API on {', '.join(addresses)}", flush=True)
            if fingerprint is not None:
                print(f"CA fingerprint: {fingerprint}", flush=True)
            else:
                print("CA fingerprint: none (TLS is off)" if not config.tls else "CA fingerprint: unknown")
            print("Running", flush=True)
            async for signum in signals:
                # Through the log, so a JSON log stays all JSON.
                logging.getLogger("cpm").warning("%s, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def _admin(args: argparse.Namespace, config: ManagerConfig) -> int:
    if args.command == "metrics-token":
        config.data_dir.mkdir(parents=True, exist_ok=True)
        print(metrics_token(config.data_dir))
        return 0
    if args.command == "ca-fingerprint":
        path = config.ca_path
        if path is None or not path.exists():
            print("cpm: no CA yet; `cpm serve` makes one on its first start", file=sys.stderr)
            return 1
        print(ca_fingerprint(path))
        return 0
    on_file = config.registry is None  # PostgreSQL needs no file here
    if args.command == "space" and args.action == "list" and on_file and not config.registry_path.exists():
        print(f"cpm: no registry in {config.data_dir} yet: no spaces", file=sys.stderr)
        return 0
    if (
        not (args.command == "space" and args.action == "create")
        and on_file
        and not config.registry_path.exists()
    ):
        # Opening would make an empty registry here, and the command would then fail on a
        # Space that lives in another data dir: say where we looked instead.
        print(
            f"cpm: no registry in {config.data_dir} (no Space was made there); give the manager's "
            "--data-dir (make run's is .local-space/cpm), or make a Space: cpm space create <name>",
            file=sys.stderr,
        )
        return 1
    try:
        return _admin_on_registry(args, config)
    except SpaceNotFound as exc:
        print(f"cpm: {exc.message} in {config.data_dir}", file=sys.stderr)
        return 1


def _admin_on_registry(args: argparse.Namespace, config: ManagerConfig) -> int:
    if (args.command, args.action) == ("hub", "list"):
        return _hub_list(args, config)
    with open_registry(config) as registry:
        match (args.command, args.action):
            case ("space", "create"):
                print(registry.create_space(args.name).name)
            case ("space", "list"):
                for space in registry.list_spaces():
                    print(f"{space.name}\t{iso_utc(space.created)}")
            case ("token", "create"):
                print(registry.create_api_token(args.space, args.description))
            case ("token", "revoke"):
                if args.all:
                    print(f"revoked {registry.revoke_all_api_tokens(args.space)} token(s)")
                elif args.token:
                    print(f"revoked {registry.revoke_api_token(args.space, args.token).id}")
                else:
                    print("cpm: name a token, or give --all", file=sys.stderr)
                    return 2
            case ("token", "list"):
                for token in registry.list_api_tokens(args.space, include_revoked=True):
                    state = f"revoked {iso_utc(token.revoked_at)}" if token.revoked_at else "active"
                    print(f"{token.id}\t{iso_utc(token.created)}\t{state}\t{token.description}")
            case ("join-token", "create"):
                return _join_token_create(args, config, registry)
            case ("join-token", "list"):
                for join_token in registry.list_join_tokens(args.space, include_spent=args.all):
                    record = join_token.record()
                    state = next((k for k in ("revoked", "used") if k in record), "expires")
                    tags = ",".join(join_token.tags) or "-"
                    print(f"{join_token.id}\t{state} {record[state]}\t{tags}\t{join_token.description}")
            case ("join-token", "revoke"):
                print(f"revoked {registry.revoke_join_token(args.space, args.token).id}")
            case ("hub", "revoke"):
                hub = registry.revoke_hub(args.id, args.reason)
                print(f"revoked {hub.id}; its link is closed within seconds if the manager runs")
    return 0


def _join_token_create(args: argparse.Namespace, config: ManagerConfig, registry: Registry) -> int:
    tags = [tag.strip() for tag in args.tags.split(",") if tag.strip()]
    issued = registry.issue_join_token(args.space, args.ttl, args.description, tags)
    if not (args.command_line or args.cloud_init):
        print(issued.token)
        return 0
    shelf = PackageShelf(config.package, config.data_dir)
    if shelf.find() is None:
        print(f"cpm: made join token {issued.listing.id} but no command: {shelf.missing()}", file=sys.stderr)
        print(issued.token)
        return 1
    base = configured_base_url(config.public_url, config.tls, config.hostname, config.port)
    ca_path = config.ca_path if config.tls else None
    has_ca = ca_path is not None and ca_path.exists()
    if args.cloud_init:
        pem = ca_path.read_bytes() if has_ca and ca_path is not None else None
        print(cloud_init(base, pem, args.space, issued.token, args.description, tags), end="")
    else:
        fingerprint = ca_fingerprint(ca_path) if has_ca and ca_path is not None else None
        print(join_line(base, fingerprint, args.space, issued.token, args.description, tags))
    return 0


#: Columns of ``cpm hub list``: header and how to read it from a hub record.
_HUB_COLUMNS: Final[tuple[tuple[str, Callable[[HubRecord], Any]], ...]] = (
    ("ID", lambda r: r["id"]),
    ("STATE", lambda r: r["state"]),
    ("LAST SEEN", lambda r: r.get("lastSeen") or "never"),
    ("TAGS", lambda r: ",".join(r.get("tags") or []) or "-"),
    ("DESCRIPTION", lambda r: r.get("description") or "-"),
)


def _hub_list(args: argparse.Namespace, config: ManagerConfig) -> int:
    """The Space's hubs with their state: live from the manager serving this data dir, else from
    the registry (then every hub is disconnected, and the command says so)."""
    try:
        answer = admin.ask(config.data_dir, {"op": "hubs", "space": args.space})
        if "error" in answer:
            print(f"cpm: {answer['error']}", file=sys.stderr)
            return 1
        records: list[HubRecord] = answer["hubs"]
    except admin.ManagerNotRunning:
        print(f"cpm: no manager serves {config.data_dir} now: every hub is disconnected", file=sys.stderr)
        with open_registry(config) as registry:
            records = []
            for hub in registry.list_hubs(args.space):
                record = hub.record()
                seen = [t for t in (hub.last_connected, hub.last_disconnected) if t is not None]
                record["state"] = "disconnected"
                record["lastSeen"] = iso_utc(max(seen)) if seen else None
                if hub.revoked_at is not None:
                    record["revoked"] = iso_utc(hub.revoked_at)
                records.append(record)
    for record in records:
        if record.get("revoked"):
            record["state"] = "revoked"
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    rows = [[h for h, _ in _HUB_COLUMNS], *([str(get(r)) for _, get in _HUB_COLUMNS] for r in records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HUB_COLUMNS))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
