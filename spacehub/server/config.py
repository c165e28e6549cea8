"""What both daemons' configurations share: reading a TOML file's options, where state
lives by default, and what counts as a loopback address.

Each daemon keeps its own dataclass of options and its own checks (``agent.config``,
``cpm.config``); the layering, defaults then file then flags, is the same for both.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Final

from .errors import ConfigError

__all__ = ["ConfigError", "is_loopback", "read_options", "state_directory", "user_data_home"]


def read_options(
    path: Path, section: str, toml_keys: Mapping[str, str], *, table_options: Collection[str] = ()
) -> dict[str, Any]:
    """The options of TOML file ``path``: its ``[section]`` table, or its top level
    when it has none, keyed by the config field each name maps to in ``toml_keys``.

    Other tables are left to the tools they belong to, except ``table_options``
    (options whose value is a table). An unknown option is a :class:`ConfigError`
    naming it, as is a file that cannot be read or is not TOML.
    """
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    table = document.get(section, document)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [{section}] must be a table")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and key not in table_options:
            continue  # other sections belong to other parts or tools
        if key not in toml_keys:
            raise ConfigError(f"config file {path}: unknown option {key!r}")
        values[toml_keys[key]] = value
    return values


def state_directory() -> Path | None:
    """systemd's ``$STATE_DIRECTORY`` (its first entry), set by ``StateDirectory=``."""
    state = os.environ.get("STATE_DIRECTORY")
    return Path(state.split(":")[0]) if state else None


def user_data_home() -> Path:
    """``$XDG_DATA_HOME``, or ``~/.local/share``."""
    xdg = os.environ.get("XDG_DATA_HOME")
    return Path(xdg) if xdg else Path.home() / ".local" / "share"


def is_loopback(hostname: str) -> bool:
    """Whether ``hostname`` names this machine only (localhost, 127.0.0.0/8, ::1)."""
    if hostname.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname.strip("[]")).is_loopback
    except ValueError:
        return False


_SIZE_SUFFIXES: Final = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def size_argument(text: str) -> int:
    """:func:`parse_size` for argparse (``type=size_argument``): its message on a bad size."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_size(text: str) -> int:
    """A byte count as an operator writes it: ``268435456``, ``256M``, ``1G``, ``1GiB``
    (powers of 1024); ValueError otherwise."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    number, suffix = (value[:-1], value[-1]) if value[-1:] in _SIZE_SUFFIXES else (value, "")
    if not number.isdigit():
        raise ValueError(f"not a size: {text!r} (say 256M or 1G)")
    return int(number) * _SIZE_SUFFIXES[suffix]
