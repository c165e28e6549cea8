"""The hub's link to its manager: one table of every allowed transition.

Theory of operation
-------------------
A hub with no manager configured stays ``disabled``. With one, the link client is
``connecting`` (dialing the websocket, TLS included) as soon as the hub starts; the
hub never waits for it. Once the websocket is open the hub is ``authenticating``:
the manager sends a challenge and the hub answers with a join (first time) or an
auth, signed with its key. ``welcome`` makes it ``connected``; from then on
heartbeats flow and the manager may open streams into the hub's API.

Any failure (dial, TLS, a timeout, a broken protocol, the link lost) goes to
``backoff``, which waits a jittered, growing delay and tries again
(``connecting``), forever. A refusal the manager says not to retry (an unknown or
used join token, a revoked hub, ...) or a ``revoked`` message goes to ``refused``,
which is final: the hub keeps working alone and says why in its log and
``/status`` until an operator changes its configuration and restarts it.
``STOP`` (the hub shutting down) is allowed from every state but ``disabled``.

Any (state, trigger) pair missing from :data:`TRANSITIONS` is refused with
:class:`InvalidTransition`.
"""

from __future__ import annotations

import enum
from typing import Final

from .. import errors


class LinkState(enum.StrEnum):
    #: no manager configured, or the hub is shutting down
    DISABLED = "disabled"
    #: dialing the manager (TCP, TLS, websocket handshake)
    CONNECTING = "connecting"
    #: websocket open; challenge, join or auth, waiting for welcome
    AUTHENTICATING = "authenticating"
    #: welcomed: heartbeats flow, the manager may open streams
    CONNECTED = "connected"
    #: waiting before the next attempt
    BACKOFF = "backoff"
    #: the manager refused the hub for good (or revoked it); no more attempts
    REFUSED = "refused"


class LinkTrigger(enum.Enum):
    #: the hub started with a manager configured
    START = enum.auto()
    #: the websocket is open
    DIALED = enum.auto()
    #: the manager sent welcome
    WELCOMED = enum.auto()
    #: any failure: dial, TLS, timeout, protocol, link lost, refused with retry
    FAILED = enum.auto()
    #: refused with retry false, or revoked
    REFUSED = enum.auto()
    #: the backoff delay is over
    RETRY = enum.auto()
    #: the hub is shutting down
    STOP = enum.auto()


class InvalidTransition(errors.InvalidTransition):
    """The link's state table has no transition for this trigger now."""

    def __init__(self, state: LinkState, trigger: LinkTrigger) -> None:
        super().__init__(f"{trigger.name} is not allowed while the link is {state.value}")
        self.state = state
        self.trigger = trigger


S = LinkState
T = LinkTrigger

TRANSITIONS: Final[dict[tuple[LinkState, LinkTrigger], LinkState]] = {
    (S.DISABLED, T.START): S.CONNECTING,
    (S.CONNECTING, T.DIALED): S.AUTHENTICATING,
    (S.CONNECTING, T.FAILED): S.BACKOFF,
    (S.CONNECTING, T.STOP): S.DISABLED,
    (S.AUTHENTICATING, T.WELCOMED): S.CONNECTED,
    (S.AUTHENTICATING, T.FAILED): S.BACKOFF,
    (S.AUTHENTICATING, T.REFUSED): S.REFUSED,
    (S.AUTHENTICATING, T.STOP): S.DISABLED,
    (S.CONNECTED, T.FAILED): S.BACKOFF,
    # A revoked message arrives on a connected link.
    (S.CONNECTED, T.REFUSED): S.REFUSED,
    (S.CONNECTED, T.STOP): S.DISABLED,
    (S.BACKOFF, T.RETRY): S.CONNECTING,
    (S.BACKOFF, T.STOP): S.DISABLED,
    (S.REFUSED, T.STOP): S.DISABLED,
}

#: States in which the client tries, or will try again, to reach the manager.
TRYING: Final = frozenset({S.CONNECTING, S.AUTHENTICATING, S.BACKOFF})


def next_state(state: LinkState, trigger: LinkTrigger) -> LinkState:
    """The state after ``trigger`` in ``state``; raises :class:`InvalidTransition`."""
    try:
        return TRANSITIONS[state, trigger]
    except KeyError:
        raise InvalidTransition(state, trigger) from None
