"""Who is signed in to the console: sessions, their CSRF tokens, one-time login links.

All of it is in this manager's memory: a restart signs everyone out, which a console can
afford, and no session secret is ever written to disk. The API token a user signed in with
stays here (the console acts with it, and a revoked token ends the session at its next
request); pages never carry it. Cookies carry only the session id, pages only the session's
CSRF token.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "LOGIN_LINK_SECONDS",
    "MAX_LOGIN_LINKS",
    "MAX_SESSIONS",
    "SESSION_SECONDS",
    "ConsoleSession",
    "ConsoleSessions",
    "same_secret",
]

#: How long a console session lasts from sign-in (the cookie's Max-Age too).
SESSION_SECONDS: Final = 12 * 3600
#: Sessions kept at once; past it, the oldest is signed out.
MAX_SESSIONS: Final = 256
#: How long a one-time login link (``make run`` prints one) may wait to be opened.
LOGIN_LINK_SECONDS: Final = 600
#: Login links not yet used, kept at once; past it, the oldest is dropped.
MAX_LOGIN_LINKS: Final = 64


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a secret from a request with the one we hold."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


@dataclass(eq=False, slots=True)
class ConsoleSession:
    id: str
    #: the API token it signed in with (never rendered)
    token: str = field(repr=False)
    #: the spaces that token opens, the current one first
    spaces: list[str]
    csrf: str
    expires: float

    @property
    def space(self) -> str:
        return self.spaces[0]


@dataclass(frozen=True, slots=True)
class _LoginLink:
    space: str
    token: str = field(repr=False)
    expires: float


class ConsoleSessions:
    """The console's signed-in sessions and pending login links; ``now`` is wall-clock seconds."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._sessions: OrderedDict[str, ConsoleSession] = OrderedDict()
        self._links: OrderedDict[str, _LoginLink] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def sign_in(self, token: str, spaces: list[str]) -> ConsoleSession:
        """A new session for a token that opens ``spaces`` (at least one)."""
        if not spaces:
            raise ValueError("a session needs a space")
        session = ConsoleSession(
            id=secrets.token_urlsafe(32),
            token=token,
            spaces=list(spaces),
            csrf=secrets.token_urlsafe(32),
            expires=self._now() + SESSION_SECONDS,
        )
        self._sessions[session.id] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str | None) -> ConsoleSession | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if self._now() >= session.expires:
            del self._sessions[session_id]
            return None
        return session

    def sign_out(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def create_login_link(self, space: str, token: str) -> str:
        """A one-time code that signs its opener in to ``space`` with ``token``."""
        code = secrets.token_urlsafe(32)
        self._links[code] = _LoginLink(space, token, self._now() + LOGIN_LINK_SECONDS)
        while len(self._links) > MAX_LOGIN_LINKS:
            self._links.popitem(last=False)
        return code

    def redeem_login_link(self, code: str) -> tuple[str, str] | None:
        """``(space, token)`` once for a live code; None for a used, expired or unknown one."""
        link = self._links.pop(code, None)
        if link is None or self._now() >= link.expires:
            return None
        return link.space, link.token
