"""Fuzzing from the OpenAPI documents with schemathesis, bounded in examples and time: a hub
directly, the Space API, and a hub through its link. No answer may be a 5xx, every answer's
content type and JSON must be as documented, and both daemons must be alive afterwards.

The streaming routes (live output, logs, events, a topic's data) are left out: a GET of one
never ends, so a fuzzer can only time out on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from harness.daemons import run_sth
from tests.cpm_helpers import run_cpm
from tests.e2e.test_link_e2e import FAST, run_linked_sth, setup_space, ssl_context
from tests.helpers import ROOT

#: Per operation; with the time budget, each run takes well under a minute.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "10"))
SECONDS = int(os.environ.get("FUZZ_SECONDS", "40"))
CHECKS = "not_a_server_error,content_type_conformance,response_schema_conformance"
STREAMS = r"/(output|stdout|stderr|log|events|once)($|/)|^/topic/"
SPACE_STREAMS = r"^/api/v1/space/[^/]+/api/v1/topic/"


def fuzz(schema: str, base_url: str, *args: str, config: Path | None = None) -> str:
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        *(["--config-file", str(config)] if config is not None else []),
        "run",
        schema,
        "--url",
        base_url,
        "--max-examples",
        str(EXAMPLES),
        "--max-time",
        str(SECONDS),
        "--request-timeout",
        "5",
        "--checks",
        CHECKS,
        "--seed",
        "20261204",
        "--no-color",
        *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=SECONDS + 120, cwd=ROOT)
    summary = done.stdout[done.stdout.rfind("SUMMARY") :]
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "generated" in summary, done.stdout[-3000:]
    return summary


def test_fuzz_a_hub(tmp_path: Path) -> None:
    with run_sth(tmp_path / "seq", "-L", "warn") as hub:
        base = f"http://{hub.address}/api/v1"
        summary = fuzz(f"{base}/openapi.json", base, "--exclude-path-regex", STREAMS)
        print(summary)
        assert hub.alive()
        assert httpx.get(f"{base}/version", timeout=10).status_code == 200


def test_fuzz_the_space_api_and_a_hub_through_its_link(tmp_path: Path) -> None:
    data = tmp_path / "cpm"
    token, join = setup_space(data)
    with (
        run_cpm(data, *FAST, "-L", "warn") as manager,
        run_linked_sth(tmp_path, manager, "--join-token", join, "-L", "warn") as hub,
    ):
        auth = f"Authorization: Bearer {token}"
        ca = str(manager.ca_file)
        space_api = manager.space_url("demo")
        with httpx.Client(
            verify=ssl_context(manager), headers={"Authorization": f"Bearer {token}"}
        ) as client:
            deadline = time.monotonic() + 30
            while not (listed := client.get(f"{space_api}/list", timeout=20).json()):
                assert time.monotonic() < deadline, "the hub never joined"
                time.sleep(0.2)  # it is still joining
            hub_id = listed[0]["id"]

        # The Space API: every /api/v1 route of the manager's document, with the space's token,
        # in its space (other spaces' calls are all refused alike).
        config = tmp_path / "schemathesis.toml"
        config.write_text('[parameters]\n"path.space" = "demo"\n')
        summary = fuzz(
            f"{manager.base}/api/v1/openapi.json",
            manager.base,
            "--include-path-regex",
            "^/api/v1/",
            # The Space's topic streams never end by themselves (tested in test_space_topics.py).
            "--exclude-path-regex",
            SPACE_STREAMS,
            "--header",
            auth,
            "--tls-verify",
            ca,
            config=config,
        )
        print(summary)

        # A hub through its link: the hub's own document, sent through the Space's forwarding.
        summary = fuzz(
            f"http://{hub.address}/api/v1/openapi.json",
            f"{space_api}/sth/{hub_id}/api/v1",
            "--exclude-path-regex",
            STREAMS,
            "--header",
            auth,
            "--tls-verify",
            ca,
        )
        print(summary)

        assert manager.process.poll() is None and hub.alive()
        with httpx.Client(
            verify=ssl_context(manager), headers={"Authorization": f"Bearer {token}"}
        ) as client:
            listed = client.get(f"{space_api}/list", timeout=20).json()
            assert [h["id"] for h in listed if h["healthy"]] == [hub_id]
            assert client.get(f"{space_api}/sth/{hub_id}/api/v1/version", timeout=20).status_code == 200
