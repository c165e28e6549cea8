"""Every (state, trigger) pair of the Instance lifecycle, checked against the table."""

from __future__ import annotations

import itertools

import pytest

from agent.instances.lifecycle import (
    FINAL,
    LIVE,
    TRANSITIONS,
    InvalidTransition,
    Status,
    Trigger,
    next_status,
)

EXPECTED: dict[tuple[Status, Trigger], Status] = {
    (Status.INITIALIZING, Trigger.SPAWNED): Status.STARTING,
    (Status.INITIALIZING, Trigger.ADOPTED): Status.RUNNING,
    (Status.INITIALIZING, Trigger.KILL): Status.KILLING,
    (Status.INITIALIZING, Trigger.EXITED_CLEAN): Status.ERRORED,
    (Status.INITIALIZING, Trigger.EXITED_FAILED): Status.ERRORED,
    (Status.STARTING, Trigger.HANDSHAKE): Status.RUNNING,
    (Status.STARTING, Trigger.KILL): Status.KILLING,
    (Status.STARTING, Trigger.EXITED_CLEAN): Status.ERRORED,
    (Status.STARTING, Trigger.EXITED_FAILED): Status.ERRORED,
    (Status.RUNNING, Trigger.STOP): Status.STOPPING,
    (Status.RUNNING, Trigger.KEEP_ALIVE): Status.RUNNING,
    (Status.RUNNING, Trigger.KILL): Status.KILLING,
    (Status.RUNNING, Trigger.EXITED_CLEAN): Status.COMPLETED,
    (Status.RUNNING, Trigger.EXITED_FAILED): Status.ERRORED,
    (Status.STOPPING, Trigger.STOP): Status.STOPPING,
    (Status.STOPPING, Trigger.KEEP_ALIVE): Status.RUNNING,
    (Status.STOPPING, Trigger.KILL): Status.KILLING,
    (Status.STOPPING, Trigger.EXITED_CLEAN): Status.COMPLETED,
    (Status.STOPPING, Trigger.EXITED_FAILED): Status.COMPLETED,
    (Status.KILLING, Trigger.KILL): Status.KILLING,
    (Status.KILLING, Trigger.EXITED_CLEAN): Status.COMPLETED,
    (Status.KILLING, Trigger.EXITED_FAILED): Status.COMPLETED,
}


@pytest.mark.parametrize(("status", "trigger"), list(itertools.product(Status, Trigger)))
def test_every_pair(status: Status, trigger: Trigger) -> None:
    if (status, trigger) in EXPECTED:
        assert next_status(status, trigger) is EXPECTED[status, trigger]
    else:
        with pytest.raises(InvalidTransition):
            next_status(status, trigger)


def test_table_is_exactly_the_expected_one() -> None:
    assert TRANSITIONS == EXPECTED


def test_final_states_have_no_way_out() -> None:
    for status in FINAL:
        assert not [t for (s, t) in TRANSITIONS if s is status]


def test_every_live_state_can_end() -> None:
    for status in LIVE:
        assert next_status(status, Trigger.EXITED_FAILED) in FINAL
        assert next_status(status, Trigger.EXITED_CLEAN) in FINAL


def test_unknown_is_never_entered() -> None:
    assert Status.UNKNOWN not in TRANSITIONS.values()
