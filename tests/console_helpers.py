"""The console as a user reaches it over HTTPS: a real `cpm` with real hubs joined, and a
cookie-keeping client that signs in through the form like a browser does."""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from harness.daemons import HubProcess
from tests.cpm_helpers import ManagerProcess, cpm, run_cpm
from tests.e2e.test_link_e2e import FAST, run_linked_sth, ssl_context

WAIT = 30.0

ECHO_PY = """
async def run(context, input, prefix="", *args):
    async for line in input:
        yield f"{prefix}{line}"
"""


@dataclass
class ConsoleSpace:
    manager: ManagerProcess
    token: str
    hubs: list[HubProcess]
    hub_ids: list[str] = field(default_factory=list)
    data: Path = Path()

    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.manager.space_url("demo"),
            headers={"Authorization": f"Bearer {self.token}"},
            verify=ssl_context(self.manager),
            timeout=20,
        )

    def browser(self) -> httpx.Client:
        """A client that keeps cookies, as a browser does, not signed in yet."""
        return httpx.Client(base_url=self.manager.base, verify=ssl_context(self.manager), timeout=20)


def package_bytes(code: str = ECHO_PY, name: str = "echo-py") -> bytes:
    files = {
        "package.json": json.dumps({"name": name, "version": "1.0.0", "main": "main.py"}).encode(),
        "main.py": code.encode(),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def wait_hubs(space: ConsoleSpace, count: int) -> list[str]:
    deadline = time.monotonic() + WAIT
    with space.api() as api:
        while True:
            hubs = api.get("/list").json()
            healthy = [h["id"] for h in hubs if h.get("healthy")]
            if len(healthy) >= count:
                return sorted(healthy)
            assert time.monotonic() < deadline, hubs
            time.sleep(0.2)


@contextmanager
def console_space(tmp_path: Path, hubs: int = 1, *manager_args: str) -> Iterator[ConsoleSpace]:
    data = tmp_path / "cpm"
    cpm(data, "space", "create", "demo")
    token = cpm(data, "token", "create", "--space", "demo")
    with ExitStack() as stack:
        manager = stack.enter_context(run_cpm(data, *FAST, *manager_args))
        started = []
        for index in range(hubs):
            join = cpm(data, "join-token", "create", "--space", "demo")
            tags = ["edge", f"line{index + 1}"]
            started.append(
                stack.enter_context(
                    run_linked_sth(
                        tmp_path, manager, "--join-token", join, "--tags", ",".join(tags), name=f"hub{index}"
                    )
                )
            )
        space = ConsoleSpace(manager, token, started, data=data)
        space.hub_ids = wait_hubs(space, hubs)
        yield space


def form_csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, html[:2000]
    return found.group(1)


def page_csrf(html: str) -> str:
    found = re.search(r'<meta name="csrf-token" content="([^"]+)"', html)
    assert found is not None, html[:2000]
    return found.group(1)


def sign_in(client: httpx.Client, token: str) -> httpx.Response:
    form = client.get("/console/login")
    assert form.status_code == 200
    return client.post(
        "/console/login",
        data={"csrf": form_csrf(form.text), "token": token, "next": "/console/fleet"},
        follow_redirects=True,
    )


def read_events(response: httpx.Response, until: Any, seconds: float = WAIT) -> list[tuple[str, str]]:
    """``(event, data)`` pairs from an event stream until ``until(pairs)`` holds."""
    pairs: list[tuple[str, str]] = []
    event, data = "message", []
    deadline = time.monotonic() + seconds
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and data:
            pairs.append((event, "\n".join(data)))
            event, data = "message", []
            if until(pairs):
                return pairs
        assert time.monotonic() < deadline, pairs
    return pairs
