"""End-to-end: the `si` CLI as a user runs it, against a real `sth`.

Rules: every command is a subprocess (``python -m spacehub.cli.main``) with ``SI_CONFIG_PATH`` in a
temporary directory and a timeout; streams that never end (topic get, hub logs, event streams) are
read with a bound and then killed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, HubProcess

TIMEOUT = 20.0

ECHO = """
async def run(context, input, *args):
    context.on("ping", lambda message: context.emit("pong", {"got": message}))
    async for chunk in input:
        yield chunk
"""

ARGS = """
import json
def run(context, input, *args):
    print("on stdout", flush=True)
    return json.dumps({"args": list(args), "config": context.config}) + "\\n"
"""

STDIO = """
import sys
async def run(context, input, *args):
    data = await sys.stdin.read()
    print(f"stdin: {data.strip()}", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
"""


@pytest.fixture(scope="module")
def runtime() -> str:
    """The client does not depend on how the hub runs instances: the process runtime is enough."""
    return "process"


class Si:
    def __init__(self, config: Path) -> None:
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "SI_CONFIG_PATH": str(config)}

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "spacehub.cli.main", *args]

    def run(
        self, *args: str, input: bytes | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.command(*args),
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            env=self.env,
            cwd=ROOT,
            timeout=TIMEOUT,
            stdin=None if input is not None else subprocess.DEVNULL,
            check=False,
        )
        if check:
            assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--format", "json").stdout)

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.command(*args), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=self.env, cwd=ROOT
        )


def _read_line(process: subprocess.Popen[bytes]) -> bytes:
    """One line of a never-ending command's output, then stop it."""
    assert process.stdout is not None
    try:
        line = process.stdout.readline()
    finally:
        process.kill()
        process.wait(timeout=TIMEOUT)
        process.stdout.close()
    return line


@pytest.fixture
def si(hub: HubProcess, tmp_path: Path) -> Iterator[Si]:
    runner = Si(tmp_path / "si-config")
    runner.run("config", "set", "apiUrl", hub.url)
    yield runner
    assert hub.alive()


def _seq_dir(root: Path, source: str, name: str = "cli-seq") -> Path:
    root.mkdir(parents=True)
    meta = {"name": name, "version": "1.0.0", "main": "main.py", "engines": {"python3": "3"}}
    (root / "package.json").write_text(json.dumps(meta))
    (root / "main.py").write_text(source)
    (root / "secret.env").write_text("x")
    (root / ".siignore").write_text("*.env\n")
    return root


def _wait_status(si: Si, instance_id: str, *statuses: str) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while True:
        info: dict[str, Any] = si.json("inst", "info", instance_id)
        if info["status"] in statuses:
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.1)


# ------------------------------------------------------------------------------ config
def test_config_profiles(si: Si, hub: HubProcess, tmp_path: Path) -> None:
    printed = si.json("config", "print")
    assert printed["apiUrl"] == hub.url and printed["profile"] == "default"
    assert json.loads((tmp_path / "si-config" / "profiles" / "default.json").read_text())["apiUrl"] == hub.url
    si.run("config", "profile", "create", "other")
    si.run("config", "use", "other")
    assert si.json("config", "print")["apiUrl"] == "http://127.0.0.1:8000/api/v1"
    assert "other" in si.run("config", "profile", "list").stdout
    si.run("config", "profile", "use", "default")
    si.run("config", "profile", "remove", "other")
    bad = si.run("config", "set", "env", "staging", check=False)
    assert bad.returncode == 1 and "env" in bad.stderr


# ------------------------------------------------------------------------------ hub
def test_hub_version_load_logs(si: Si) -> None:
    assert si.json("hub", "version")["apiVersion"] == "v1"
    assert "fsSize" in si.json("hub", "load")
    assert "apiVersion: v1" in si.run("hub", "version").stdout.splitlines()  # pretty: key: value lines
    line = _read_line(si.popen("hub", "logs", "--format", "json"))
    assert "msg" in json.loads(line)


