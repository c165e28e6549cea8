"""End-to-end: the README's first command brings up a local Space (cpm + joined sth), its
banner's commands work as printed, and stopping it (any signal, even SIGKILL) leaves no
daemon, no runner and no port behind.

The launcher is started as a script starts a background job (`make run &`): stdin from
/dev/null and SIGINT ignored, which is how it used to be left running.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers import ROOT
from tests.localspace_helpers import LocalSpace, local_space, port_free


def _assert_all_gone(processes: list[psutil.Process], ports: list[int]) -> None:
    _gone, alive = psutil.wait_procs(processes, timeout=20)
    assert not alive, [p.cmdline() for p in alive if p.is_running()]
    deadline = time.monotonic() + 10
    while not all(port_free(port) for port in ports):
        assert time.monotonic() < deadline, f"ports still taken: {[p for p in ports if not port_free(p)]}"
        time.sleep(0.1)


def _start_instance(space: LocalSpace) -> None:
    """An instance that runs until killed (a runner process under the hub)."""
    env = {**os.environ, "SI_CONFIG_PATH": str(space.state / "si")}
    si = [sys.executable, "-m", "spacehub.cli.main"]
    subprocess.run([*si, "config", "set", "apiUrl", space.hub_api], check=True, env=env, capture_output=True)
    done = subprocess.run(
        [*si, "seq", "deploy", "examples/hello-py"], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    instances = httpx.get(f"{space.hub_api}/instances", timeout=10).json()
    assert [i["status"] for i in instances] == ["running"]


def test_make_run_in_the_background_banner_commands_then_sigterm(tmp_path: Path) -> None:
    """`make run &`, every command the banner prints run literally, then `kill -TERM` of make."""
    with local_space(tmp_path, via_make=True) as space:
        env = {**os.environ, "SI_CONFIG_PATH": str(tmp_path / "si-config")}
        # The one-time join token never shows in `ps` (it went in a private file, now removed).
        for process in space.descendants():
            assert not any("shj_" in part for part in process.cmdline()), process.cmdline()
        assert not (space.state / "hub" / "join.toml").exists()

        def sh(line: str) -> str:
            done = subprocess.run(
                ["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
            return done.stdout

        tried = space.commands("Try it:")
        assert len(tried) == 4, space.banner
        hubs = json.loads(sh(tried[0]))
        assert len(hubs) == 1 and hubs[0]["state"] == "connected"
        assert json.loads(sh(tried[1]))["apiVersion"] == "v1"
        assert "apiUrl set to" in sh(tried[2])
        instance_id = sh(tried[3]).strip()  # `si seq deploy` prints the new instance's id
        info = httpx.get(f"{space.hub_api}/instance/{instance_id}", timeout=10).json()
        assert info["status"] == "running"

        # The console's one-time sign-in link: it opens the fleet page once, then never again.
        link = re.search(r"one-time sign-in link: (\S+)", space.banner)
        assert link is not None, space.banner
        ca = ssl.create_default_context(cafile=str(space.state / "cpm" / "ca.pem"))
        with httpx.Client(verify=ca, follow_redirects=True, timeout=10) as browser:
            page = browser.get(link.group(1))
            assert page.status_code == 200 and str(page.url).endswith("/console/fleet"), page.text
            assert hubs[0]["id"] in page.text and "healthy" in page.text
            assert space.token not in page.text
        again = httpx.get(link.group(1), verify=ca, timeout=10)
        assert again.status_code == 403 and "used already" in again.text

        join_line, hub_list_line = space.commands("Another hub")
        second = subprocess.Popen(
            ["bash", "-c", f"exec {join_line}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                table = sh(hub_list_line)
                rows = [line.split() for line in table.splitlines()[1:]]
                if len(rows) == 2 and all(row[1] == "connected" for row in rows):
                    break
                assert time.monotonic() < deadline, table
                time.sleep(0.5)
            assert table.split()[:5] == ["ID", "STATE", "LAST", "SEEN", "TAGS"]
        finally:
            second.terminate()
            second.wait(timeout=20)

        started = space.descendants()
        assert any("runner" in " ".join(p.cmdline()) for p in started), "the instance has a runner"
        space.process.send_signal(signal.SIGTERM)  # make passes SIGTERM on to the launcher
        space.process.wait(timeout=60)
        _assert_all_gone(started, [space.cpm_port, space.hub_port, space.hub_port + 1])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_launcher_stops_everything_on_sigint_and_sighup(tmp_path: Path, signum: int) -> None:
    with local_space(tmp_path, via_make=False) as space:
        _start_instance(space)
        started = space.descendants()
        space.process.send_signal(signum)
        assert space.process.wait(timeout=60) == 0
        _assert_all_gone(started, [space.cpm_port, space.hub_port])


def test_daemons_do_not_outlive_a_killed_launcher(tmp_path: Path) -> None:
    with local_space(tmp_path, via_make=False) as space:
        _start_instance(space)
        started = space.descendants()
        assert len(started) >= 3  # cpm, sth and the instance's runner
        space.process.kill()
        space.process.wait()
        _assert_all_gone(started, [space.cpm_port, space.hub_port])


def test_launcher_does_not_outlive_a_killed_make(tmp_path: Path) -> None:
    with local_space(tmp_path, via_make=True) as space:
        started = space.descendants()
        space.process.kill()  # make, killed: the launcher is told (--exit-with-parent)
        space.process.wait()
        _assert_all_gone(started, [space.cpm_port, space.hub_port])
