"""``sth join``: write the link settings into the hub's config file.

Joining a Space on a fresh device is: install the .deb, run
``sth join --cpm-url wss://... --space NAME --join-token shj_...``, then
``systemctl restart sth``. The hub does the join itself when it next starts (see
``docs/link.md``); this command only records where and how.

The file is edited as text, key by key, never re-serialised: it is a dpkg conffile
with every option documented in comments, and the operator's own comments and
ordering must survive. For each key in the hub's table (``[hub]``, or the top
level when the file uses no ``[hub]``) an existing assignment is replaced; else
the new line goes right under the commented template line ``# key = ...`` when
there is one, else at the end of the table. The result is parsed and checked by
``load_config`` before it replaces the file (atomically, same directory), so a
failed join leaves the old file untouched.

The join token is a secret: it is written to this file only (mode 0640, group
``spacehub`` so the service can read it), and ``--join-token -`` reads it from
stdin so it need not appear in ``ps`` or the shell history.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Final

from .config import ConfigError, load_config

__all__ = ["SYSTEM_CONFIG", "build_parser", "main", "set_keys"]

#: The config file the .deb installs and ``sth.service`` reads.
SYSTEM_CONFIG: Final = Path("/etc/spacehub/sth.toml")
#: The group the service runs as: it must read the file, nobody else may.
SERVICE_GROUP: Final = "spacehub"
#: Where a CA given with ``--cpm-ca`` is copied, beside the config file: the
#: service cannot see /root or /home (``ProtectHome=``).
CA_FILE_NAME: Final = "cpm-ca.pem"

TomlValue = str | bool | list[str]

_TABLE_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]*?)\s*\]\]?\s*(#.*)?$")


def _quote(value: str) -> str:
    """A TOML basic string (control characters escaped, as TOML requires)."""
    out = ['"']
    for char in value:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quote(value)
    return "[" + ", ".join(_quote(v) for v in value) + "]"


def _key_pattern(key: str) -> re.Pattern[str]:
    return re.compile(rf"^\s*{re.escape(key)}\s*=")


def _template_pattern(key: str) -> re.Pattern[str]:
    return re.compile(rf"^\s*#\s*{re.escape(key)}\s*=")


def _open_brackets(line: str) -> int:
    """Net ``[`` minus ``]`` outside strings and comments (for multi-line arrays)."""
    depth, quote, escaped = 0, "", False
    for char in line:
        if quote:
            if escaped:
                escaped = False
            elif char == "\\" and quote == '"':
                escaped = True
            elif char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == "#":
            break
        elif char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
    return depth


def _value_end(lines: list[str], start: int) -> int:
    """Index after the last line of the assignment starting at ``start``."""
    value = lines[start].split("=", 1)[1]
    depth, end = _open_brackets(value), start + 1
    while depth > 0 and end < len(lines):
        depth += _open_brackets(lines[end])
        end += 1
    return end


def _hub_region(lines: list[str]) -> tuple[int, int]:
    """``[start, end)`` of the lines holding the hub table's keys; adds a ``[hub]``
    header when the file needs one."""
    headers = [(i, m.group(1)) for i, line in enumerate(lines) if (m := _TABLE_HEADER.match(line))]
    for n, (index, name) in enumerate(headers):
        if name == "hub":
            end = headers[n + 1][0] if n + 1 < len(headers) else len(lines)
            return index + 1, end
    first = headers[0][0] if headers else len(lines)
    top_level_keys = any(re.match(r"^\s*[A-Za-z0-9_\-\"']+\s*=", line) for line in lines[:first])
    if top_level_keys and not any(name == "hub" or name.startswith("hub.") for _, name in headers):
        return 0, first  # the file keeps its options at the top level (load_config allows it)
    # A new [hub] table: before its sub-tables ([hub.runner_env]) if any, else at the end.
    at = next((i for i, name in headers if name.startswith("hub.")), len(lines))
    block = ["[hub]"]
    if at == len(lines) and lines and lines[-1].strip():
        block.insert(0, "")
    if at < len(lines):
        block.append("")
    lines[at:at] = block
    start = at + block.index("[hub]") + 1
    return start, start


def set_keys(text: str, values: dict[str, TomlValue]) -> str:
    """``text`` with each key of ``values`` set in the hub's table, all else kept."""
    lines = text.splitlines()
    for key, value in values.items():
        start, end = _hub_region(lines)
        new = f"{key} = {toml_value(value)}"
        current = next((i for i in range(start, end) if _key_pattern(key).match(lines[i])), None)
        if current is not None:
            lines[current : _value_end(lines, current)] = [new]
            continue
        template = next((i for i in range(start, end) if _template_pattern(key).match(lines[i])), None)
        if template is not None:
            lines.insert(template + 1, new)
            continue
        at = end
        while at > start and not lines[at - 1].strip():
            at -= 1  # keep the blank lines that separate it from the next table
        lines.insert(at, new)
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sth join",
        description="Write the settings that link this hub to a manager's Space into the hub's config file; "
        "the hub joins when it next starts (systemctl restart sth).",
    )
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        help=f"the config file to edit (default {SYSTEM_CONFIG}, when it exists and is writable)",
    )
    parser.add_argument("--cpm-url", metavar="URL", required=True, help="the manager: wss://HOST:PORT")
    parser.add_argument("--space", metavar="NAME", required=True, help="the Space to join")
    parser.add_argument(
        "--join-token",
        metavar="TOKEN",
        required=True,
        help="the one-time join token from `cpm join-token`; '-' reads it from stdin",
    )
    trust = parser.add_mutually_exclusive_group()
    trust.add_argument(
        "--cpm-ca", metavar="FILE", type=Path, help=f"the manager's CA (PEM); copied to {CA_FILE_NAME}"
    )
    trust.add_argument(
        "--cpm-fingerprint",
        metavar="SHA256",
        help="the manager CA's SHA-256 fingerprint (`cpm ca-fingerprint`)",
    )
    parser.add_argument(
        "--cpm-insecure",
        action="store_true",
        help="allow plain ws:// to a manager that is not on this machine (unencrypted!)",
    )
    parser.add_argument("--data-dir", type=Path, help="the hub's state directory, if not the default")
    parser.add_argument("--description", help="shown by the manager")
    parser.add_argument("--tags", metavar="A,B", help="comma-separated tags, shown by the manager")
    return parser


