"""The sync and the async clients offer the same calls, with the same parameters.

Each public method of a sync class has its twin on the async class (a coroutine where
the sync one does I/O; the streams' iterators are named ``aiter_*`` and ``aclose``),
so an example written for one translates to the other word for word.
"""

from __future__ import annotations

import inspect

import pytest

from spacehub import client

PAIRS = [
    (client.HubClient, client.AsyncHubClient),
    (client.SequenceClient, client.AsyncSequenceClient),
    (client.InstanceClient, client.AsyncInstanceClient),
    (client.SpaceClient, client.AsyncSpaceClient),
    (client.ManagerClient, client.AsyncManagerClient),
    (client.ResponseStream, client.AsyncResponseStream),
]

#: sync name -> async name, where Python's protocols differ
RENAMED = {
    "close": "aclose",
    "iter_bytes": "aiter_bytes",
    "iter_lines": "aiter_lines",
    "iter_json": "aiter_json",
    "__enter__": "__aenter__",
    "__exit__": "__aexit__",
    "__iter__": "__aiter__",
}


def public_calls(cls: type) -> dict[str, object]:
    return {
        name: member
        for name, member in inspect.getmembers(cls)
        if (not name.startswith("_") or name in RENAMED or name in RENAMED.values())
        and (callable(member) or isinstance(member, property))
    }


@pytest.mark.parametrize(("sync", "asynchronous"), PAIRS, ids=lambda c: c.__name__)
def test_the_async_client_has_every_call_of_the_sync_one(sync: type, asynchronous: type) -> None:
    sync_calls, async_calls = public_calls(sync), public_calls(asynchronous)
    expected = {RENAMED.get(name, name) for name in sync_calls}
    assert expected - set(async_calls) == set(), f"{asynchronous.__name__} lacks these"
    extra = set(async_calls) - expected
    assert extra == set(), f"{asynchronous.__name__} has calls {sync.__name__} lacks"


@pytest.mark.parametrize(("sync", "asynchronous"), PAIRS, ids=lambda c: c.__name__)
def test_twin_calls_take_the_same_parameters(sync: type, asynchronous: type) -> None:
    for name, member in public_calls(sync).items():
        twin = getattr(asynchronous, RENAMED.get(name, name))
        if isinstance(member, property) or name.startswith("__"):
            continue
        ours = list(inspect.signature(member).parameters)  # type: ignore[arg-type]
        theirs = list(inspect.signature(twin).parameters)
        assert ours == theirs, f"{sync.__name__}.{name}{ours} vs {asynchronous.__name__}{theirs}"
