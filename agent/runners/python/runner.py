"""Entry point of the Python runner: the hub runs ``python3 runner.py`` in each Instance.

Deliberately tiny. Python compiles a script on every start, while an imported module
comes from its .pyc: compiling the whole runner here cost about 13 ms and 4.5 MB of RSS
per instance. The runner is the package next to this file (its ``__init__`` describes
the fds, the environment and the exit codes), loaded under a private name.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from types import ModuleType

_CREATED = int(time.time() * 1000)
_HERE = os.path.dirname(os.path.abspath(__file__))
#: A private package name: a sequence may well have modules called ``main`` or ``context``.
_PACKAGE = "_spacehub_runner"


def _load_runner() -> ModuleType:
    # Our directory is sys.path[0]; a sequence importing "runner" or "context" must not
    # get ours.
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != _HERE]
    init = os.path.join(_HERE, "__init__.py")
    spec = importlib.util.spec_from_file_location(_PACKAGE, init, submodule_search_locations=[_HERE])
    if spec is None or spec.loader is None:  # pragma: no cover - the package ships with us
        raise SystemExit(f"spacehub runner: cannot load {_HERE}")
    package = importlib.util.module_from_spec(spec)
    sys.modules[_PACKAGE] = package
    # The hub may set PYTHONDONTWRITEBYTECODE (for the sequences' directories); the
    # runner's own .pyc files are what keep every start fast, so they are written
    # regardless (where the directory is writable; an installed package ships them).
    dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, False
    try:
        spec.loader.exec_module(package)
        # The stand-ins first: they must be in place before anything imports asyncio.
        importlib.import_module(f"{_PACKAGE}.lazy_imports")
        return importlib.import_module(f"{_PACKAGE}.main")
    finally:
        sys.dont_write_bytecode = dont_write


if __name__ == "__main__":
    _load_runner().main(_CREATED)
