"""The hub's console log: text for a terminal, priority-prefixed lines for journald."""

from __future__ import annotations

import logging

import pytest

from agent.hublog import setup_logging


def _emit(capsys: pytest.CaptureFixture[str]) -> str:
    logger = setup_logging("debug")
    logger.getChild("sub").warning("disk %s", "low")
    logger.getChild("sub").debug("details")
    return capsys.readouterr().err


def test_text_lines_outside_systemd(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    lines = _emit(capsys).splitlines()
    assert lines[0].endswith("Z WARN  sub: disk low") and lines[1].endswith("Z DEBUG sub: details")
    assert "\x1b[" not in "".join(lines)


def test_priority_prefix_under_journald(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    assert _emit(capsys).splitlines() == ["<4>WARN sub: disk low", "<7>DEBUG sub: details"]
    logging.getLogger("agent").handlers.clear()
