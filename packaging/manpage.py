"""Man pages for sth, cpm and si, made from their argparse parsers at build time.

    python packaging/manpage.py <command> <version>  > <command>.1

Each page has NAME, SYNOPSIS, DESCRIPTION, OPTIONS, one section per subcommand (with its own
options, down the whole command tree), FILES and SEE ALSO, so `man si` documents every command
the CLI has and can never drift from it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from typing import Final

SUMMARIES: Final = {
    "sth": "the Spacehub hub: keeps Sequences and runs them as Instances behind a REST API",
    "cpm": "the Spacehub manager: a Space of hubs, its API, and the hubs' links",
    "si": "the Spacehub command-line client, after the original Scramjet si",
}
FILES: Final = {
    "sth": [
        ("/etc/spacehub/sth.toml", "the hub's configuration (the systemd unit passes it with -c)"),
        ("/var/lib/spacehub", "the hub's data dir: link key, link.json, sequences/"),
    ],
    "cpm": [
        ("/etc/spacehub/cpm.toml", "the manager's configuration"),
        ("/var/lib/spacehub-cpm", "the manager's data dir: registry.sqlite3, CA and certificates, cpm.sock"),
    ],
    "si": [
        ("~/.si/", "profiles and session state ($SI_CONFIG_PATH overrides it)"),
    ],
}


def _parsers(command: str) -> list[tuple[str, argparse.ArgumentParser]]:
    """The command's top-level parser(s): (how it is invoked, parser)."""
    if command == "sth":
        from agent import join
        from agent.instances import offline
        from agent.main import build_parser

        return [
            ("sth", build_parser()),
            ("sth join", join.build_parser()),
            ("sth stop-instances", offline.build_parser()),
        ]
    if command == "cpm":
        from cpm.main import build_parser as cpm_parser

        return [("cpm", cpm_parser())]
    if command == "si":
        from spacehub.cli.main import build_parser as si_parser

        return [("si", si_parser())]
    raise SystemExit(f"unknown command {command!r}")


def roff(text: str) -> str:
    """Plain text as roff: escapes, and no line that starts like a request."""
    lines = []
    for line in text.replace("\\", "\\e").replace("-", "\\-").splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser, str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:  # an alias
                    continue
                seen.add(id(sub))
                yield name, sub, helps.get(name, "")


def _options(parser: argparse.ArgumentParser) -> Iterator[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            metavar = "" if action.nargs == 0 else " " + (
                str(action.metavar) if action.metavar else action.dest.upper()
            )
            flags = ", ".join(f"\\fB{roff(flag)}\\fR{roff(metavar)}" for flag in action.option_strings)
        else:
            flags = f"\\fI{roff(str(action.metavar or action.dest))}\\fR"
        help_text = (action.help or "").replace("%(default)s", str(action.default)).replace("%%", "%")
        yield f".TP\n{flags}\n{roff(help_text)}"


def _section(invocation: str, parser: argparse.ArgumentParser, help_text: str, depth: int) -> Iterator[str]:
    yield f".SS {roff(invocation)}" if depth else ".SH OPTIONS"
    if depth and help_text:
        yield roff(help_text)
    if depth:
        usage = parser.format_usage().replace("usage: ", "").strip()
        yield f".PP\n.nf\n{roff(usage)}\n.fi"
    yield from _options(parser)
    for name, sub, sub_help in _subcommands(parser):
        yield from _section(f"{invocation} {name}", sub, sub_help, depth + 1)


def manpage(command: str, version: str, parsers: Callable[[str], list[tuple[str, argparse.ArgumentParser]]] = _parsers) -> str:
    found = parsers(command)
    out = [
        f'.TH {command.upper()} 1 "" "spacehub {roff(version)}" "Spacehub"',
        ".SH NAME",
        f"{command} \\- {roff(SUMMARIES[command])}",
        ".SH SYNOPSIS",
        ".nf",
    ]
    for _, parser in found:
        out.append(roff(parser.format_usage().replace("usage: ", "").strip()))
    out += [".fi", ".SH DESCRIPTION"]
    description = found[0][1].description or SUMMARIES[command]
    out.append(roff(description))
    for index, (invocation, parser) in enumerate(found):
        out.extend(_section(invocation, parser, parser.description or "", index))
    out.append(".SH FILES")
    for path, what in FILES[command]:
        out.append(f".TP\n\\fI{roff(path)}\\fR\n{roff(what)}")
    out += [
        ".SH SEE ALSO",
        ", ".join(f"\\fB{other}\\fR(1)" for other in SUMMARIES if other != command)
        + ", /usr/share/doc/spacehub/README.md.gz",
    ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(manpage(sys.argv[1], sys.argv[2]))
