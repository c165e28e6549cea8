"""``sth``: command-line options → configuration → the service tree."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from spacehub.server import speedups
from spacehub.server.allocator import tune_malloc
from spacehub.server.config import size_argument

from . import __version__
from .config import (
    DATA_DIR_RULE,
    LOG_FORMATS,
    LOG_LEVELS,
    PODMAN_NETWORKS,
    RUNTIMES,
    ConfigError,
    load_config,
)
from .service import run_hub


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sth",
        description="Spacehub hub: keeps Sequences and runs them as Instances, served over a REST API.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"sth {__version__}")
    parser.add_argument("-c", "--config", type=Path, help="TOML config file; flags given here override it")
    parser.add_argument("-P", "--port", type=int, help="API port (default 8000; 0 picks a free one)")
    parser.add_argument(
        "-H",
        "--hostname",
        help="address the API listens on (default 127.0.0.1; 0.0.0.0 exposes it to the network)",
    )
    parser.add_argument(
        "-D",
        "--sequences-root",
        type=Path,
        help="where sequences are kept (default: $STATE_DIRECTORY under systemd,"
        " else ~/.local/share/spacehub/sequences)",
    )
    parser.add_argument("-L", "--log-level", choices=LOG_LEVELS, help="log level (default info)")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="text (default) or json: one object a line, for log shippers",
    )
    parser.add_argument(
        "-E",
        "--identify-existing",
        action="store_true",
        default=None,
        help="also adopt package directories placed in the sequences root by hand (id = directory name)",
    )
    parser.add_argument("--runtime", choices=RUNTIMES, help="how instances run (default process)")
    podman = parser.add_argument_group("podman runtime (--runtime podman; see docs/podman.md)")
    podman.add_argument(
        "--runner-image-py", metavar="IMAGE", help="own image for Python sequences (python3 on PATH)"
    )
    podman.add_argument(
        "--runner-image-node", metavar="IMAGE", help="own image for Node sequences (node on PATH)"
    )
    podman.add_argument("--podman-network", choices=PODMAN_NETWORKS, help="container network (default none)")
    podman.add_argument(
        "--default-memory", type=int, metavar="MB", help="memory limit per instance (default 512)"
    )
    podman.add_argument(
        "--default-cpus", type=float, metavar="N", help="CPU limit per instance (default 0: none)"
    )
    podman.add_argument(
        "--default-pids", type=int, metavar="N", help="process limit per instance (default 256)"
    )
    parser.add_argument(
        "--instance-lifetime",
        type=float,
        metavar="SECONDS",
        help="how long a finished instance stays listed with its status and output (default 180)",
    )
    parser.add_argument(
        "--kill-grace",
        type=float,
        metavar="SECONDS",
        help="time between SIGTERM and SIGKILL on kill (default 5)",
    )
    parser.add_argument(
        "--end-instances-on-exit",
        action="store_true",
        default=None,
        help="stop every instance when the hub stops (by default they run on, and the next hub"
        " takes them back)",
    )
    parser.add_argument(
        "--node-exit-timeout",
        type=float,
        metavar="SECONDS",
        help="how long a Node.js instance lingers after its output ended, events and stop handlers"
        " still working, before it completes (the original's exitTimeout; default 10)",
    )
    parser.add_argument("--python", help="interpreter for Python sequences (default: the one running sth)")
    parser.add_argument("--node", help="Node.js executable for Node sequences (default: node on PATH)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help=f"the hub's state: link key, link.json and (unless -D) the sequences (default: {DATA_DIR_RULE})",
    )
    link = parser.add_argument_group("link to a manager (cpm)")
    link.add_argument(
        "--cpm-url",
        metavar="URL",
        action="append",
        help="the manager to link to: wss://HOST:PORT; repeat it for a Space's replicas (tried in turn)",
    )
    link.add_argument("--space", metavar="NAME", help="the space to join")
    link.add_argument("--join-token", metavar="TOKEN", help="one-time join token (only until the hub joined)")
    link.add_argument("--cpm-ca", metavar="FILE", help="the manager's CA certificate (PEM) to trust")
    link.add_argument(
        "--cpm-fingerprint", metavar="SHA256", help="the manager CA's SHA-256 fingerprint (the CA is fetched)"
    )
    link.add_argument(
        "--cpm-insecure",
        action="store_true",
        default=None,
        help="allow plain ws:// to a manager that is not on this machine (unencrypted!)",
    )
    link.add_argument(
        "--link-backoff-cap",
        type=float,
        metavar="SECONDS",
        help="longest wait between attempts to link to a manager that answered (default 60;"
        " failures double the wait up to it)",
    )
    link.add_argument(
        "--topic-spool-bytes",
        type=size_argument,
        metavar="BYTES",
        help="most bytes one topic's outbound spool keeps for the Space (records not yet"
        " acknowledged by the manager, e.g. while the link is down); then producers wait"
        " (default 256M; K, M, G suffixes)",
    )
    link.add_argument(
        "--topic-spool-total-bytes",
        type=size_argument,
        metavar="BYTES",
        help="most bytes all outbound topic spools keep together (default 1G)",
    )
    link.add_argument("--description", help="shown by the manager")
    link.add_argument("--tags", metavar="A,B", help="comma-separated tags, shown by the manager")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["images"]:  # `sth images build|check` (agent/images.py)
        from .images import main as images_main

        return images_main(argv[1:])
    if argv[:1] == ["stop-instances"]:  # `sth stop-instances` (agent/instances/offline.py)
        from .instances.offline import main as stop_main

        return stop_main(argv[1:])
    if argv[:1] == ["join"]:  # `sth join ...` writes the link settings (agent/join.py)
        from .join import main as join_main

        return join_main(argv[1:])
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {
        "port": args.port,
        "hostname": args.hostname,
        "sequences_root": args.sequences_root,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "identify_existing": args.identify_existing,
        "runtime": args.runtime,
        "instance_lifetime": args.instance_lifetime,
        "kill_grace": args.kill_grace,
        "end_instances_on_exit": args.end_instances_on_exit,
        "node_exit_timeout": args.node_exit_timeout,
        "python": args.python,
        "node": args.node,
        "data_dir": args.data_dir,
        "cpm_url": args.cpm_url,
        "space": args.space,
        "join_token": args.join_token,
        "cpm_ca": args.cpm_ca,
        "cpm_fingerprint": args.cpm_fingerprint,
        "cpm_insecure": args.cpm_insecure,
        "link_backoff_cap": args.link_backoff_cap,
        "topic_spool_bytes": args.topic_spool_bytes,
        "topic_spool_total_bytes": args.topic_spool_total_bytes,
        "description": args.description,
        "tags": None if args.tags is None else [t.strip() for t in args.tags.split(",") if t.strip()],
        "runner_image_py": args.runner_image_py,
        "runner_image_node": args.runner_image_node,
        "podman_network": args.podman_network,
        "default_memory_mb": args.default_memory,
        "default_cpus": args.default_cpus,
        "default_pids": args.default_pids,
    }
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"sth: {exc}", file=sys.stderr)
        return 2
    tune_malloc()
    # The hub's API is plain HTTP: the manager's websocket and TLS patches would only load
    # websockets into a hub that runs alone.
    speedups.install(only=("socket-reads",))
    try:
        trio.run(_serve_until_signal, config)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"sth: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve_until_signal(config: Any) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(run_hub, config)
            # Tools (and the original's test harness) wait for these two lines.
            print(f"API on {', '.join(addresses)}", flush=True)
            print("Running", flush=True)
            async for signum in signals:
                # Through the log, so a JSON log stays all JSON.
                logging.getLogger("agent").warning("%s, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    sys.exit(main())
