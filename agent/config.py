"""The hub's configuration: built-in defaults, then a TOML file, then flags.

Every option has a default that makes ``sth`` useful with no configuration at
all: API on 127.0.0.1:8000 (never all interfaces unless asked), sequences in the
user's data directory (or systemd's ``$STATE_DIRECTORY`` when run as a service).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from spacehub.server.config import ConfigError as ConfigError
from spacehub.server.config import is_loopback as is_loopback
from spacehub.server.config import parse_size, read_options, state_directory, user_data_home
from spacehub.server.logformat import LOG_FORMATS as LOG_FORMATS

from . import limits

LOG_LEVELS = ("trace", "debug", "info", "warn", "error", "fatal")
RUNTIMES = ("process", "podman")
PODMAN_NETWORKS = ("none", "host")


#: How the hub picks its data dir when neither --data-dir nor the config file says: the one
#: statement of it (``sth --help`` prints it, and a test holds README.md to it).
DATA_DIR_RULE: Final = (
    "$STATE_DIRECTORY under systemd; else, run as root, /var/lib/spacehub if it exists"
    " (the .deb makes it); else $XDG_DATA_HOME/spacehub, or ~/.local/share/spacehub"
)


def default_data_dir() -> Path:
    """Where the hub keeps its state when no option says otherwise (:data:`DATA_DIR_RULE`)."""
    state = state_directory()
    if state is not None:
        return state
    if os.geteuid() == 0 and Path("/var/lib/spacehub").is_dir():
        return Path("/var/lib/spacehub")
    return user_data_home() / "spacehub"


_FINGERPRINT = re.compile(r"[0-9A-Fa-f]{64}")


@dataclass(slots=True)
class HubConfig:
    hostname: str = "127.0.0.1"
    port: int = 8000
    #: the hub's state: its link key (hub.key), link.json, and by default the sequences
    data_dir: Path = field(default_factory=default_data_dir)
    sequences_root: Path = field(default_factory=lambda: default_data_dir() / "sequences")
    log_level: str = "info"
    #: "text" (readable) or "json" (one object a line: spacehub/server/logformat.py)
    log_format: str = "text"
    identify_existing: bool = False
    runtime: str = "process"
    #: seconds a finished instance stays listed
    instance_lifetime: float = 180.0
    #: seconds between SIGTERM and SIGKILL when an instance is killed
    kill_grace: float = 5.0
    #: end every instance when the hub stops (instead of leaving them running for the
    #: next hub): for a hub run by hand (make run) and for tests
    end_instances_on_exit: bool = False
    #: seconds a runner may take from spawn to handshake
    start_timeout: float = 30.0
    #: seconds a Node.js instance lingers after its output ended (the original's exitTimeout):
    #: events, stop handlers and keepAlive keep working meanwhile
    node_exit_timeout: float = 10.0
    #: default stop window (ms) when a stop request names none
    stop_timeout_ms: int = 7000
    #: the interpreter that runs Python sequences
    python: str = sys.executable
    #: the Node.js executable for Node sequences ("" = look for node on PATH)
    node: str = ""
    #: extra environment for every runner, e.g. {"HTTPS_PROXY": "..."}
    runner_env: dict[str, str] = field(default_factory=dict)
    #: the manager to link to, wss://HOST:PORT ("" = no link); the first of cpm_urls
    cpm_url: str = ""
    #: every manager replica the hub may link to (cpm_url given as a list, or --cpm-url
    #: repeated): it dials them in turn until one answers, and the next when a link drops
    cpm_urls: list[str] = field(default_factory=list)
    #: the space this hub joins
    space: str = ""
    #: one-time join token (a secret; used only until the hub has joined)
    join_token: str = ""
    #: the manager's CA certificate (PEM file; "" = see cpm_fingerprint, else the system store)
    cpm_ca: str = ""
    #: SHA-256 fingerprint of the manager's CA; the CA is fetched and checked against it
    cpm_fingerprint: str = ""
    #: allow plain ws:// to a manager that is not on loopback
    cpm_insecure: bool = False
    #: the longest wait between two attempts to link to a manager that answered (seconds)
    link_backoff_cap: float = 60.0
    #: Space-wide topics: bytes one topic's outbound spool may hold, and all of them together
    #: (records the manager has not acknowledged yet); past either, producers wait
    topic_spool_bytes: int = limits.TOPIC_SPOOL_BYTES
    topic_spool_total_bytes: int = limits.TOPIC_SPOOL_TOTAL_BYTES
    #: shown by the manager
    description: str = ""
    tags: list[str] = field(default_factory=list)
    #: Podman runtime: the runner images ("" = the built-in ones, see agent.images)
    runner_image_py: str = ""
    runner_image_node: str = ""
    #: Podman runtime: "none" (only loopback inside) or "host"
    podman_network: str = "none"
    #: per-instance limits when a start request names none (0 = no limit); Podman only
    default_memory_mb: int = 512
    default_cpus: float = 0.0
    default_pids: int = 256
    #: what the hub found at start: can Podman run here, which limits it enforces (not an option)
    podman_status: dict[str, Any] = field(default_factory=dict)
    #: what the process runtime enforces of a start's limits, and how (found at start)
    process_limits: dict[str, Any] = field(default_factory=dict)

    def node_path(self) -> str | None:
        """The Node.js executable, or None when this machine has none."""
        if self.node:
            return self.node if os.access(self.node, os.X_OK) else None
        return shutil.which("node") or shutil.which("nodejs")

    def public(self) -> dict[str, Any]:
        """The config as ``GET /config`` shows it: nothing secret, no local paths
        beyond what an operator of this hub already knows."""
        return {
            "host": {"hostname": self.hostname, "port": self.port, "apiBase": "/api/v1"},
            "logLevel": self.log_level,
            "logFormat": self.log_format,
            "identifyExisting": self.identify_existing,
            "runtimeAdapter": self.runtime,
            # Names, not paths: /config tells nothing of the machine's file layout.
            "runtimes": {"python3": Path(self.python).name, "node": _name(self.node_path())},
            "podman": {
                "runnerImagePy": self.runner_image_py,
                "runnerImageNode": self.runner_image_node,
                "network": self.podman_network,
                "defaultLimits": {
                    "memoryMb": self.default_memory_mb,
                    "cpus": self.default_cpus,
                    "pids": self.default_pids,
                },
                **self.podman_status,
            },
            "processLimits": self.process_limits,
            "timings": {
                "instanceLifetime": self.instance_lifetime,
                "killGrace": self.kill_grace,
                "nodeExitTimeout": self.node_exit_timeout,
                "startTimeout": self.start_timeout,
                "stopTimeout": self.stop_timeout_ms,
            },
            # Only the names: values may hold credentials.
            "runnerEnvNames": sorted(self.runner_env),
            # Never the join token.
            "cpm": {
                "url": self.cpm_url,
                "urls": list(self.cpm_urls),
                "space": self.space,
                "insecure": self.cpm_insecure,
                "description": self.description,
                "tags": list(self.tags),
            },
        }


#: TOML keys (sections flattened with "."), mapped to HubConfig fields.
_TOML_KEYS: dict[str, str] = {
    "hostname": "hostname",
    "port": "port",
    "sequences_root": "sequences_root",
    "log_level": "log_level",
    "log_format": "log_format",
    "identify_existing": "identify_existing",
    "runtime": "runtime",
    "instance_lifetime": "instance_lifetime",
    "kill_grace": "kill_grace",
    "end_instances_on_exit": "end_instances_on_exit",
    "node_exit_timeout": "node_exit_timeout",
    "start_timeout": "start_timeout",
    "stop_timeout_ms": "stop_timeout_ms",
    "python": "python",
    "node": "node",
    "runner_env": "runner_env",
    "data_dir": "data_dir",
    "cpm_url": "cpm_url",
    "space": "space",
    "join_token": "join_token",
    "cpm_ca": "cpm_ca",
    "cpm_fingerprint": "cpm_fingerprint",
    "cpm_insecure": "cpm_insecure",
    "link_backoff_cap": "link_backoff_cap",
    "topic_spool_bytes": "topic_spool_bytes",
    "topic_spool_total_bytes": "topic_spool_total_bytes",
    "description": "description",
    "tags": "tags",
    "runner_image_py": "runner_image_py",
    "runner_image_node": "runner_image_node",
    "podman_network": "podman_network",
    "default_memory_mb": "default_memory_mb",
    "default_cpus": "default_cpus",
    "default_pids": "default_pids",
}


def _check(config: HubConfig) -> HubConfig:
    if not 0 <= config.port <= 65535:
        raise ConfigError(f"port must be 0..65535, not {config.port}")
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {config.log_level!r}")
    if not 0.1 <= config.link_backoff_cap <= 3600:
        raise ConfigError(f"link_backoff_cap is 0.1 to 3600 seconds, not {config.link_backoff_cap!r}")
    for name in sorted(_SIZES):
        value = getattr(config, name)
        if isinstance(value, str):  # "256M" in the TOML file
            try:
                setattr(config, name, parse_size(value))
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
        elif isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f'{name} must be a size such as 268435456 or "256M", not {value!r}')
        if not 1024 * 1024 <= getattr(config, name) <= 1 << 50:
            raise ConfigError(f"{name} must be at least 1 MiB, not {getattr(config, name)!r}")
    if config.log_format not in LOG_FORMATS:
        raise ConfigError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {config.log_format!r}")
    if config.runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, not {config.runtime!r}")
    if config.podman_network not in PODMAN_NETWORKS:
        raise ConfigError(
            f"podman_network must be one of {', '.join(PODMAN_NETWORKS)}, not {config.podman_network!r}"
        )
    for name in ("default_memory_mb", "default_cpus", "default_pids"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} may not be negative (0 = no limit)")
    for name in ("instance_lifetime", "kill_grace", "start_timeout", "node_exit_timeout"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} may not be negative")
    if not isinstance(config.runner_env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in config.runner_env.items()
    ):
        raise ConfigError("runner_env must be a table of strings")
    _check_link(config)
    return config


def _check_link(config: HubConfig) -> None:
    for name in ("cpm_url", "space", "join_token", "cpm_ca", "cpm_fingerprint", "description"):
        if not isinstance(getattr(config, name), str):
            raise ConfigError(f"{name} must be a string")
    if not isinstance(config.tags, list) or not all(isinstance(t, str) and t for t in config.tags):
        raise ConfigError("tags must be a list of non-empty strings")
    if config.cpm_fingerprint and not _FINGERPRINT.fullmatch(
        "".join(config.cpm_fingerprint.split()).replace(":", "")
    ):
        raise ConfigError("cpm_fingerprint must be a SHA-256 fingerprint (64 hex digits, colons allowed)")
    if not config.cpm_url:
        return
    if not config.cpm_urls:
        config.cpm_urls = [config.cpm_url]
    for cpm_url in config.cpm_urls:
        _check_cpm_url(cpm_url, config.cpm_insecure)
    if not config.space or "\0" in config.space:
        raise ConfigError("a hub linked to a manager needs --space NAME")


def _check_cpm_url(cpm_url: str, insecure: bool) -> None:
    try:
        url = urlsplit(cpm_url)
        host = url.hostname
        url.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ConfigError(f"cpm_url {cpm_url!r} is not a URL: {exc}") from None
    if url.scheme not in ("ws", "wss") or not host:
        raise ConfigError(
            f"cpm_url must be wss://HOST:PORT (or ws:// to a loopback manager), not {cpm_url!r}"
        )
    if url.scheme == "ws" and not is_loopback(host) and not insecure:
        raise ConfigError(
            f"cpm_url {cpm_url!r} is plain ws:// to a manager that is not on this machine: "
            "the link would be unencrypted; use wss:// or pass --cpm-insecure"
        )


#: Options that are byte counts: a number, or a string such as "256M".
_SIZES: Final = frozenset({"topic_spool_bytes", "topic_spool_total_bytes"})


def load_config(path: Path | None, overrides: dict[str, Any]) -> HubConfig:
    """Defaults, then the TOML file at ``path`` (section ``[hub]`` or top level),
    then ``overrides`` (flags given on the command line; None values ignored)."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_options(path, "hub", _TOML_KEYS, table_options={"runner_env"}))
    values.update({k: v for k, v in overrides.items() if v is not None})
    urls = values.get("cpm_url")
    if isinstance(urls, list):  # several replicas: TOML list or --cpm-url repeated
        if not urls or not all(isinstance(u, str) and u for u in urls):
            raise ConfigError("cpm_url must be a URL or a list of URLs")
        values["cpm_url"], values["cpm_urls"] = urls[0], list(dict.fromkeys(urls))
    if "data_dir" in values and "sequences_root" not in values:
        values["sequences_root"] = Path(values["data_dir"]).expanduser() / "sequences"
    config = HubConfig()
    types = {f.name: f.type for f in dataclasses.fields(HubConfig)}
    for name, value in values.items():
        current = getattr(config, name)
        if isinstance(current, Path):
            value = Path(value).expanduser()
        elif isinstance(current, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false")
        elif name in _SIZES and isinstance(value, str):  # "256M": read in _check
            pass
        elif isinstance(current, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number ({types[name]})")
            value = type(current)(value)
        setattr(config, name, value)
    return _check(config)


def _name(path: str | None) -> str | None:
    return Path(path).name if path else None