# ------------------------------------------------------------------------------ sequences
def test_seq_pack_send_list_info_use_start_delete(si: Si, tmp_path: Path) -> None:
    directory = _seq_dir(tmp_path / "seq", ARGS)
    archive = tmp_path / "seq.tar.gz"
    assert si.run("seq", "pack", str(directory), "-o", str(archive)).stdout.strip() == str(archive)
    sequence_id = si.json("seq", "send", "-")["id"]  # "-": the package just packed

    listed = si.json("seq", "list")
    assert sequence_id in [s["id"] for s in listed]
    assert sequence_id in si.run("seq", "ls", "-n", "cli-seq").stdout
    assert sequence_id not in si.run("seq", "ls", "-n", "other").stdout
    assert si.json("seq", "info", "-")["config"]["name"] == "cli-seq"

    other = si.json("seq", "send", str(directory))["id"]
    si.run("seq", "use", sequence_id)
    started = si.json("seq", "start", "-", "--args", '["a", 2]', "-s", '{"greeting": "Hi"}')
    assert started["sequenceId"] == sequence_id
    assert si.run("inst", "output", "-").stdout == '{"args": ["a", 2], "config": {"greeting": "Hi"}}\n'
    assert si.run("inst", "stdout", started["id"]).stdout == "on stdout\n"
    _wait_status(si, "-", "completed")
    for sequence in (sequence_id, other):
        si.run("seq", "delete", sequence, "--force")
    assert sequence_id not in si.run("seq", "list").stdout


def test_seq_deploy_directory_with_args(si: Si, tmp_path: Path) -> None:
    started = si.json("seq", "deploy", str(_seq_dir(tmp_path / "seq", ARGS)), "--args", '["x"]')
    output = si.run("inst", "output", started["id"]).stdout
    assert json.loads(output) == {"args": ["x"], "config": {}}
    assert si.json("seq", "info", started["sequenceId"])["config"]["name"] == "cli-seq"
    si.run("seq", "rm", started["sequenceId"], "-f")


def test_seq_prune(si: Si, tmp_path: Path) -> None:
    directory = _seq_dir(tmp_path / "seq", ECHO)
    first = si.json("seq", "send", str(directory))["id"]
    si.json("seq", "send", str(directory))
    si.json("seq", "start", first)
    refused = si.run("seq", "prune", check=False)  # an instance runs: that one is refused
    assert refused.returncode == 1 and first in refused.stderr
    assert si.json("seq", "prune", "--force")["deleted"] == [first]
    assert si.json("seq", "list") == []


# ------------------------------------------------------------------------------ instances
def test_inst_list_info_health_input_events_stop(si: Si, tmp_path: Path) -> None:
    started = si.json("seq", "deploy", str(_seq_dir(tmp_path / "seq", ECHO)))
    instance = started["id"]
    assert instance in si.run("inst", "ls").stdout
    assert instance in [i["id"] for i in si.json("inst", "list")]
    assert si.json("inst", "info", "-")["status"] == "running"
    assert si.json("inst", "health", "-")["healthy"] is True

    data = tmp_path / "data.txt"
    data.write_text("from file\n")
    si.run("inst", "input", "-", str(data))  # without --end: the input stays open
    si.run("inst", "input", "-", input=b"from stdin\n")

    on = si.popen("inst", "event", "on", "-", "pong", "--next", "--format", "json")
    deadline = time.monotonic() + TIMEOUT
    while on.poll() is None and time.monotonic() < deadline:
        si.run("inst", "event", "emit", "-", "ping", '{"n": 1}')
        time.sleep(0.2)
    assert json.loads(_read_line(on)) == {"got": {"n": 1}}
    assert si.json("inst", "event", "on", "-", "pong") == {"got": {"n": 1}}  # the last one
    stream = si.popen("inst", "event", "on", "-", "pong", "--stream")
    time.sleep(0.5)
    si.run("inst", "event", "invoke", "-", "ping", "text")
    assert json.loads(_read_line(stream)) == {"got": "text"}

    last = tmp_path / "last.txt"
    last.write_text("the end\n")
    si.run("inst", "input", "-", str(last), "--end")
    assert si.run("inst", "output", "-").stdout == "from file\nfrom stdin\nthe end\n"
    assert "msg" in json.loads(si.run("inst", "log", "-", "--format", "json").stdout.splitlines()[0])
    assert si.run("inst", "log", "-").stdout  # pretty text lines
    stopped = si.run("inst", "stop", "-", "500", check=False)  # it ended already: 400 or done
    assert stopped.returncode in (0, 1)
    _wait_status(si, instance, "completed", "errored")


