"""End-to-end: a hub's state as `si hub list` and `cpm hub list` show it, through its life:
connected, unhealthy (stopped with SIGSTOP: link up, heartbeats late), connected again, and
disconnected after a clean stop, which the manager logs as a normal leave (close code 1000)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cpm_helpers import cpm, run_cpm
from tests.e2e.test_link_e2e import run_linked_sth, setup_space
from tests.helpers import ROOT

#: Heartbeats every second, unhealthy after 2 missed; a silent link is closed only after 30 s more.
TIMINGS = ("--heartbeat-interval", "1", "--missed-heartbeats", "2", "--pong-timeout", "30")


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_hub_states_in_si_and_cpm_hub_list(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    token, join = setup_space(tmp_path / "cpm")
    si_env = {**os.environ, "PYTHONPATH": str(ROOT), "SI_CONFIG_PATH": str(tmp_path / "si")}

    def si(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "spacehub.cli.main", *args],
            capture_output=True,
            text=True,
            env=si_env,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def rows(table: str) -> list[list[str]]:
        lines = table.splitlines()
        assert lines[0].split()[:5] == ["ID", "STATE", "LAST", "SEEN", "TAGS"], table
        return [line.split() for line in lines[1:]]

    with run_cpm(tmp_path / "cpm", *TIMINGS) as manager:
        for setting in (
            ("env", "production"),
            ("middlewareApiUrl", f"{manager.base}/api/v1"),
            ("token", token),
            ("caFile", str(manager.ca_file)),
        ):
            si("config", "set", *setting)
        si("space", "use", "demo")
        with run_linked_sth(tmp_path, manager, "--join-token", join, "--tags", "line3,press") as hub:

            def state() -> str:
                return str(json.loads(si("hub", "list", "--format", "json"))[0]["state"])

            _wait_for("connected", lambda: state() == "connected")
            (row,) = rows(si("hub", "list"))
            assert row[1] == "connected" and row[2].endswith("Z") and row[3] == "line3,press"
            (row,) = rows(cpm(tmp_path / "cpm", "hub", "list", "--space", "demo"))
            assert row[1] == "connected"

            hub.process.send_signal(signal.SIGSTOP)  # alive, linked, silent
            try:
                _wait_for("unhealthy", lambda: state() == "unhealthy")
                (row,) = rows(cpm(tmp_path / "cpm", "hub", "list", "--space", "demo"))
                assert row[1] == "unhealthy"
            finally:
                hub.process.send_signal(signal.SIGCONT)
            _wait_for("connected again", lambda: state() == "connected")
        # run_linked_sth stopped the hub with SIGTERM: a clean leave.
        _wait_for("disconnected", lambda: state() == "disconnected")
        (row,) = rows(si("hub", "list"))
        assert row[1] == "disconnected" and row[2] != "never"
        (row,) = rows(cpm(tmp_path / "cpm", "hub", "list", "--space", "demo"))
        assert row[1] == "disconnected"
        logged: list[str] = []

        def manager_logged_a_leave() -> bool:
            logged.append(capfd.readouterr().err)
            return "left: the hub is shutting down" in "".join(logged)

        _wait_for("the manager's log", manager_logged_a_leave)
    # No manager now: the registry's view, every hub disconnected, and a note that says why.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cpm.main",
            "hub",
            "list",
            "--space",
            "demo",
            "--data-dir",
            str(tmp_path / "cpm"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0 and "no manager serves" in done.stderr
    (row,) = rows(done.stdout)
    assert row[1] == "disconnected"