def _config_path(given: Path | None) -> Path:
    if given is not None:
        return given
    if SYSTEM_CONFIG.exists() and os.access(SYSTEM_CONFIG, os.W_OK):
        return SYSTEM_CONFIG
    if SYSTEM_CONFIG.exists():
        raise ConfigError(f"{SYSTEM_CONFIG} is not writable by this user: run as root (sudo sth join ...)")
    raise ConfigError(f"{SYSTEM_CONFIG} does not exist (is the .deb installed?): pass --config PATH")


def _service_gid() -> int | None:
    """The service group when we may give the file to it (we are root and it exists)."""
    if os.geteuid() != 0:
        return None
    try:
        return grp.getgrnam(SERVICE_GROUP).gr_gid
    except KeyError:
        return None


def _protect(fd: int, existing: os.stat_result | None) -> None:
    """0640 root:spacehub when we can, else the old owner's mode without any
    access for others (0600 for a new file)."""
    gid = _service_gid()
    if gid is not None:
        os.fchown(fd, 0, gid)
        os.fchmod(fd, 0o640)
    elif existing is not None:
        with contextlib.suppress(PermissionError):
            os.fchown(fd, existing.st_uid, existing.st_gid)
        os.fchmod(fd, existing.st_mode & 0o750)
    else:
        os.fchmod(fd, 0o600)


def write_config(path: Path, values: dict[str, TomlValue]) -> None:
    """Set ``values`` in ``path`` (created if missing), check it, replace it atomically."""
    try:
        existing: os.stat_result | None = path.stat()
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        existing, text = None, ""
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    new_text = set_keys(text, values)
    directory = path.resolve().parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    except OSError as exc:
        raise ConfigError(f"cannot write in {directory}: {exc.strerror}") from None
    tmp = Path(tmp_name)
    try:
        _protect(fd, existing)  # before the secret is written
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(new_text)
            file.flush()
            os.fsync(file.fileno())
        load_config(tmp, {})  # refuse to leave a file the hub would not start with
        os.replace(tmp, path.resolve())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _install_ca(source: Path, config_path: Path) -> Path:
    """The CA as a file the service can read: copied beside the config file."""
    target = config_path.resolve().parent / CA_FILE_NAME
    try:
        if source.resolve() != target:
            shutil.copyfile(source, target)
        target.chmod(0o644)  # a certificate is public
    except OSError as exc:
        raise ConfigError(f"cannot copy {source} to {target}: {exc.strerror}") from None
    return target


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    token: str = args.join_token
    if token == "-":
        token = sys.stdin.readline().strip()
    if not token:
        print("sth join: the join token is empty", file=sys.stderr)
        return 2
    try:
        path = _config_path(args.config)
        values: dict[str, TomlValue] = {
            "cpm_url": args.cpm_url,
            "space": args.space,
            "join_token": token,
            # Trust settings describe this manager only: stale ones from an earlier join go.
            "cpm_ca": "",
            "cpm_fingerprint": args.cpm_fingerprint or "",
            "cpm_insecure": bool(args.cpm_insecure),
        }
        if args.data_dir is not None:
            values["data_dir"] = str(args.data_dir.resolve())
        if args.description is not None:
            values["description"] = args.description
        if args.tags is not None:
            values["tags"] = [t.strip() for t in args.tags.split(",") if t.strip()]
        # Check the settings on their own first, so a bad flag is named as a flag.
        load_config(None, {k: v for k, v in values.items() if k != "data_dir"})
        if args.cpm_ca is not None:
            if not args.cpm_ca.is_file():
                raise ConfigError(f"--cpm-ca {args.cpm_ca}: no such file")
            values["cpm_ca"] = str(_install_ca(args.cpm_ca, path))
        write_config(path, values)
    except ConfigError as exc:
        print(f"sth join: {exc}", file=sys.stderr)
        return 2
    print(f"sth join: {path} now links this hub to Space {args.space!r} at {args.cpm_url}.")
    if path.resolve() == SYSTEM_CONFIG:
        print("Next: systemctl restart sth   (then: journalctl -u sth -f, to watch it join)")
    else:
        print(f"Next: restart the hub with this file: sth -c {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