def test_inst_stdin_stderr_kill_restart(si: Si, tmp_path: Path) -> None:
    started = si.json("seq", "deploy", str(_seq_dir(tmp_path / "stdio", STDIO)))
    si.run("inst", "stdin", "-", input=b"typed\n")
    assert si.run("inst", "stdout", "-").stdout == "stdin: typed\n"
    assert "to stderr" in si.run("inst", "stderr", "-").stdout

    forever = si.json("seq", "deploy", str(_seq_dir(tmp_path / "echo", ECHO)))
    si.json("seq", "start", forever["sequenceId"], "-s", '{"k": 1}', "--args", '["a"]')
    restarted = si.json("inst", "restart", "-")
    assert restarted["sequenceId"] == forever["sequenceId"]
    info = si.json("inst", "info", "-")  # same id once the old one is gone, as the original does
    assert info["id"] == restarted["id"] and info["status"] == "running"
    assert info["appConfig"] == {"k": 1} and info["args"] == ["a"]
    assert si.json("inst", "kill", "-")["status"] in ("killing", "completed")
    _wait_status(si, restarted["id"], "completed", "errored")
    for sequence in (started["sequenceId"], forever["sequenceId"]):
        si.run("seq", "delete", sequence, "-f")


def test_inst_attach(si: Si, tmp_path: Path) -> None:
    si.json("seq", "deploy", str(_seq_dir(tmp_path / "stdio", STDIO)))
    attached = si.run("inst", "attach", "-", input=b"attached\n")
    assert attached.stdout == "stdin: attached\n"
    assert "to stderr" in attached.stderr


# ------------------------------------------------------------------------------ topics
def test_topics(si: Si, tmp_path: Path) -> None:
    si.run("topic", "create", "cli-topic", "-t", "text/plain")
    assert "cli-topic" in si.run("topic", "ls").stdout
    assert "cli-topic" in json.dumps(si.json("topic", "list"))
    reader = si.popen("topic", "get", "cli-topic", "-t", "text/plain")
    time.sleep(0.5)
    data = tmp_path / "topic.txt"
    data.write_text("hello topic\n")
    si.run("topic", "send", "cli-topic", str(data), "-t", "text/plain")
    assert _read_line(reader) == b"hello topic\n"
    si.run("topic", "delete", "cli-topic")
    assert "cli-topic" not in si.run("topic", "list").stdout


# ------------------------------------------------------------------------------ errors
def test_unknown_ids_exit_1_with_the_servers_message(si: Si) -> None:
    for args in (("inst", "info", "nope"), ("seq", "info", "nope"), ("inst", "kill", "nope")):
        done = si.run(*args, check=False)
        assert done.returncode == 1 and done.stdout == ""
        assert "not found" in done.stderr.lower() and "404" in done.stderr
    assert "Instance nope not found" in si.run("inst", "info", "nope", check=False).stderr
    missing = si.run("seq", "pack", "/nonexistent-dir", check=False)
    assert missing.returncode == 1 and "package.json" in missing.stderr
    usage = si.run("seq", check=False)
    assert usage.returncode == 1
    assert "usage" in si.run("inst", "event", "on", "-h").stdout


def test_dash_without_history(tmp_path: Path, hub: HubProcess) -> None:
    fresh = Si(tmp_path / "fresh")
    fresh.run("config", "set", "apiUrl", hub.url)
    done = fresh.run("inst", "info", "-", check=False)
    assert done.returncode == 1 and "no last instance" in done.stderr


def test_config_paths_are_kept_absolute_and_errors_name_the_file(tmp_path: Path) -> None:
    """`si config set caFile <relative>` works from any folder later; a missing CA is named."""
    si = Si(tmp_path / "si-config")
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "ca.pem").write_text("not really a certificate\n")
    done = subprocess.run(
        si.command("config", "set", "caFile", "ca.pem"),
        capture_output=True,
        text=True,
        env=si.env,
        cwd=folder,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"caFile set to {folder / 'ca.pem'} (profile default, ")
    assert si.json("config", "print")["caFile"] == str(folder / "ca.pem")
    missing = si.run("config", "set", "caFile", "nowhere.pem", check=False)
    assert missing.returncode == 1
    assert f"caFile {ROOT / 'nowhere.pem'}: no such file (the CA certificate" in missing.stderr
    (folder / "ca.pem").unlink()  # later gone: the command that needs it says which file, and what for
    si.run("config", "set", "env", "production")
    si.run("config", "set", "middlewareApiUrl", "https://127.0.0.1:9/api/v1")
    gone = si.run("space", "list", check=False)
    assert gone.returncode == 1 and "None" not in gone.stderr
    assert (
        f"caFile {folder / 'ca.pem'}: no such file (the CA certificate to trust for the manager"
        in gone.stderr
    )
