"""The `si` configuration: profiles and session state, in ``~/.si`` (or ``$SI_CONFIG_PATH``).

::

    <dir>/si-config.json          {"profile": "default"}        which profile is in use
    <dir>/profiles/<name>.json    one profile (see DEFAULT_PROFILE)
    <dir>/session.json            last package / sequence / instance, for the "-" alias

A profile talks either to a hub directly (``env: development``, ``apiUrl``) or to a hub through a
manager's Space (``env: production``: ``middlewareApiUrl`` is the manager's ``.../api/v1``, plus
``space``, ``hub`` and ``token``; ``caFile`` names a CA to trust for a manager with its own CA).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from spacehub.errors import SpacehubError

__all__ = [
    "DEFAULT_PROFILE",
    "SETTABLE",
    "ConfigError",
    "SiConfig",
    "config_dir",
    "load",
]

DEFAULT_PROFILE: Final[dict[str, Any]] = {
    "configVersion": 1,
    "apiUrl": "http://127.0.0.1:8000/api/v1",
    "env": "development",
    "middlewareApiUrl": "",
    "space": "",
    "hub": "",
    "token": "",
    "caFile": "",
    "log": {"format": "pretty"},
}
#: Keys ``si config set <key> <value>`` accepts, with the values allowed (None: any string).
SETTABLE: Final[dict[str, tuple[str, ...] | None]] = {
    "apiUrl": None,
    "middlewareApiUrl": None,
    "env": ("development", "production"),
    "space": None,
    "hub": None,
    "token": None,
    "caFile": None,
    "log": ("pretty", "json"),
}
_SESSION_KEYS: Final = ("lastPackagePath", "lastSequenceId", "lastInstanceId")
_PROFILE_NAME: Final = re.compile(r"^[A-Za-z0-9_.-]+$")


class ConfigError(SpacehubError):
    """A bad setting, profile name, or a ``-`` with nothing to stand for."""


def config_dir() -> Path:
    override = os.environ.get("SI_CONFIG_PATH")
    return Path(override) if override else Path.home() / ".si"


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as file:
            value = json.load(file)
    except FileNotFoundError:
        return {}
    except ValueError as error:
        raise ConfigError(f"{path} is not valid JSON: {error}") from error
    return value if isinstance(value, dict) else {}


def _write(path: Path, value: dict[str, Any]) -> None:
    """Write atomically, private to the user (profiles hold tokens)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(value, file, indent=2)
            file.write("\n")
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


#: Settings that name a file: stored absolute, so `si` works from any folder; what each is for.
PATH_SETTINGS: Final = {"caFile": "the CA certificate to trust for the manager"}


def _path_setting(key: str, value: str) -> str:
    """``value`` as an absolute path to an existing file (empty clears the setting)."""
    if not value:
        return ""
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{key} {path}: no such file ({PATH_SETTINGS[key]})")
    return str(path)


def _check_name(name: str) -> str:
    if not _PROFILE_NAME.match(name):
        raise ConfigError(f"bad profile name {name!r} (letters, digits, '_', '.', '-')")
    return name


@dataclass
class SiConfig:
    dir: Path
    profile_name: str
    profile: dict[str, Any]
    session: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- paths
    @property
    def profiles_dir(self) -> Path:
        return self.dir / "profiles"

    def profile_path(self, name: str) -> Path:
        return self.profiles_dir / f"{_check_name(name)}.json"

    # ---------------------------------------------------------------- profile
    def get(self, key: str) -> Any:
        return self.profile.get(key, DEFAULT_PROFILE.get(key))

    def set(self, key: str, value: str) -> None:
        if key not in SETTABLE:
            raise ConfigError(f"unknown setting {key!r}; one of: {', '.join(SETTABLE)}")
        allowed = SETTABLE[key]
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{key} must be one of: {', '.join(allowed)}")
        if key == "log":
            self.profile["log"] = {**self.get("log"), "format": value}
        else:
            self.profile[key] = _path_setting(key, value) if key in PATH_SETTINGS else value
        self.save_profile()

    def set_json(self, text: str) -> None:
        try:
            value = json.loads(text)
        except ValueError as error:
            raise ConfigError(f"not JSON: {error}") from error
        if not isinstance(value, dict):
            raise ConfigError("expected a JSON object")
        for key in value:
            if key not in SETTABLE and key != "configVersion":
                raise ConfigError(f"unknown setting {key!r}")
            if key in PATH_SETTINGS and isinstance(value[key], str) and value[key]:
                value[key] = _path_setting(key, value[key])
        self.profile.update(value)
        self.save_profile()

    def reset(self, key: str) -> None:
        if key == "all":
            self.profile = dict(DEFAULT_PROFILE)
        elif key in DEFAULT_PROFILE:
            self.profile[key] = DEFAULT_PROFILE[key]
        else:
            raise ConfigError(f"unknown setting {key!r}")
        self.save_profile()

    def effective(self) -> dict[str, Any]:
        return {**DEFAULT_PROFILE, **self.profile}

    def save_profile(self) -> None:
        _write(self.profile_path(self.profile_name), self.effective())

    # ---------------------------------------------------------------- profiles
    def profiles(self) -> list[str]:
        names = {p.stem for p in self.profiles_dir.glob("*.json")} | {"default"}
        return sorted(names)

    def use_profile(self, name: str) -> None:
        if not self.profile_path(name).is_file() and name != "default":
            raise ConfigError(f"no profile {name!r} (create it with: si config profile create {name})")
        _write(self.dir / "si-config.json", {"profile": name})
        self.profile_name = name
        self.profile = _read(self.profile_path(name))

    def create_profile(self, name: str) -> None:
        path = self.profile_path(name)
        if path.exists():
            raise ConfigError(f"profile {name!r} exists")
        _write(path, dict(DEFAULT_PROFILE))

    def remove_profile(self, name: str) -> None:
        if name == self.profile_name:
            raise ConfigError(f"profile {name!r} is in use; switch to another first")
        path = self.profile_path(name)
        if not path.exists():
            raise ConfigError(f"no profile {name!r}")
        path.unlink()

    # ---------------------------------------------------------------- session ("-" alias)
    def remember(self, **values: str) -> None:
        for key in values:
            assert key in _SESSION_KEYS, key
        self.session.update(values)
        _write(self.dir / "session.json", self.session)

    def resolve(self, value: str, key: str, what: str) -> str:
        """``value``, or for ``-`` the last ``what`` remembered under ``key``."""
        if value != "-":
            return value
        last = self.session.get(key)
        if not isinstance(last, str) or not last:
            raise ConfigError(f"no last {what} to use for '-'")
        return last


def load(profile: str | None = None) -> SiConfig:
    """The configuration in :func:`config_dir`, with ``profile`` (or the chosen one) in use."""
    directory = config_dir()
    name = profile or os.environ.get("SI_CONFIG") or _read(directory / "si-config.json").get("profile")
    name = _check_name(name if isinstance(name, str) and name else "default")
    config = SiConfig(directory, name, {}, _read(directory / "session.json"))
    path = config.profile_path(name)
    if profile is not None and name != "default" and not path.is_file():
        raise ConfigError(f"no profile {name!r}")
    config.profile = _read(path)
    return config
