"""The hub's configuration: built-in defaults, then a TOML file, then flags.

Every option has a default that makes ``sth`` useful with no configuration at
all: API on 127.0.0.1:8000 (never all interfaces unless asked), sequences in the
user's data directory (or systemd's ``$STATE_DIRECTORY`` when run as a service).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadRequest

LOG_LEVELS = ("trace", "debug", "info", "warn", "error", "fatal")
RUNTIMES = ("process",)


class ConfigError(BadRequest):
    """A configuration file or option is wrong (the hub refuses to start)."""


def default_data_dir() -> Path:
    """Where the hub keeps its state when no option says otherwise."""
    state = os.environ.get("STATE_DIRECTORY")  # set by systemd's StateDirectory=
    if state:
        return Path(state.split(":")[0])
    if os.geteuid() == 0 and Path("/var/lib/spacehub").is_dir():
        return Path("/var/lib/spacehub")
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "spacehub"


@dataclass(slots=True)
class HubConfig:
    hostname: str = "127.0.0.1"
    port: int = 8000
    sequences_root: Path = field(default_factory=lambda: default_data_dir() / "sequences")
    log_level: str = "info"
    identify_existing: bool = False
    runtime: str = "process"
    #: seconds a finished instance stays listed
    instance_lifetime: float = 180.0
    #: seconds between SIGTERM and SIGKILL when an instance is killed
    kill_grace: float = 5.0
    #: seconds a runner may take from spawn to handshake
    start_timeout: float = 30.0
    #: default stop window (ms) when a stop request names none
    stop_timeout_ms: int = 7000
    #: the interpreter that runs Python sequences
    python: str = sys.executable
    #: extra environment for every runner, e.g. {"HTTPS_PROXY": "..."}
    runner_env: dict[str, str] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        """The config as ``GET /config`` shows it: nothing secret, no local paths
        beyond what an operator of this hub already knows."""
        return {
            "host": {"hostname": self.hostname, "port": self.port, "apiBase": "/api/v1"},
            "logLevel": self.log_level,
            "identifyExisting": self.identify_existing,
            "runtimeAdapter": self.runtime,
            "runtimes": {"python3": self.python},
            "timings": {
                "instanceLifetime": self.instance_lifetime,
                "killGrace": self.kill_grace,
                "startTimeout": self.start_timeout,
                "stopTimeout": self.stop_timeout_ms,
            },
            # Only the names: values may hold credentials.
            "runnerEnvNames": sorted(self.runner_env),
        }


#: TOML keys (sections flattened with "."), mapped to HubConfig fields.
_TOML_KEYS: dict[str, str] = {
    "hostname": "hostname",
    "port": "port",
    "sequences_root": "sequences_root",
    "log_level": "log_level",
    "identify_existing": "identify_existing",
    "runtime": "runtime",
    "instance_lifetime": "instance_lifetime",
    "kill_grace": "kill_grace",
    "start_timeout": "start_timeout",
    "stop_timeout_ms": "stop_timeout_ms",
    "python": "python",
    "runner_env": "runner_env",
}


def _check(config: HubConfig) -> HubConfig:
    if not 0 <= config.port <= 65535:
        raise ConfigError(f"port must be 0..65535, not {config.port}")
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {config.log_level!r}")
    if config.runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, not {config.runtime!r}")
    for name in ("instance_lifetime", "kill_grace", "start_timeout"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} may not be negative")
    if not isinstance(config.runner_env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in config.runner_env.items()
    ):
        raise ConfigError("runner_env must be a table of strings")
    return config


def load_config(path: Path | None, overrides: dict[str, Any]) -> HubConfig:
    """Defaults, then the TOML file at ``path`` (section ``[hub]`` or top level),
    then ``overrides`` (flags given on the command line; None values ignored)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as file:
                document = tomllib.load(file)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        table = document.get("hub", document)
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: [hub] must be a table")
        for key, value in table.items():
            if isinstance(value, dict) and key != "runner_env":
                continue  # other sections belong to other parts (e.g. [link])
            if key not in _TOML_KEYS:
                raise ConfigError(f"config file {path}: unknown option {key!r}")
            values[_TOML_KEYS[key]] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = HubConfig()
    types = {f.name: f.type for f in dataclasses.fields(HubConfig)}
    for name, value in values.items():
        current = getattr(config, name)
        if isinstance(current, Path):
            value = Path(value).expanduser()
        elif isinstance(current, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false")
        elif isinstance(current, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number ({types[name]})")
            value = type(current)(value)
        setattr(config, name, value)
    return _check(config)
