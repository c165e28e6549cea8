"""What the Python runner keeps from loading (agent/runners/python/lazy_imports.py, ``_STAND_INS``).

Every instance loads asyncio, and an idle instance's RSS is mostly what asyncio imports.
The runner keeps ssl and a few modules asyncio uses only on rare paths from loading with it.

Rules for these tests:
- the runner runs as a real subprocess, driven as in test_python_runner.py (its Instance);
- a sequence reports what it sees of the runner's modules as its output;
- the stand-ins themselves are tested in-process, on a lazy_imports module loaded here.
"""

from __future__ import annotations

import asyncio
import colorsys
import importlib.util
import inspect
import json
import subprocess
import sys
import types
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from spacehub.protocol.runner import Code
from tests.unit.test_python_runner import PYTHON, RUNNER, Instance

#: The modules the runner keeps from loading until they are used (ssl: see lazy_imports.py).
DEFERRED = ["ssl", "inspect", "ast", "dis", "subprocess", "tokenize", "textwrap", "array"]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Instance]]:
    instances: list[Instance] = []

    def start(source: str, **kwargs: Any) -> Instance:
        instance = Instance(tmp_path / str(len(instances)), source, **kwargs)
        instances.append(instance)
        return instance

    yield start
    for instance in instances:
        instance.close()


def _output(instance: Instance) -> Any:
    """The JSON the sequence wrote, once the runner completed."""
    output = instance.output.wait_eof()
    instance.wait_message(Code.SEQUENCE_COMPLETED)
    assert instance.wait_exit() == 0, instance.stderr.data
    return json.loads(output)


def _loaded_at_startup() -> set[str]:
    """Of DEFERRED, what the runner's interpreter loads by itself (site, .pth files)."""
    script = f"import sys; print(' '.join(m for m in {DEFERRED!r} if m in sys.modules))"
    result = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, check=True, timeout=30)
    return set(result.stdout.split())


# --------------------------------------------------------------------------- in the runner


def test_an_idle_sequence_loads_none_of_them(spawn: Callable[..., Instance]) -> None:
    instance = spawn(
        f"""
        import asyncio, json, sys
        async def run(context, input):
            await asyncio.sleep(0)
            loaded = [name for name in {DEFERRED!r} if name in sys.modules]
            return json.dumps({{"loaded": loaded, "version": sys.version_info[:2]}})
        """
    )
    instance.pong()
    seen = _output(instance)
    expected = _loaded_at_startup()
    if tuple(seen["version"]) >= (3, 12):
        # dataclasses (spacehub.protocol.runner.Message) calls inspect.get_annotations
        expected |= {"inspect", "ast", "dis"}
    assert set(seen["loaded"]) - expected == set()


def test_the_off_switch_loads_them_the_ordinary_way(spawn: Callable[..., Instance]) -> None:
    """SPACEHUB_RUNNER_LAZY_IMPORTS=0: no stand-ins, ssl not hidden; asyncio loads them itself."""
    instance = spawn(
        f"""
        import asyncio, json, sys
        async def run(context, input):
            await asyncio.sleep(0)
            loaded = [name for name in {DEFERRED!r} if name in sys.modules]
            kinds = sorted({{type(sys.modules[name]).__name__ for name in loaded}})
            return json.dumps({{"loaded": loaded, "kinds": kinds}})
        """,
        env={"SPACEHUB_RUNNER_LAZY_IMPORTS": "0"},
    )
    instance.pong()
    seen = _output(instance)
    assert {"ssl", "inspect", "subprocess"} <= set(seen["loaded"])
    assert seen["kinds"] == ["module"]


