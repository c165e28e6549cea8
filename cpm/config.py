"""The manager's configuration: built-in defaults, then a TOML file, then flags.

With no configuration at all ``cpm`` serves on 127.0.0.1:9000 over TLS with a CA it
makes itself, and keeps its state in the user's data directory (or systemd's
``$STATE_DIRECTORY``). Plain HTTP is allowed only on a loopback address: hubs send
their signatures and operators their bearer tokens over this port.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from spacehub.server.config import (
    ConfigError,
    is_loopback,
    parse_size,
    read_options,
    state_directory,
    user_data_home,
)
from spacehub.server.logformat import LOG_FORMATS

from .tls import TlsFiles

__all__ = ["LOG_LEVELS", "ConfigError", "ManagerConfig", "default_data_dir", "is_loopback", "load_config"]

LOG_LEVELS = ("trace", "debug", "info", "warn", "error", "fatal")


def default_data_dir() -> Path:
    """Where the manager keeps its registry and certificates when no option says otherwise."""
    return state_directory() or user_data_home() / "spacehub-cpm"


#: The default of topic_log_bytes (--topic-log-bytes).
TOPIC_LOG_BYTES: Final = 512 * 1024 * 1024


@dataclass(slots=True)
class ManagerConfig:
    hostname: str = "127.0.0.1"
    port: int = 9000
    data_dir: Path = field(default_factory=default_data_dir)
    #: serve HTTPS (and wss for hubs); off only on loopback
    tls: bool = True
    #: a certificate and key to serve instead of the generated ones (both or neither)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: the CA that signed ``tls_cert``, served at /api/v1/ca.pem and fingerprinted
    tls_ca: Path | None = None
    #: extra DNS names and IPs the generated server certificate carries
    public_names: list[str] = field(default_factory=list)
    #: how new machines and hubs reach this manager, ``https://HOST[:PORT]`` (default: the
    #: address an API call came to, or hostname and port for the command line)
    public_url: str | None = None
    #: the Spacehub .deb new hubs install from this manager (default: found, see cpm/joining.py)
    package: Path | None = None
    #: spaces made at start when missing
    spaces: list[str] = field(default_factory=list)
    log_level: str = "info"
    #: "text" (readable) or "json" (one object a line: spacehub/server/logformat.py)
    log_format: str = "text"
    #: serve POST/DELETE /api/v1/faults to loopback callers (cpm/faults.py); off in production
    fault_injection: bool = False
    #: seconds between a hub's heartbeats (told to the hub in ``welcome``)
    heartbeat_interval: float = 10.0
    #: heartbeats a hub may miss before it is shown ``healthy: false``
    missed_heartbeats: int = 3
    #: seconds between the manager's control pings
    ping_interval: float = 10.0
    #: grace for a late message: a link silent for heartbeat_interval + this is closed by the
    #: manager, one silent for ping_interval + this by the hub
    pong_timeout: float = 10.0
    #: the registry in PostgreSQL (``postgresql://...``) shared by the Space's replicas;
    #: None: SQLite in the data dir (one manager)
    registry: str | None = None
    #: how the other replicas reach this one, ``https://HOST:PORT`` (default: public_url, else
    #: the address the API listens on)
    advertise_url: str | None = None
    #: bytes one Space-wide topic's log may hold (records its slowest consumer hub has not
    #: taken yet); past it the topic's producers wait
    topic_log_bytes: int = TOPIC_LOG_BYTES

    @property
    def registry_path(self) -> Path:
        return self.data_dir / "registry.sqlite3"

    @property
    def registry_location(self) -> str:
        """What :class:`cpm.registry.Registry` opens: the PostgreSQL URL, or the SQLite file."""
        return self.registry if self.registry is not None else str(self.registry_path)

    @property
    def generated_tls(self) -> bool:
        """Whether the CA and server certificate are the ones the manager makes itself."""
        return self.tls and self.tls_cert is None

    @property
    def ca_path(self) -> Path | None:
        """The CA certificate hubs should trust, if there is one to show."""
        if self.tls_ca is not None:
            return self.tls_ca
        if self.tls_cert is None:
            return TlsFiles.in_dir(self.data_dir).ca_cert
        return None


#: TOML keys (in ``[manager]`` or at the top level), mapped to ManagerConfig fields.
_TOML_KEYS: dict[str, str] = {f.name: f.name for f in dataclasses.fields(ManagerConfig)}
_PATHS = ("data_dir", "tls_cert", "tls_key", "tls_ca", "package")
#: A public URL: scheme, host (name, IPv4 or [IPv6]) and optional port, nothing else (it is
#: written into shell commands and cloud-init).
PUBLIC_URL: Final = re.compile(r"https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")
_FLOATS = ("heartbeat_interval", "ping_interval", "pong_timeout")


def _check(config: ManagerConfig) -> ManagerConfig:
    if not isinstance(config.port, int) or isinstance(config.port, bool) or not 0 <= config.port <= 65535:
        raise ConfigError(f"port must be 0..65535, not {config.port!r}")
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {config.log_level!r}")
    if config.log_format not in LOG_FORMATS:
        raise ConfigError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {config.log_format!r}")
    if not config.tls and not is_loopback(config.hostname):
        raise ConfigError(
            f"refusing to serve plain HTTP on {config.hostname}: hubs' signatures and API tokens would "
            "cross the network in clear; drop --no-tls, or listen on 127.0.0.1"
        )
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError("give both --tls-cert and --tls-key, or neither")
    for name in _FLOATS:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
        setattr(config, name, float(value))
    if isinstance(config.missed_heartbeats, bool) or not (
        isinstance(config.missed_heartbeats, int) and config.missed_heartbeats >= 1
    ):
        raise ConfigError(f"missed_heartbeats must be a whole number >= 1, not {config.missed_heartbeats!r}")
    for name in ("public_names", "spaces"):
        values = getattr(config, name)
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise ConfigError(f"{name} must be a list of non-empty strings")
    if config.public_url is not None:
        url = config.public_url
        if not isinstance(url, str) or PUBLIC_URL.fullmatch(url.rstrip("/")) is None:
            raise ConfigError(f"public_url must look like https://HOST[:PORT], not {config.public_url!r}")
        config.public_url = config.public_url.rstrip("/")
    if isinstance(config.topic_log_bytes, str):  # "512M" in the TOML file
        try:
            config.topic_log_bytes = parse_size(config.topic_log_bytes)
        except ValueError as exc:
            raise ConfigError(f"topic_log_bytes: {exc}") from None
    if (
        isinstance(config.topic_log_bytes, bool)
        or not isinstance(config.topic_log_bytes, int)
        or config.topic_log_bytes < 1024 * 1024
    ):
        raise ConfigError(f"topic_log_bytes must be at least 1 MiB, not {config.topic_log_bytes!r}")
    if config.registry is not None and (
        not isinstance(config.registry, str)
        or not config.registry.startswith(("postgresql://", "postgres://"))
    ):
        raise ConfigError("registry must be a postgresql://USER@HOST[:PORT]/DATABASE URL")
    if (
        config.registry is not None
        and config.advertise_url is None
        and config.public_url is None
        and config.hostname in ("0.0.0.0", "::", "")
    ):
        raise ConfigError(
            f"a replica listening on {config.hostname or 'every address'} needs advertise_url"
            " (--advertise-url https://HOST:PORT): how the other replicas reach it"
        )
    if config.advertise_url is not None:
        url = config.advertise_url
        if not isinstance(url, str) or PUBLIC_URL.fullmatch(url.rstrip("/")) is None:
            raise ConfigError(f"advertise_url must look like https://HOST:PORT, not {url!r}")
        config.advertise_url = url.rstrip("/")
    if not isinstance(config.tls, bool):
        raise ConfigError("tls must be true or false")
    return config


def load_config(path: Path | None, overrides: dict[str, Any]) -> ManagerConfig:
    """Defaults, then the TOML file at ``path`` (section ``[manager]`` or top level),
    then ``overrides`` (flags given on the command line; None values ignored)."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_options(path, "manager", _TOML_KEYS))
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = ManagerConfig()
    for name, value in values.items():
        if name in _PATHS:
            if not isinstance(value, str | Path):
                raise ConfigError(f"{name} must be a path")
            value = Path(value).expanduser()
        setattr(config, name, value)
    return _check(config)
