"""Validation of a sequence's ``package.json`` (spec §2.2).

Pure: takes the file's bytes (the caller reads them, bounded by
``limits.MAX_PACKAGE_JSON_BYTES``) and returns a :class:`PackageInfo` or raises
:class:`~agent.errors.PackageInvalid` (422) with a message naming the bad field.
"""

from __future__ import annotations

import copy
import json
import pathlib
from dataclasses import dataclass
from typing import Any

from agent.errors import PackageInvalid

__all__ = ["PackageInfo", "parse_package_json"]


@dataclass(frozen=True, slots=True)
class PackageInfo:
    """The fields of ``package.json`` the hub uses, validated."""

    name: str  # "" if absent
    version: str  # "" if absent
    main: str  # entry point, relative to the package root, as written in package.json
    engines: dict[str, str]
    language: str  # "py", "js", the extension of `main`, or "unknown"
    description: str | None = None
    author: str | None = None
    keywords: list[str] | None = None
    args: list[Any] | None = None
    repository: str | dict[str, Any] | None = None

    def config_fields(self) -> dict[str, Any]:
        """These fields as a JSON-able dict; optional ones that are absent are omitted.

        Mutable values are copied so that a caller editing the result (e.g. to build
        an API answer) cannot change this frozen record behind its back.
        """
        fields: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "main": self.main,
            "engines": dict(self.engines),
            "language": self.language,
        }
        if self.description is not None:
            fields["description"] = self.description
        if self.author is not None:
            fields["author"] = self.author
        if self.keywords is not None:
            fields["keywords"] = list(self.keywords)
        if self.args is not None:
            fields["args"] = copy.deepcopy(self.args)
        if self.repository is not None:
            fields["repository"] = copy.deepcopy(self.repository)
        return fields


def parse_package_json(raw: bytes) -> PackageInfo:
    """Parse and validate the bytes of a ``package.json``.

    Raises :class:`PackageInvalid` when the file is not a JSON object or when a field
    the hub uses has the wrong type. Unknown fields are ignored, as in the original.
    """
    try:
        # json.loads detects UTF-8/16/32 from the bytes themselves (a BOM-less
        # UTF-8 file is by far the common case).
        data = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise PackageInvalid(f"package.json is not valid UTF-8 text: {exc.reason}") from None
    except json.JSONDecodeError as exc:
        raise PackageInvalid(
            f"package.json is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        # A deeply nested document (e.g. a megabyte of "[") exhausts the parser's
        # stack; it is not a package.json anyone wrote on purpose.
        raise PackageInvalid("package.json is nested too deeply") from None
    if not isinstance(data, dict):
        raise PackageInvalid(f"package.json must be a JSON object, not {_json_type(data)}")

    main = _parse_main(data.get("main"))
    engines = _parse_engines(data.get("engines"))
    return PackageInfo(
        name=_optional_str(data, "name") or "",
        version=_optional_str(data, "version") or "",
        main=main,
        engines=engines,
        language=_language(engines, main),
        description=_optional_str(data, "description"),
        author=_parse_author(data.get("author")),
        keywords=_parse_keywords(data.get("keywords")),
        args=_parse_args(data.get("args")),
        repository=_parse_repository(data.get("repository")),
    )


def _json_type(value: object) -> str:
    """Name a decoded JSON value's type the way a package author would."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _optional_str(data: dict[str, Any], key: str) -> str | None:
    # A null is treated as absent: some generators write `"description": null`.
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise PackageInvalid(f"package.json: '{key}' must be a string, not {_json_type(value)}")
    return value


def _parse_main(value: object) -> str:
    if value is None:
        raise PackageInvalid("package.json: 'main' is required")
    if not isinstance(value, str):
        raise PackageInvalid(f"package.json: 'main' must be a string, not {_json_type(value)}")
    if not value.strip():
        raise PackageInvalid("package.json: 'main' must not be empty")
    if "\x00" in value:
        raise PackageInvalid("package.json: 'main' must not contain a NUL character")
    # `main` is joined to the package directory to find the entry point, so it must
    # stay inside it: no absolute path and no way up.
    path = pathlib.PurePosixPath(value)
    if path.is_absolute():
        raise PackageInvalid(f"package.json: 'main' must be a path relative to the package, not {value!r}")
    # Backslashes are separators on Windows, where packages are often built; treat
    # them as such when looking for '..' so "..\\x" cannot slip through.
    if ".." in value.replace("\\", "/").split("/"):
        raise PackageInvalid(f"package.json: 'main' must stay inside the package, not {value!r}")
    return value


def _parse_engines(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PackageInvalid(f"package.json: 'engines' must be an object, not {_json_type(value)}")
    for key, version in value.items():
        if not isinstance(version, str):
            raise PackageInvalid(f"package.json: 'engines.{key}' must be a string, not {_json_type(version)}")
    return dict(value)


def _language(engines: dict[str, str], main: str) -> str:
    # Spec §2.2: the engines decide, then the entry point's extension.
    if "python3" in engines:
        return "py"
    if "node" in engines:
        return "js"
    suffix = pathlib.PurePosixPath(main).suffix
    return suffix[1:] if suffix else "unknown"


def _parse_author(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        # npm's "person" object; turned into npm's own one-line form
        # "name <email> (url)" so the config keeps a single string type.
        name = value.get("name")
        if not isinstance(name, str) or not name:
            raise PackageInvalid("package.json: 'author.name' must be a non-empty string")
        text = name
        for key, template in (("email", " <{}>"), ("url", " ({})")):
            part = value.get(key)
            if part is None:
                continue
            if not isinstance(part, str):
                raise PackageInvalid(f"package.json: 'author.{key}' must be a string, not {_json_type(part)}")
            if part:
                text += template.format(part)
        return text
    raise PackageInvalid(
        f"package.json: 'author' must be a string or an object with a name, not {_json_type(value)}"
    )


def _parse_keywords(value: object) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise PackageInvalid(f"package.json: 'keywords' must be an array of strings, not {_json_type(value)}")
    for item in value:
        if not isinstance(item, str):
            raise PackageInvalid(
                f"package.json: 'keywords' must be an array of strings; found {_json_type(item)}"
            )
    return list(value)


def _parse_args(value: object) -> list[Any] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise PackageInvalid(f"package.json: 'args' must be an array, not {_json_type(value)}")
    return list(value)


def _parse_repository(value: object) -> str | dict[str, Any] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return dict(value)
    raise PackageInvalid(f"package.json: 'repository' must be a string or an object, not {_json_type(value)}")
