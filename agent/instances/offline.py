"""``sth stop-instances``: end every instance a stopped hub left running.

Instances outlive the hub on purpose (agent/instances/supervisor.py). This is the
explicit way to end them all with no hub running, e.g. before removing the hub
from a machine: each runner gets SIGTERM through its holder, SIGKILL after the
grace, and its state says it was stopped, so no restart policy starts it again.
With a hub running, use its API (``_stop`` / ``_kill``) instead.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from ..config import ConfigError, load_config
from ..runtimes.held import HolderGone, adopt
from .instance import STATE_FILE
from .spool import write_json_atomic
from .supervisor import STATE_DIRS


async def stop_all(sequences_root: Path, grace: float) -> list[str]:
    """End every held instance under ``sequences_root``; the ids of those ended."""
    stopped: list[str] = []
    try:
        state_dirs = sorted(p for p in (sequences_root / STATE_DIRS).iterdir() if p.is_dir())
    except FileNotFoundError:
        return stopped

    async def stop_one(state_dir: Path) -> None:
        state_path = state_dir / STATE_FILE
        try:
            saved: dict[str, Any] = json.loads(state_path.read_text())
            saved["desired"] = "stopped"
            write_json_atomic(state_path, saved)
        except (OSError, ValueError):
            pass
        try:
            runner = await adopt(state_dir)
        except (HolderGone, OSError, trio.TooSlowError):
            return
        if runner.returncode is None:
            runner.signal_group(signal.SIGTERM)
            with trio.move_on_after(grace):
                await runner.wait()
            if runner.returncode is None:
                runner.signal_group(signal.SIGKILL)
                with trio.move_on_after(grace):
                    await runner.wait()
            stopped.append(state_dir.name)
        await runner.aclose()

    async with trio.open_nursery() as nursery:
        for state_dir in state_dirs:
            nursery.start_soon(stop_one, state_dir)
    return stopped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sth stop-instances",
        description="End every instance a stopped hub left running (SIGTERM, then SIGKILL after"
        " the grace). With the hub running, use its API instead.",
    )
    parser.add_argument("-c", "--config", type=Path, help="the hub's TOML config file")
    parser.add_argument("-D", "--sequences-root", type=Path, help="the hub's sequences directory")
    parser.add_argument("--data-dir", type=Path, help="the hub's data directory")
    parser.add_argument(
        "--grace", type=float, default=5.0, help="seconds from SIGTERM to SIGKILL (default 5)"
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, {"sequences_root": args.sequences_root, "data_dir": args.data_dir})
    except ConfigError as exc:
        print(f"sth stop-instances: {exc}", file=sys.stderr)
        return 2
    stopped = trio.run(stop_all, config.sequences_root, args.grace)
    print(f"stopped {len(stopped)} instance(s){': ' + ', '.join(stopped) if stopped else ''}")
    return 0
