"""Every code block of README.md, docs/ and examples/ that is meant to run, run as written.

The convention (also in docs/architecture.md, "Docs that run"):
- ```` ```sh ```` and ```` ```python ```` blocks run, in order, from the repository's folder,
  against a local Space that this module starts with the launcher (`make run`'s own code);
- ```` ```sh no-run ```` / ```` ```python no-run ```` mark a block that is not meant to run
  as it stands (a production template with placeholders, a command that installs a package,
  a fragment): say so in the fence, never by leaving the block out;
- ```` ```json ```` and ```` ```toml ```` blocks are parsed (a hub's TOML by `sth`'s own loader);
- a block with no language is text (usage lines, trees, drawings) and is not run.

What a block prints is checked where the docs promise it (``EXPECTED``). The blocks see
`make run`'s defaults rewritten to this run's: ports 8000/9000 become free ones, `.local-space`
the launcher's state directory, and `/tmp/` a temporary folder. ``si`` is on ``PATH`` as after
`source .venv/bin/activate`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import DATA_DIR_RULE, load_config
from tests.helpers import ROOT
from tests.localspace_helpers import LocalSpace, local_space

DOCS: tuple[Path, ...] = (
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "examples").glob("**/*.md")),
    ROOT / "packaging" / "README.md",
    ROOT / "bench" / "README.md",
)
RUN_LANGUAGES = frozenset({"sh", "python"})
PARSED_LANGUAGES = frozenset({"json", "toml"})
FENCE = re.compile(r"^```(\S*)(.*)$")

#: What a block must print: (file, a line of the block) -> texts its output holds.
EXPECTED: dict[tuple[str, str], tuple[str, ...]] = {
    ("README.md", "API=http://127.0.0.1:8000/api/v1"): (
        "Hi, Alice!",
        "Hi, Bob!",
        '{"got": 42}',
        '"status": "completed"',
    ),
    ("docs/client.md", "from spacehub import HubClient"): (
        "{'lines': 0, 'got': 42}",
        "Hi, Alice! (#1)",
        "Hi, Bob! (#2)",
    ),
    ("docs/client.md", "from spacehub import AsyncHubClient"): ("hello-py started with greeting 'Hi'",),
    ("docs/client.md", "si config set apiUrl http://127.0.0.1:8000/api/v1"): ("Hi, Alice! (#1)",),
    ("docs/client.md", "si config profile create space && si config use space"): ("Using hub sth-",),
    ("examples/README.md", "si config set apiUrl http://127.0.0.1:8000/api/v1"): (
        "Hi, Alice! (#1)",
        "Hi, Bob! (#2)",
        '"lines": 2',
        "stopping after 2 lines",
    ),
    ("examples/README.md", "si config set env production"): ("Using hub sth-", "connected"),
    ("docs/console.md", "console-login"): ("/console/login/once/", "expiresIn"),
}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    language: str
    no_run: bool
    text: str

    @property
    def name(self) -> str:
        return str(self.path.relative_to(ROOT))

    def __str__(self) -> str:
        return f"{self.name}:{self.line}"

    def has_line(self, line: str) -> bool:
        return any(own.split("#")[0].strip() == line for own in self.text.splitlines())


def _blocks() -> Iterator[Block]:
    for path in DOCS:
        lines = path.read_text().splitlines()
        index = 0
        while index < len(lines):
            fence = FENCE.match(lines[index])
            if fence is None:
                index += 1
                continue
            end = index + 1
            while not lines[end].startswith("```"):
                end += 1
            flags = fence.group(2).split()
            yield Block(
                path, index + 1, fence.group(1), "no-run" in flags, "\n".join(lines[index + 1 : end]) + "\n"
            )
            index = end + 1


BLOCKS = list(_blocks())
RUN = [b for b in BLOCKS if b.language in RUN_LANGUAGES and not b.no_run]
PARSED = [b for b in BLOCKS if b.language in PARSED_LANGUAGES]


def test_the_convention_is_kept() -> None:
    """Each block is runnable, parsed, marked no-run, or plain text; the expectations all match a block."""
    for block in BLOCKS:
        known = block.language in RUN_LANGUAGES | PARSED_LANGUAGES or block.language == ""
        assert known, f"{block}: a ```{block.language} block: use sh, python, json, toml, or no language"
        if block.no_run:
            assert block.language in RUN_LANGUAGES, f"{block}: no-run is for sh and python blocks"
    assert len(RUN) >= 6, [str(b) for b in RUN]
    for name, line in EXPECTED:
        assert any(b.name == name and line in b.text for b in RUN), (
            f"no runnable block of {name} has {line!r}"
        )


@pytest.mark.parametrize("block", PARSED, ids=str)
def test_parsed_blocks(block: Block, tmp_path: Path) -> None:
    if block.language == "json":
        json.loads(block.text)
        return
    value = tomllib.loads(block.text)
    if "hub" in value:  # a hub's configuration: the hub must start with it
        path = tmp_path / "sth.toml"
        path.write_text(block.text)
        load_config(path, {})


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSpace]:
    with local_space(tmp_path_factory.mktemp("docs"), via_make=False) as started:
        yield started


@pytest.mark.parametrize("block", RUN, ids=str)
def test_runnable_blocks(block: Block, space: LocalSpace, tmp_path: Path) -> None:
    text = (
        block.text.replace("/tmp/", f"{tmp_path}/")
        .replace("127.0.0.1:8000", f"127.0.0.1:{space.hub_port}")
        .replace("127.0.0.1:9000", f"127.0.0.1:{space.cpm_port}")
        .replace(".local-space", str(space.state))
    )
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "SI_CONFIG_PATH": str(tmp_path / "si"),
    }
    command = (
        ["bash", "-e", "-o", "pipefail", "-c", text]
        if block.language == "sh"
        else [sys.executable, "-c", text]
    )
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{block} failed:\n{done.stdout}\n{done.stderr}"
    for (name, line), texts in EXPECTED.items():
        if block.name == name and block.has_line(line):
            for expected in texts:
                assert expected in done.stdout, f"{block}: {expected!r} not printed:\n{done.stdout}"


def test_the_readme_states_the_data_dir_rule_the_hub_follows() -> None:
    assert DATA_DIR_RULE in (ROOT / "README.md").read_text()
    done = subprocess.run([sys.executable, "-m", "agent.main", "--help"], capture_output=True, text=True)
    assert " ".join(DATA_DIR_RULE.split()) in " ".join(done.stdout.split())
