"""Every (state, trigger) pair of the hub's link state machine, checked against the table."""

from __future__ import annotations

import itertools

import pytest

from agent.link.state import TRANSITIONS, TRYING, InvalidTransition, LinkState, LinkTrigger, next_state

S = LinkState
T = LinkTrigger

EXPECTED: dict[tuple[LinkState, LinkTrigger], LinkState] = {
    (S.DISABLED, T.START): S.CONNECTING,
    (S.CONNECTING, T.DIALED): S.AUTHENTICATING,
    (S.CONNECTING, T.FAILED): S.BACKOFF,
    (S.CONNECTING, T.STOP): S.DISABLED,
    (S.AUTHENTICATING, T.WELCOMED): S.CONNECTED,
    (S.AUTHENTICATING, T.FAILED): S.BACKOFF,
    (S.AUTHENTICATING, T.REFUSED): S.REFUSED,
    (S.AUTHENTICATING, T.STOP): S.DISABLED,
    (S.CONNECTED, T.FAILED): S.BACKOFF,
    (S.CONNECTED, T.REFUSED): S.REFUSED,
    (S.CONNECTED, T.STOP): S.DISABLED,
    (S.BACKOFF, T.RETRY): S.CONNECTING,
    (S.BACKOFF, T.STOP): S.DISABLED,
    (S.REFUSED, T.STOP): S.DISABLED,
}


@pytest.mark.parametrize(("state", "trigger"), list(itertools.product(LinkState, LinkTrigger)))
def test_every_pair(state: LinkState, trigger: LinkTrigger) -> None:
    if (state, trigger) in EXPECTED:
        assert next_state(state, trigger) is EXPECTED[state, trigger]
    else:
        with pytest.raises(InvalidTransition, match=trigger.name):
            next_state(state, trigger)


def test_table_is_exactly_the_expected_one() -> None:
    assert TRANSITIONS == EXPECTED


def test_refused_is_left_only_by_stopping() -> None:
    assert [t for (s, t) in TRANSITIONS if s is S.REFUSED] == [T.STOP]


def test_every_state_can_stop_but_disabled() -> None:
    for state in LinkState:
        assert ((state, T.STOP) in TRANSITIONS) is (state is not S.DISABLED)


def test_trying_states_lead_back_to_connecting() -> None:
    assert {S.CONNECTING, S.AUTHENTICATING, S.BACKOFF} == TRYING
    assert next_state(next_state(S.CONNECTING, T.FAILED), T.RETRY) is S.CONNECTING
