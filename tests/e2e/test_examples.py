"""The walk-through of examples/README.md, run as written against a real hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT, run_sth


def test_hello_py_walk_through(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SI_CONFIG_PATH": str(tmp_path / "si")}

    def si(*args: str, stdin: bytes | None = None) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "spacehub.cli.main", *args],
            input=stdin,
            capture_output=True,
            env=env,
            cwd=ROOT,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode()

    with run_sth(tmp_path / "sequences") as hub:
        si("config", "set", "apiUrl", hub.url)
        si("seq", "deploy", "examples/hello-py", "--args", '["Hi"]')
        si("inst", "input", "-", "-t", "text/plain", stdin=b"Alice\nBob\n")
        lines = []
        with subprocess.Popen(
            [sys.executable, "-m", "spacehub.cli.main", "inst", "output", "-"],
            stdout=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        ) as output:
            assert output.stdout is not None
            for _ in range(2):
                lines.append(output.stdout.readline().decode())
            output.kill()
        assert lines == ["Hi, Alice! (#1)\n", "Hi, Bob! (#2)\n"]
        si("inst", "event", "emit", "-", "ping", "1")
        si("inst", "stop", "-", "3000")
        info = json.loads(si("inst", "info", "-", "--format", "json"))
        assert info["status"] == "completed" and info["terminated"]["reason"] == "Instance stopped"
        assert "stopping after 2 lines" in si("inst", "log", "-")
