"""Import stand-ins: what every instance's runner keeps from loading until it is used.

Imported first of the runner's modules (``runner.py`` sees to it): while it loads, the
heavy standard modules the runner needs are imported with ssl hidden and a few rarely
used modules replaced by stand-ins (see below). The other runner modules then find
those modules loaded already.

Off switch: ``SPACEHUB_RUNNER_LAZY_IMPORTS=0`` in the instance's environment (the hub's
``runner_env`` option) imports everything the ordinary way, for a sequence that trips
over a stand-in; it costs each instance about 6 MB of RSS.
"""

# The imports in the guarded block below are for their side effect, loading: the other
# runner modules use them.
# ruff: noqa: F401

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any, Final

#: The environment variable that turns the stand-ins off when set to ``0``.
ENV_SWITCH: Final = "SPACEHUB_RUNNER_LAZY_IMPORTS"
#: Whether the stand-ins are in use in this process.
ENABLED: Final = os.environ.get(ENV_SWITCH, "1").strip() != "0"


class _StandIn(ModuleType):
    """Takes the place of a module while the runner loads (see _STAND_INS).

    The first attribute asked of it that it does not have imports the real module, which
    then replaces it in every module that imported it meanwhile.
    """

    def __init__(self, name: str, **constants: int) -> None:
        super().__init__(name)
        vars(self).update(constants)
        #: the namespaces that hold this stand-in under its module's name
        self._spacehub_holders: list[dict[str, Any]] = []

    def __getattr__(self, attr: str) -> Any:
        name = self.__name__
        if sys.modules.get(name) is self:  # asked for while the runner loads
            del sys.modules[name]
        module = importlib.import_module(name)
        for namespace in self._spacehub_holders:
            if namespace.get(name) is self:
                namespace[name] = module
        return getattr(module, attr)


# Every instance loads asyncio, and what asyncio imports costs RSS in each of them, although
# an idle instance (like most) uses only part of it. So while the runner's modules load:
# - ssl is hidden: asyncio imports it only to offer TLS, and loading OpenSSL costs ~4.5 MB.
#   asyncio then sets its ``ssl`` globals to None, as on a Python built without ssl, and
#   _AsyncioSslFinder hands ssl to it as soon as anything imports ssl.
# - modules that asyncio, dataclasses, traceback and socket import but use only on rare
#   paths are _StandIn objects, loaded on first use (~1.5 MB in all): inspect, with ast
#   and dis (asyncio's debug mode, ensure_future of an awaitable that is no coroutine, a
#   dataclass without docstring; the runner avoids it on its common paths), subprocess
#   (asyncio's subprocesses; asyncio reads only these constants, subprocess's own values,
#   when it loads), tokenize (linecache reading a source line for a traceback), textwrap
#   (the traceback of an exception group) and array (socket.send_fds/recv_fds).
_DEFER_SSL: Final = ENABLED and "ssl" not in sys.modules
_STAND_INS: Final = {
    name: _StandIn(name, **constants)
    for name, constants in (
        ("inspect", {}),
        ("subprocess", {"PIPE": -1, "STDOUT": -2, "DEVNULL": -3}),
        ("tokenize", {}),
        ("textwrap", {}),
        ("array", {}),
    )
    if ENABLED and name not in sys.modules
}


def _end_loading() -> None:
    """The runner's modules are loaded: ssl and the stand-ins leave sys.modules, so that
    importing one of them from now on loads the real module."""
    if _DEFER_SSL:
        del sys.modules["ssl"]
    for name, stand_in in _STAND_INS.items():
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]
        stand_in._spacehub_holders = [
            vars(module)
            for module in list(sys.modules.values())
            if type(module) is ModuleType and vars(module).get(name) is stand_in
        ]


if _DEFER_SSL:
    sys.modules["ssl"] = None  # type: ignore[assignment]
sys.modules.update(_STAND_INS)
try:
    import asyncio
    import codecs
    import contextlib
    import importlib.util
    import json
    import logging
    import os
    import signal
    import stat
    import threading
    import time
    import traceback
    from collections import deque
    from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping, Sequence
    from importlib.machinery import ModuleSpec

    try:
        from spacehub.protocol.runner import (
            FD_CONTROL,
            FD_INPUT,
            FD_LOG,
            FD_MONITORING,
            FD_OUTPUT,
            FD_STDERR,
            FD_STDIN,
            FD_STDOUT,
            MAX_PREAMBLE_BYTES,
            Code,
            Message,
            MessageReader,
            PreambleReader,
            ProtocolError,
            encode,
        )
    except ImportError as _exc:  # pragma: no cover - only when the hub forgot PYTHONPATH
        sys.stderr.write(
            f"spacehub runner: cannot import spacehub.protocol.runner ({_exc}); check PYTHONPATH\n"
        )
        raise SystemExit(20) from None
finally:
    _end_loading()


def _hand_ssl_to_asyncio(ssl: ModuleType) -> None:
    for name, module in list(sys.modules.items()):
        if name.startswith("asyncio.") and module is not None and vars(module).get("ssl", ssl) is None:
            setattr(module, "ssl", ssl)  # noqa: B010 - a module global, not a typed attribute
    sslproto = sys.modules.get("asyncio.sslproto")
    if sslproto is not None and not hasattr(sslproto, "SSLAgainErrors"):
        # computed at import by asyncio.sslproto only when ssl was there
        setattr(sslproto, "SSLAgainErrors", (ssl.SSLWantReadError, ssl.SSLSyscallError))  # noqa: B010


class _AsyncioSslFinder:
    """Finds ssl the normal way and, once it is loaded, gives it to asyncio (see _DEFER_SSL)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "ssl":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)  # once is enough, and find_spec below must not find us
        spec = importlib.util.find_spec("ssl")
        loader = spec.loader if spec is not None else None
        if loader is None:
            return spec
        exec_module = loader.exec_module

        def exec_and_hand_over(module: ModuleType) -> None:
            exec_module(module)
            _hand_ssl_to_asyncio(module)

        loader.exec_module = exec_and_hand_over  # type: ignore[method-assign]
        return spec


if _DEFER_SSL:
    sys.meta_path.insert(0, _AsyncioSslFinder())
