"""Entry point of the Python runner: the hub runs ``python3 runner.py`` in each Instance.

Deliberately tiny. Python compiles a script on every start, while an imported module
comes from its .pyc: compiling the whole runner here cost about 13 ms and 4.5 MB of RSS
per instance. The runner itself is ``context.py`` next to this file (the context a
Sequence runs in); its docstring describes the fds, the environment and the exit codes.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from types import ModuleType

_CREATED = int(time.time() * 1000)
_HERE = os.path.dirname(os.path.abspath(__file__))
#: A private module name: a sequence may well have a module called ``context``.
_MODULE_NAME = "_spacehub_runner_context"


def _load_context() -> ModuleType:
    # Our directory is sys.path[0]; a sequence importing "runner" or "context" must not
    # get ours.
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != _HERE]
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, os.path.join(_HERE, "context.py"))
    if spec is None or spec.loader is None:  # pragma: no cover - context.py ships with us
        raise SystemExit(f"spacehub runner: cannot load {_HERE}/context.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module
    # The hub may set PYTHONDONTWRITEBYTECODE (for the sequences' directories); the
    # runner's own .pyc is what keeps every start fast, so it is written regardless
    # (where the directory is writable; an installed package ships it compiled).
    dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, False
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = dont_write
    return module


if __name__ == "__main__":
    _load_context().main(_CREATED)
