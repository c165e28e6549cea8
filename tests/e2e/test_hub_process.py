"""End-to-end: the `sth` process itself — options, config file, restarts, working directories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from tests.helpers import ROOT, python_package, run_sth

WORKDIR = """
import os
def run(context, input, *args):
    with open("scratch.txt", "w") as f:
        f.write("mine")
    return os.getcwd() + "\\n"
"""


def test_help_lists_the_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent.main", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert result.returncode == 0
    for option in (
        "--port",
        "--hostname",
        "--sequences-root",
        "--config",
        "--log-level",
        "--identify-existing",
        "--runtime",
        "--instance-lifetime",
    ):
        assert option in result.stdout, option


def test_bad_config_is_refused_with_a_message(tmp_path: Path) -> None:
    config = tmp_path / "sth.toml"
    config.write_text("[hub]\nport = 'eighty'\n")
    result = subprocess.run(
        [sys.executable, "-m", "agent.main", "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert result.returncode == 2 and "port" in result.stderr


def test_config_file_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "sth.toml"
    config.write_text('[hub]\nlog_level = "debug"\ninstance_lifetime = 7\n')
    with run_sth(tmp_path / "seq", "-c", str(config), "--instance-lifetime", "9") as hub:
        shown = httpx.get(f"{hub.url}/config", timeout=10).json()
    assert shown["logLevel"] == "debug"  # from the file
    assert shown["timings"]["instanceLifetime"] == 9  # the flag wins


def test_sequences_survive_a_restart_and_hand_placed_ones_are_adopted(tmp_path: Path) -> None:
    root = tmp_path / "seq"
    with run_sth(root) as hub:
        response = httpx.post(f"{hub.url}/sequence", content=python_package(WORKDIR), timeout=10)
        sequence_id = response.json()["id"]
    by_hand = root / "by-hand"
    by_hand.mkdir()
    (by_hand / "package.json").write_text(json.dumps({"main": "main.py", "engines": {"python3": "3"}}))
    (by_hand / "main.py").write_text("def run(context, input):\n    return 'hand'\n")
    with run_sth(root) as hub:
        ids = [s["id"] for s in httpx.get(f"{hub.url}/sequences", timeout=10).json()]
        assert sequence_id in ids and "by-hand" not in ids
    with run_sth(root, "-E") as hub:
        ids = [s["id"] for s in httpx.get(f"{hub.url}/sequences", timeout=10).json()]
        assert sequence_id in ids and "by-hand" in ids


async def test_each_instance_has_its_own_working_directory(tmp_path: Path) -> None:
    with run_sth(tmp_path / "seq", "--instance-lifetime", "1") as hub:
        async with httpx.AsyncClient(base_url=hub.url, timeout=20) as client:
            sequence_id = (await client.post("/sequence", content=python_package(WORKDIR))).json()["id"]
            directories = []
            for _ in range(2):
                instance_id = (await client.post(f"/sequence/{sequence_id}/start", json={})).json()["id"]
                with trio.fail_after(15):
                    output = (await client.get(f"/instance/{instance_id}/output")).content
                directories.append(output.decode().strip())
            assert directories[0] != directories[1]
            package_dir = (await client.get(f"/sequence/{sequence_id}")).json()["config"]["sequenceDir"]
            assert not any(d.startswith(package_dir) for d in directories)
            assert not (Path(package_dir) / "scratch.txt").exists()
            with trio.fail_after(15):
                while any(Path(d).exists() for d in directories):  # removed with the instance
                    await trio.sleep(0.1)


async def _task_count(url: str) -> int:
    # A fresh connection, closed at once: the count includes this probe's own tasks.
    async with httpx.AsyncClient(base_url=url, timeout=10) as probe:
        count: int = (await probe.get("/status")).json()["tasks"]
        return count


#: hypercorn keeps a closed keep-alive connection's tasks for up to its 5 s keep_alive_timeout.
QUIET = 6.0


def test_status_counts_tasks_and_they_come_back_down(tmp_path: Path) -> None:
    async def main(url: str) -> None:
        with trio.fail_after(60):
            await trio.sleep(QUIET)
            before = await _task_count(url)
            assert before > 0
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                with trio.move_on_after(0.3):  # a reader that leaves mid-stream
                    headers = {"content-type": "application/octet-stream"}
                    async with client.stream("GET", "/topic/task-count", headers=headers) as response:
                        async for _ in response.aiter_raw():
                            pass
                async with trio.open_nursery() as nursery:
                    for _ in range(16):
                        nursery.start_soon(client.get, "/version")
                assert await _task_count(url) > before  # their connections are still open
            while (now := await _task_count(url)) > before:
                await trio.sleep(QUIET)
            assert now <= before

    with run_sth(tmp_path) as hub:
        trio.run(main, hub.url)
