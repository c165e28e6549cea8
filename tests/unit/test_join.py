"""``sth join``: the text edit keeps every other line, the result loads, the token stays private."""

from __future__ import annotations

import io
import stat
import tomllib
from pathlib import Path

import pytest

from agent import join
from agent.config import load_config
from agent.main import main as sth_main

SHIPPED = """\
# The hub's configuration. Every option is shown with its default, commented out.
[hub]
# API address and port
# hostname = "127.0.0.1"
# port = 8000

# The manager to link to (sth join writes these)
# cpm_url = ""
# space = ""
# join_token = ""
# cpm_ca = ""
# cpm_fingerprint = ""
# cpm_insecure = false

# [hub.runner_env]
# HTTPS_PROXY = "http://proxy.local:3128"
"""

FPR = "AB" * 32


def args(config: Path, *more: str) -> list[str]:
    return [
        "--config",
        str(config),
        "--cpm-url",
        "wss://cpm.example:9000",
        "--space",
        "factory",
        "--join-token",
        "shj_secret",
        *more,
    ]


def test_fills_the_commented_template(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "sth.toml"
    config.write_text(SHIPPED)
    assert join.main(args(config, "--cpm-fingerprint", FPR)) == 0
    text = config.read_text()
    # Every original line is still there, in order; the new ones sit under their templates.
    assert [line for line in text.splitlines() if line in SHIPPED.splitlines()] == SHIPPED.splitlines()
    assert '# cpm_url = ""\ncpm_url = "wss://cpm.example:9000"\n' in text
    assert '# join_token = ""\njoin_token = "shj_secret"\n' in text
    loaded = load_config(config, {})
    assert (loaded.cpm_url, loaded.space, loaded.join_token) == (
        "wss://cpm.example:9000",
        "factory",
        "shj_secret",
    )
    assert loaded.cpm_fingerprint == FPR
    assert stat.S_IMODE(config.stat().st_mode) & 0o007 == 0
    out = capsys.readouterr().out
    assert "sth -c" in out and "shj_secret" not in out


def test_rejoin_replaces_and_resets_stale_trust(tmp_path: Path) -> None:
    config = tmp_path / "sth.toml"
    config.write_text(SHIPPED)
    assert join.main(args(config, "--cpm-fingerprint", FPR, "--tags", "a, b")) == 0
    assert join.main(args(config, "--cpm-insecure", "--description", 'say "hi"\tthere')) == 0
    text = config.read_text()
    assert text.count("\ncpm_url =") == 1 and text.count("\ncpm_fingerprint =") == 1
    loaded = load_config(config, {})
    assert loaded.cpm_fingerprint == "" and loaded.cpm_insecure is True
    assert loaded.tags == ["a", "b"] and loaded.description == 'say "hi"\tthere'


def test_keeps_other_sections_and_comments(tmp_path: Path) -> None:
    original = (
        "# mine\n[hub]\nport = 9001  # my port\ntags = [\n  'x',\n  'y',\n]\n\n"
        '[hub.runner_env]\nHTTPS_PROXY = "http://p:3128"\n\n[link]\nfoo = 1\n'
    )
    config = tmp_path / "sth.toml"
    config.write_text(original)
    assert join.main(args(config, "--tags", "z")) == 0
    document = tomllib.loads(config.read_text())
    assert document["hub"]["port"] == 9001
    assert document["hub"]["tags"] == ["z"]
    assert document["hub"]["join_token"] == "shj_secret"
    assert document["hub"]["runner_env"] == {"HTTPS_PROXY": "http://p:3128"}
    assert document["link"] == {"foo": 1}
    assert "port = 9001  # my port" in config.read_text() and "# mine" in config.read_text()


def test_top_level_file_stays_top_level(tmp_path: Path) -> None:
    config = tmp_path / "sth.toml"
    config.write_text("port = 9002\n")
    assert join.main(args(config)) == 0
    document = tomllib.loads(config.read_text())
    assert "hub" not in document and document["space"] == "factory" and document["port"] == 9002


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("", "hub"),
        ("# only comments\n", "hub"),
        ('[hub.runner_env]\nA = "b"\n', "hub"),
        ("[other]\nx = 1\n", "hub"),
    ],
)
def test_adds_a_hub_table_when_needed(tmp_path: Path, text: str, where: str) -> None:
    config = tmp_path / "sth.toml"
    config.write_text(text)
    assert join.main(args(config)) == 0
    document = tomllib.loads(config.read_text())
    assert document[where]["space"] == "factory"
    assert load_config(config, {}).join_token == "shj_secret"


def test_new_file_is_private(tmp_path: Path) -> None:
    config = tmp_path / "new.toml"
    assert join.main(args(config)) == 0
    assert stat.S_IMODE(config.stat().st_mode) in (0o600, 0o640)
    assert load_config(config, {}).space == "factory"


def test_token_from_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "sth.toml"
    monkeypatch.setattr("sys.stdin", io.StringIO("shj_from_stdin\n"))
    argv = args(config)
    argv[argv.index("shj_secret")] = "-"
    assert join.main(argv) == 0
    assert load_config(config, {}).join_token == "shj_from_stdin"


def test_bad_settings_leave_the_file_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "sth.toml"
    config.write_text(SHIPPED)
    bad = args(config)
    bad[bad.index("wss://cpm.example:9000")] = "ws://cpm.example:9000"  # plain ws to a remote manager
    assert join.main(bad) == 2
    assert "unencrypted" in capsys.readouterr().err
    assert config.read_text() == SHIPPED
    assert list(tmp_path.iterdir()) == [config]  # no temporary file left


def test_broken_existing_file_is_not_replaced(tmp_path: Path) -> None:
    config = tmp_path / "sth.toml"
    config.write_text("[hub]\nunknown_option = 1\n")
    assert join.main(args(config)) == 2
    assert config.read_text() == "[hub]\nunknown_option = 1\n"


def test_ca_is_copied_beside_the_config(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "sth.toml"
    ca = tmp_path / "downloaded-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert join.main(args(config, "--cpm-ca", str(ca))) == 0
    copied = tmp_path / "etc" / join.CA_FILE_NAME
    assert copied.read_text() == ca.read_text()
    assert load_config(config, {}).cpm_ca == str(copied)


def test_default_path_needs_the_system_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(join, "SYSTEM_CONFIG", tmp_path / "missing.toml")
    argv = args(tmp_path / "x.toml")[2:]  # no --config
    assert join.main(argv) == 2


def test_sth_dispatches_join(tmp_path: Path) -> None:
    config = tmp_path / "sth.toml"
    assert sth_main(["join", *args(config)]) == 0
    assert load_config(config, {}).cpm_url == "wss://cpm.example:9000"
