"""agent.sequences.package: package.json validation."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.errors import PackageInvalid
from agent.sequences.package import PackageInfo, parse_package_json


def parse(document: Any) -> PackageInfo:
    return parse_package_json(json.dumps(document).encode())


def test_minimal() -> None:
    info = parse({"main": "index.js"})
    assert info == PackageInfo(name="", version="", main="index.js", engines={}, language="js")
    assert info.config_fields() == {
        "name": "",
        "version": "",
        "main": "index.js",
        "engines": {},
        "language": "js",
    }


def test_full() -> None:
    document = {
        "name": "demo",
        "version": "1.2.3",
        "main": "./main.py",
        "engines": {"python3": "3.11"},
        "description": "A demo",
        "author": "Jane <jane@example.com>",
        "keywords": ["a", "b"],
        "args": [1, "two", {"three": 3}],
        "repository": {"type": "git", "url": "https://example.com/x.git"},
        "scripts": {"ignored": "yes"},
    }
    info = parse(document)
    fields = info.config_fields()
    assert fields == {
        "name": "demo",
        "version": "1.2.3",
        "main": "./main.py",
        "engines": {"python3": "3.11"},
        "language": "py",
        "description": "A demo",
        "author": "Jane <jane@example.com>",
        "keywords": ["a", "b"],
        "args": [1, "two", {"three": 3}],
        "repository": {"type": "git", "url": "https://example.com/x.git"},
    }
    # JSON-able, and a copy: editing it does not touch the frozen record.
    json.dumps(fields)
    fields["args"][2]["three"] = 4
    fields["engines"]["node"] = "x"
    assert info.config_fields()["args"] == [1, "two", {"three": 3}]
    assert info.engines == {"python3": "3.11"}


def test_nulls_are_absent() -> None:
    info = parse({"main": "a.js", "name": None, "description": None, "keywords": None, "engines": None})
    assert info.name == ""
    assert info.engines == {}
    assert "description" not in info.config_fields()
    assert "keywords" not in info.config_fields()


@pytest.mark.parametrize(
    ("engines", "main", "language"),
    [
        ({"python3": "*"}, "main.js", "py"),  # engines win over the extension
        ({"node": ">=16"}, "main.py", "js"),
        ({"python3": "*", "node": "*"}, "x", "py"),
        ({}, "index.js", "js"),
        ({}, "src/main.py", "py"),
        ({}, "./dist/app.ts", "ts"),
        ({}, "./index", "unknown"),
        ({}, "bin/run.sh", "sh"),
        ({"deno": "1"}, "mod", "unknown"),
    ],
)
def test_language(engines: dict[str, str], main: str, language: str) -> None:
    assert parse({"main": main, "engines": engines}).language == language


@pytest.mark.parametrize(
    ("author", "expected"),
    [
        ({"name": "Jane", "email": "jane@example.com"}, "Jane <jane@example.com>"),
        ({"name": "Jane"}, "Jane"),
        ({"name": "Jane", "url": "https://jane.dev"}, "Jane (https://jane.dev)"),
        (
            {"name": "Jane", "email": "j@x.org", "url": "https://jane.dev"},
            "Jane <j@x.org> (https://jane.dev)",
        ),
        ("Plain String", "Plain String"),
    ],
)
def test_author_forms(author: Any, expected: str) -> None:
    assert parse({"main": "a.js", "author": author}).author == expected


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "not valid JSON"),
        (b"{main: 'a.js'}", "not valid JSON"),
        (b'{"main": "a.js",}', "not valid JSON"),
        (b"\xff\xfe\xfa", "not valid"),
        (b"[" * 100_000, "nested too deeply|not valid JSON"),
        (b'["main"]', "must be a JSON object, not an array"),
        (b'"index.js"', "must be a JSON object, not a string"),
        (b"null", "must be a JSON object, not null"),
    ],
)
def test_not_an_object(raw: bytes, match: str) -> None:
    with pytest.raises(PackageInvalid, match=match):
        parse_package_json(raw)


@pytest.mark.parametrize(
    ("document", "match"),
    [
        ({}, "'main' is required"),
        ({"main": None}, "'main' is required"),
        ({"main": 5}, "'main' must be a string, not a number"),
        ({"main": ["a.js"]}, "'main' must be a string, not an array"),
        ({"main": ""}, "'main' must not be empty"),
        ({"main": "../outside.js"}, "must stay inside the package"),
        ({"main": "lib/../../outside.js"}, "must stay inside the package"),
        ({"main": "lib\\..\\..\\outside.js"}, "must stay inside the package"),
        ({"main": "/etc/passwd"}, "relative to the package"),
        ({"main": "a\x00.js"}, "NUL"),
        ({"main": "a.js", "name": 1}, "'name' must be a string"),
        ({"main": "a.js", "version": 1.0}, "'version' must be a string"),
        ({"main": "a.js", "description": {}}, "'description' must be a string"),
        ({"main": "a.js", "engines": "node"}, "'engines' must be an object"),
        ({"main": "a.js", "engines": {"node": 16}}, "'engines.node' must be a string"),
        ({"main": "a.js", "author": 7}, "'author' must be a string or an object"),
        ({"main": "a.js", "author": {"email": "x@y"}}, "'author.name'"),
        ({"main": "a.js", "author": {"name": "J", "email": 3}}, "'author.email' must be a string"),
        ({"main": "a.js", "keywords": "a,b"}, "'keywords' must be an array of strings"),
        ({"main": "a.js", "keywords": ["a", 2]}, "'keywords' must be an array of strings"),
        ({"main": "a.js", "args": "--x"}, "'args' must be an array"),
        ({"main": "a.js", "repository": 3}, "'repository' must be a string or an object"),
    ],
)
def test_invalid_fields(document: dict[str, Any], match: str) -> None:
    with pytest.raises(PackageInvalid, match=match) as caught:
        parse(document)
    assert caught.value.status == 422


def test_main_kept_as_written() -> None:
    # Node resolves "./index" to index.js; the hub does not require the file to exist.
    assert parse({"main": "./index"}).main == "./index"
    assert parse({"main": "lib/./main.js"}).main == "lib/./main.js"


def test_utf8_with_non_ascii() -> None:
    info = parse_package_json('{"main": "a.js", "description": "zażółć"}'.encode())
    assert info.description == "zażółć"
