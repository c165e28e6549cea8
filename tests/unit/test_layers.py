"""The import rule (docs/architecture.md, "Layers"), checked by walking every import with ast.

    spacehub.protocol  (sans-I/O: no trio, no server, no client, no daemon)
          ^
    spacehub.server    (what both daemons share)        spacehub.client, spacehub.cli
          ^                                             (no server code, no daemon)
    agent/    cpm/     (never each other)

Plus: the Python runner (inside every instance) imports only the standard library and
spacehub.protocol; bench/ and harness/ import nothing from tests/. Every import counts,
including those inside functions and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

DAEMONS = ("agent", "cpm")
TEST_ONLY = ("tests",)


@dataclass(frozen=True)
class Rule:
    """Modules under ``package`` may not import any module under ``forbidden``, except under ``allowed``."""

    package: str
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()


RULES = (
    Rule(
        "spacehub.protocol",
        (
            "trio",
            "hypercorn",
            "httpx",
            "websockets",
            "spacehub.server",
            "spacehub.client",
            "spacehub.cli",
            *DAEMONS,
            *TEST_ONLY,
        ),
    ),
    Rule("spacehub.server", ("spacehub.client", "spacehub.cli", "harness", *DAEMONS, *TEST_ONLY)),
    Rule(
        "spacehub.client", ("spacehub.server", "spacehub.cli", "hypercorn", "harness", *DAEMONS, *TEST_ONLY)
    ),
    Rule("spacehub.cli", ("spacehub.server", "hypercorn", "harness", *DAEMONS, *TEST_ONLY)),
    Rule("agent", ("cpm", "harness", *TEST_ONLY)),
    Rule("cpm", ("agent", "harness", *TEST_ONLY)),
    Rule(
        "agent.runners.python",
        ("agent", "cpm", "trio", "spacehub.server", "spacehub.client", "spacehub.cli", *TEST_ONLY),
        allowed=("agent.runners.python",),
    ),
    Rule("bench", TEST_ONLY),
    Rule("harness", TEST_ONLY),
)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            yield node.lineno, module
            # `from spacehub import server` imports spacehub.server
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(root: Path, rules: tuple[Rule, ...] = RULES) -> list[str]:
    found: list[str] = []
    for rule in rules:
        folder = root.joinpath(*rule.package.split("."))
        files = sorted(folder.rglob("*.py")) if folder.is_dir() else []
        for path in files:
            for line, module in imports(path, root):
                if any(_under(module, a) for a in rule.allowed):
                    continue
                if any(_under(module, f) for f in rule.forbidden):
                    found.append(f"{path.relative_to(root)}:{line}: {rule.package} imports {module}")
    return sorted(set(found))


def test_every_layer_keeps_to_its_imports() -> None:
    assert violations(ROOT) == []


def test_the_rules_cover_the_packages() -> None:
    for rule in RULES:
        assert ROOT.joinpath(*rule.package.split(".")).is_dir(), rule.package


@pytest.mark.parametrize(
    ("where", "source", "expected"),
    [
        ("cpm/api/x.py", "from agent.api import app\n", "cpm imports agent.api"),
        ("agent/x.py", "def f():\n    import cpm.registry\n", "agent imports cpm.registry"),
        ("spacehub/client/x.py", "from ..server import http\n", "spacehub.client imports spacehub.server"),
        ("spacehub/protocol/x.py", "import trio\n", "spacehub.protocol imports trio"),
        ("spacehub/server/x.py", "from spacehub import client\n", "spacehub.server imports spacehub.client"),
        ("bench/x.py", "from tests.helpers import run_sth\n", "bench imports tests.helpers"),
        ("agent/runners/python/x.py", "from agent.errors import HubError\n", "imports agent.errors"),
    ],
)
def test_a_planted_violation_is_caught(tmp_path: Path, where: str, source: str, expected: str) -> None:
    planted = tmp_path / where
    planted.parent.mkdir(parents=True)
    planted.write_text(source)
    found = violations(tmp_path)
    assert found and expected in found[0], found


def test_allowed_imports_pass(tmp_path: Path) -> None:
    planted = tmp_path / "agent" / "runners" / "python" / "x.py"
    planted.parent.mkdir(parents=True)
    planted.write_text("from .base import thing\nfrom spacehub.protocol import runner\nimport os\n")
    assert violations(tmp_path) == []