def test_each_works_when_used_and_replaces_its_stand_in(spawn: Callable[..., Instance]) -> None:
    instance = spawn(
        """
        import asyncio, dataclasses, json, linecache, socket, sys, traceback
        import asyncio.base_events, asyncio.coroutines, asyncio.events, asyncio.format_helpers
        import asyncio.subprocess, asyncio.tasks, asyncio.unix_events

        class Awaitable:
            def __await__(self):
                return (yield from asyncio.sleep(0, "awaited").__await__())

        def fail():
            raise ValueError("from a line of main.py")

        async def run(context, input):
            seen = {}
            # subprocess, through asyncio (its constants came from the stand-in)
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", "print('child')", stdout=asyncio.subprocess.PIPE
            )
            seen["child"] = (await child.communicate())[0].decode().strip()
            import subprocess
            seen["constants"] = [asyncio.subprocess.PIPE == subprocess.PIPE,
                                 asyncio.subprocess.STDOUT == subprocess.STDOUT,
                                 asyncio.subprocess.DEVNULL == subprocess.DEVNULL]
            seen["subprocess"] = [module.subprocess is subprocess for module in (
                asyncio.base_events, asyncio.events, asyncio.subprocess, asyncio.unix_events)]
            # inspect, through asyncio and dataclasses
            seen["ensure_future"] = await asyncio.ensure_future(Awaitable())
            @dataclasses.dataclass
            class NoDocstring:
                x: int
            seen["dataclass"] = NoDocstring.__doc__
            import inspect
            seen["inspect"] = [module.inspect is inspect for module in (
                asyncio.coroutines, asyncio.format_helpers, asyncio.tasks, dataclasses)]
            # tokenize (linecache reads main.py for the traceback) and textwrap
            try:
                fail()
            except ValueError as exc:
                seen["source_line"] = 'raise ValueError("from a line of main.py")' in "".join(
                    traceback.format_exception(exc))
            group = ExceptionGroup("group", [KeyError("inner")])
            seen["group"] = "KeyError: 'inner'" in "".join(traceback.format_exception(group))
            import textwrap, tokenize
            # (from Python 3.12 on, linecache and traceback import these when they need them)
            seen["tokenize"] = getattr(linecache, "tokenize", tokenize) is tokenize
            seen["textwrap"] = getattr(traceback, "textwrap", textwrap) is textwrap
            # array, through socket
            left, right = socket.socketpair()
            socket.send_fds(left, [b"x"], [left.fileno()])
            data, fds, _, _ = socket.recv_fds(right, 10, 1)
            import array
            seen["fds"] = [data.decode(), len(fds), socket.array is array]
            return json.dumps(seen)
        """
    )
    instance.pong()
    assert _output(instance) == {
        "child": "child",
        "constants": [True] * 3,
        "subprocess": [True] * 4,
        "ensure_future": "awaited",
        "dataclass": "NoDocstring(x: int)",
        "inspect": [True] * 4,
        "source_line": True,
        "group": True,
        "tokenize": True,
        "textwrap": True,
        "fds": ["x", 1, True],
    }


def test_a_sequence_importing_them_first_gets_the_real_modules(spawn: Callable[..., Instance]) -> None:
    instance = spawn(
        """
        import inspect, json, subprocess, sys
        import asyncio.tasks
        async def run(context, input):
            real = [inspect.isawaitable.__module__ == "inspect", subprocess.Popen.__module__ == "subprocess",
                    sys.modules["inspect"] is inspect, sys.modules["subprocess"] is subprocess]
            # asyncio still holds the stand-in, which works and then gives way
            sleeping = asyncio.sleep(0)
            works = asyncio.tasks.inspect.isawaitable(sleeping)
            sleeping.close()
            return json.dumps({"real": real, "works": works, "handed": asyncio.tasks.inspect is inspect})
        """
    )
    instance.pong()
    assert _output(instance) == {"real": [True] * 4, "works": True, "handed": True}


# --------------------------------------------------------------------------- in-process


@pytest.fixture(scope="module")
def context() -> ModuleType:
    """The runner's lazy_imports module, loaded here with everything it might stand in for
    already imported, so that loading it changes nothing in this process."""
    import array  # noqa: F401 - see the docstring
    import ssl  # noqa: F401
    import textwrap  # noqa: F401
    import tokenize  # noqa: F401

    spec = importlib.util.spec_from_file_location("_spacehub_test_lazy", RUNNER.parent / "lazy_imports.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module._STAND_INS and not module._DEFER_SSL
    return module


def test_a_stand_in_has_its_constants_and_loads_the_module_on_first_use(context: ModuleType) -> None:
    sys.modules.pop("colorsys")
    stand_in = context._StandIn("colorsys", ONE_THIRD=1)
    holder: dict[str, Any] = {"colorsys": stand_in}
    stand_in._spacehub_holders = [holder]
    try:
        assert stand_in.ONE_THIRD == 1
        assert "colorsys" not in sys.modules
        assert stand_in.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
        assert holder["colorsys"] is sys.modules["colorsys"]
    finally:
        sys.modules["colorsys"] = colorsys


def test_a_stand_in_asked_for_while_loading_leaves_sys_modules(context: ModuleType) -> None:
    stand_in = context._StandIn("colorsys")
    sys.modules["colorsys"] = stand_in
    try:
        assert stand_in.ONE_THIRD == colorsys.ONE_THIRD
        assert isinstance(sys.modules["colorsys"], types.ModuleType)
        assert sys.modules["colorsys"] is not stand_in
    finally:
        sys.modules["colorsys"] = colorsys


@types.coroutine
def _generator_coroutine() -> Generator[None, None, None]:
    yield


def _plain_generator() -> Generator[None, None, None]:
    yield


async def _coroutine() -> None:
    pass


class _CustomAwaitable:
    def __await__(self) -> Generator[None, None, None]:
        yield


@pytest.mark.parametrize(
    "make",
    [
        _coroutine,
        _generator_coroutine,
        _plain_generator,
        _CustomAwaitable,
        lambda: asyncio.Future(loop=asyncio.new_event_loop()),
        lambda: 1,
        lambda: None,
        lambda: _CustomAwaitable,  # the class is not awaitable, its instances are
        lambda: [],
    ],
)
def test_isawaitable_is_inspects(make: Callable[[], Any]) -> None:
    from agent.runners.python import base

    value = make()
    try:
        assert base._isawaitable(value) is inspect.isawaitable(value)
    finally:
        if inspect.iscoroutine(value) or inspect.isgenerator(value):
            value.close()
        if isinstance(value, asyncio.Future):
            value.get_loop().close()
