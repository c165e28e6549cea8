"""The Instance lifecycle: one table of every allowed transition.

Theory of operation
-------------------
An Instance is created ``initializing`` when a start request is accepted. Once its
runner process exists it is ``starting``; the runner's handshake (PING) makes it
``running``. From ``running`` a stop request makes it ``stopping`` (the sequence's
stop handler runs; a keep-alive from the sequence takes it back to ``running``) and
a kill request makes it ``killing``. Whatever the state, the runner process ending
makes it ``completed`` or ``errored``: which one depends on how it ended
(``EXITED_CLEAN``: exit code 0 or the end the hub asked for; ``EXITED_FAILED``:
anything else) and on the state it was in; for example a kill that ends the process
with SIGKILL still counts as ``completed``, as the user asked for it.

A hub that starts takes back the instances a hub before it left running: they
are created ``initializing`` and ``ADOPTED`` makes them ``running`` at once (their
handshake happened under the hub before); one that ended meanwhile then takes the
exit it had.
``completed`` and ``errored`` are final. ``unknown`` is never held by a hub: the
manager shows it for instances of a hub whose link is down.

Any (state, trigger) pair missing from :data:`TRANSITIONS` is refused with
:class:`InvalidTransition`; the API turns refusals into a 400/409 before they
happen where a user can cause them.
"""

from __future__ import annotations

import enum
from typing import Final

from .. import errors


class Status(enum.StrEnum):
    #: accepted, runner process not yet spawned
    INITIALIZING = "initializing"
    #: runner process spawned, handshake not yet done
    STARTING = "starting"
    #: handshake done; the sequence runs
    RUNNING = "running"
    #: stop requested; the sequence's stop handler runs
    STOPPING = "stopping"
    #: kill requested; the process group is being signalled
    KILLING = "killing"
    #: ended as expected (finished, stopped or killed on request)
    COMPLETED = "completed"
    #: ended by a failure
    ERRORED = "errored"
    #: shown by the manager when the hub's link is down; never held by a hub
    UNKNOWN = "unknown"


class Trigger(enum.Enum):
    SPAWNED = enum.auto()
    HANDSHAKE = enum.auto()
    STOP = enum.auto()
    KEEP_ALIVE = enum.auto()
    KILL = enum.auto()
    EXITED_CLEAN = enum.auto()
    EXITED_FAILED = enum.auto()
    #: a hub took back an instance a hub before it left running (its handshake was then)
    ADOPTED = enum.auto()


class InvalidTransition(errors.InvalidTransition):
    """An instance's lifecycle table has no transition for this trigger now."""

    def __init__(self, status: Status, trigger: Trigger) -> None:
        super().__init__(f"{trigger.name} is not allowed while {status.value}")
        self.state = status
        self.trigger = trigger


S = Status
T = Trigger

TRANSITIONS: Final[dict[tuple[Status, Trigger], Status]] = {
    (S.INITIALIZING, T.SPAWNED): S.STARTING,
    (S.INITIALIZING, T.ADOPTED): S.RUNNING,
    (S.INITIALIZING, T.KILL): S.KILLING,
    (S.INITIALIZING, T.EXITED_CLEAN): S.ERRORED,
    (S.INITIALIZING, T.EXITED_FAILED): S.ERRORED,
    (S.STARTING, T.HANDSHAKE): S.RUNNING,
    (S.STARTING, T.KILL): S.KILLING,
    # Ending before the handshake is a failed start, however the process exited.
    (S.STARTING, T.EXITED_CLEAN): S.ERRORED,
    (S.STARTING, T.EXITED_FAILED): S.ERRORED,
    (S.RUNNING, T.STOP): S.STOPPING,
    (S.RUNNING, T.KEEP_ALIVE): S.RUNNING,
    (S.RUNNING, T.KILL): S.KILLING,
    (S.RUNNING, T.EXITED_CLEAN): S.COMPLETED,
    (S.RUNNING, T.EXITED_FAILED): S.ERRORED,
    (S.STOPPING, T.STOP): S.STOPPING,
    (S.STOPPING, T.KEEP_ALIVE): S.RUNNING,
    (S.STOPPING, T.KILL): S.KILLING,
    (S.STOPPING, T.EXITED_CLEAN): S.COMPLETED,
    # The stop window ran out and the hub ended the process: the user asked for it.
    (S.STOPPING, T.EXITED_FAILED): S.COMPLETED,
    (S.KILLING, T.KILL): S.KILLING,
    (S.KILLING, T.EXITED_CLEAN): S.COMPLETED,
    (S.KILLING, T.EXITED_FAILED): S.COMPLETED,
}

#: States in which the runner process may still be alive.
LIVE: Final = frozenset({S.INITIALIZING, S.STARTING, S.RUNNING, S.STOPPING, S.KILLING})
#: States an Instance never leaves.
FINAL: Final = frozenset({S.COMPLETED, S.ERRORED})


def next_status(status: Status, trigger: Trigger) -> Status:
    """The state after ``trigger`` in ``status``; raises :class:`InvalidTransition`."""
    try:
        return TRANSITIONS[status, trigger]
    except KeyError:
        raise InvalidTransition(status, trigger) from None
