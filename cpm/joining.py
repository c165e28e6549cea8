"""Bringing up a new hub with one command: the package the manager hands out, the install
script, the line to paste and the cloud-init user-data.

The manager serves its own software: ``GET /install.sh`` (this module's :func:`install_script`,
:file:`install.sh` with the manager's address and package filled in), ``GET /install/<name>.deb``
and ``GET /install/SHA256SUMS``. A join token made over the Space API (or ``cpm join-token create
--command``) comes with :func:`join_line`, which a user pastes as root on a fresh Debian 12 or
Raspberry Pi OS machine, and :func:`cloud_init`, which does the same at a cloud machine's first
boot. Trust: the line fetches the manager's CA without checking it, then checks its SHA-256
against the fingerprint written into the line before anything else is fetched with it; cloud-init
carries the CA itself. docs/joining.md is the user's side of this.

Where the package comes from (:class:`PackageShelf`): the ``package`` option (``--package``),
else a ``spacehub_<version>_all.deb`` of the manager's own version in its data dir's
``packages/``, in apt's cache (where apt keeps a .deb it downloaded from a repository), or in the
source tree's ``build/`` (``make deb``). With none, the API says why instead of a command that
would fail on the new machine.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import socket
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Final

from . import __version__

__all__ = [
    "INSTALL_PATH",
    "Package",
    "PackageShelf",
    "cloud_init",
    "configured_base_url",
    "install_script",
    "join_line",
    "link_url",
]

#: Where the package and its checksums are served, under the manager's root.
INSTALL_PATH: Final = "/install"
#: Bytes read at a time when hashing or sending the package.
PACKAGE_CHUNK: Final = 256 * 1024
#: A package file name the manager will serve: Debian's ``name_version_arch.deb``.
PACKAGE_NAME: Final = re.compile(r"spacehub_[0-9][A-Za-z0-9.+~-]*_all\.deb")
#: Where, relative to the manager's data dir, an operator may drop the package to hand out.
PACKAGES_DIR: Final = "packages"
APT_ARCHIVES: Final = Path("/var/cache/apt/archives")
#: The source checkout this module runs from (``make deb`` writes build/ there).
SOURCE_BUILD_DIR: Final = Path(__file__).resolve().parents[1] / "build"
#: Where the line keeps the CA it fetched and checked, and where cloud-init writes it.
CLOUD_INIT_CA: Final = "/run/spacehub-join/ca.pem"


@dataclass(frozen=True, slots=True)
class Package:
    path: Path
    sha256: str
    size: int

    @property
    def name(self) -> str:
        return self.path.name


class PackageShelf:
    """Finds the ``.deb`` to hand out and remembers its hash until the file changes."""

    def __init__(self, configured: Path | None, data_dir: Path, version: str = __version__) -> None:
        self._configured = configured
        wanted = f"spacehub_{version}_all.deb"
        self._candidates = [d / wanted for d in (data_dir / PACKAGES_DIR, APT_ARCHIVES, SOURCE_BUILD_DIR)]
        self._cached: tuple[tuple[Path, int, int], Package] | None = None

    def find(self) -> Package | None:
        """The package, or None (:meth:`missing` says why). Blocking: hashes a changed file."""
        path = self._path()
        if path is None:
            return None
        try:
            stat = path.stat()
        except OSError:
            return None
        key = (path, stat.st_size, stat.st_mtime_ns)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        digest = hashlib.sha256()
        with path.open("rb") as file:
            while chunk := file.read(PACKAGE_CHUNK):
                digest.update(chunk)
        package = Package(path, digest.hexdigest(), stat.st_size)
        self._cached = (key, package)
        return package

    def missing(self) -> str:
        """Why :meth:`find` has nothing, in words for the operator."""
        if self._configured is not None:
            if not self._configured.is_file():
                return f"the package given with --package ({self._configured}) is not a file"
            return f"--package must name a spacehub_<version>_all.deb, not {self._configured.name}"
        looked = ", ".join(str(p) for p in self._candidates)
        return (
            f"no Spacehub package to hand out (looked for {looked}); build one with `make deb` "
            "or give the manager --package FILE"
        )

    def _path(self) -> Path | None:
        if self._configured is not None:
            ok = self._configured.is_file() and PACKAGE_NAME.fullmatch(self._configured.name)
            return self._configured if ok else None
        return next((p for p in self._candidates if p.is_file()), None)


def configured_base_url(public_url: str | None, tls: bool, hostname: str, port: int) -> str:
    """The manager's address when no API call tells it (``cpm join-token create --command``):
    ``public_url``, else its listening address, a wildcard one replaced by this machine's name."""
    if public_url is not None:
        return public_url
    if hostname in ("0.0.0.0", "::", ""):
        hostname = socket.getfqdn()
    host = f"[{hostname}]" if ":" in hostname else hostname
    return f"{'https' if tls else 'http'}://{host}:{port}"


def link_url(base_url: str) -> str:
    """The websocket URL hubs link to, from the manager's ``https://host:port``."""
    scheme, _, rest = base_url.partition("://")
    return ("wss" if scheme == "https" else "ws") + "://" + rest


def install_script(base_url: str, package: Package | None, missing: str) -> str:
    """:file:`install.sh` with the manager's address and package written in."""
    settings = {
        "SPACEHUB_URL": base_url,
        "SPACEHUB_LINK_URL": link_url(base_url),
        "SPACEHUB_PACKAGE": package.name if package else "",
        "SPACEHUB_PACKAGE_SHA256": package.sha256 if package else "",
        "SPACEHUB_PACKAGE_MISSING": "" if package else missing,
    }
    block = "\n".join(f"{name}={shlex.quote(value)}" for name, value in settings.items())
    template = resources.files(__package__).joinpath("install.sh").read_text()
    return template.replace("# @MANAGER_SETTINGS@", "# Filled in by the manager:\n" + block, 1)


def _install_args(space: str, token: str, description: str, tags: list[str], ca_word: str | None) -> str:
    """install.sh's arguments as shell words; ``ca_word`` is put in as it is (it may be ``"$d/ca.pem"``)."""
    args = ["--space", space, "--join-token", token]
    if description:
        args += ["--description", description]
    if tags:
        args += ["--tags", ",".join(tags)]
    words = " ".join(shlex.quote(arg) for arg in args)
    return words if ca_word is None else f"--ca-file {ca_word} {words}"


def join_line(
    base_url: str,
    ca_fingerprint: str | None,
    space: str,
    token: str,
    description: str = "",
    tags: list[str] | None = None,
) -> str:
    """The one line to paste on the new machine.

    ``ca_fingerprint`` (``AB:CD:...``, SHA-256 of the CA's DER) None means the manager's
    certificate is one the system already trusts (or TLS is off, on loopback).
    """
    tags = tags or []
    if ca_fingerprint is None:
        args = _install_args(space, token, description, tags, None)
        return f"curl -fsS {shlex.quote(base_url + '/install.sh')} | $(command -v sudo) sh -s -- {args}"
    hex_digest = ca_fingerprint.replace(":", "").lower()
    if re.fullmatch(r"[0-9a-f]{64}", hex_digest) is None:
        raise ValueError(f"not a SHA-256 fingerprint: {ca_fingerprint!r}")
    args = _install_args(space, token, description, tags, '"$d/ca.pem"')
    ca_url = shlex.quote(base_url + "/api/v1/ca.pem")
    script_url = shlex.quote(base_url + "/install.sh")
    # The CA is fetched unchecked (-k), then accepted only if its DER hashes to the fingerprint
    # (sed, base64 and sha256sum: coreutils, on every Debian); only then is anything fetched with it.
    mismatch = "echo 'spacehub: the CA the manager sent does not match the fingerprint: stopped' >&2"
    return (
        f'd=$(mktemp -d) && curl -fsSk -o "$d/ca.pem" {ca_url} && '
        f'{{ sed /-----/d "$d/ca.pem" | base64 -d | sha256sum | grep -q "^{hex_digest} " '
        f"|| {{ {mismatch}; false; }}; }} && "
        f'curl -fsS --cacert "$d/ca.pem" {script_url} | $(command -v sudo) sh -s -- {args}'
    )


def cloud_init(
    base_url: str,
    ca_pem: bytes | None,
    space: str,
    token: str,
    description: str = "",
    tags: list[str] | None = None,
) -> str:
    """``#cloud-config`` user-data that installs Spacehub and joins ``space`` at first boot.

    The CA travels inside the user-data (the provider's channel vouches for it), so nothing
    is fetched unchecked. Scalars are written as JSON strings, which YAML reads as they are.
    """
    tags = tags or []
    ca_word = CLOUD_INIT_CA if ca_pem is not None else None
    fetch = "curl -fsS " + (f"--cacert {CLOUD_INIT_CA} " if ca_word else "")
    command = (
        f"{fetch}{shlex.quote(base_url + '/install.sh')} | "
        f"sh -s -- {_install_args(space, token, description, tags, ca_word)}"
    )
    lines = [
        "#cloud-config",
        f"# Installs Spacehub from {base_url} and joins the hub to Space {space!r} at first boot.",
        "# The join token in it works once: make a new one for every machine.",
        "package_update: true",
        "packages:",
        "  - curl",
        "  - ca-certificates",
    ]
    if ca_pem is not None:
        lines += [
            "write_files:",
            f"  - path: {CLOUD_INIT_CA}",
            "    permissions: '0644'",
            "    content: |",
            *(f"      {line}" for line in ca_pem.decode("ascii").strip().splitlines()),
        ]
    lines += ["runcmd:", f"  - [sh, -c, {json.dumps(command)}]"]
    return "\n".join(lines) + "\n"
