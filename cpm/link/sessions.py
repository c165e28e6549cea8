"""Hubs' links on the manager: join and auth, one session per hub, health, the proxy.

Theory of operation
-------------------
A hub dials ``/api/v1/link``; the ASGI app hands the websocket to
:meth:`HubSessions.serve`, which accepts it and owns that link for its whole life
(so the link's tasks live in the task hypercorn runs the websocket in, and end
with it). An idle link is mostly its chain of suspended frames, so that chain is
kept short: the app returns ``serve``'s coroutine rather than awaiting it, and
``serve`` runs the session in its own frame.

1. **Handshake** (docs/link.md), by hand on the sans-I/O connection before any
   stream may exist: send ``challenge``; read one control message, ``join`` (a
   one-time join token and a new public key) or ``auth`` (a hub id); check the
   signature over ``challenge_payload(nonce, hub_id, space)``; answer ``welcome``,
   or ``refused`` with a stable code and close with 4403. All of it within
   :data:`HANDSHAKE_TIMEOUT`.
2. **Session**: a :class:`~spacehub.server.link.session.LinkSession` runs the link; its
   control messages are handled in place by :meth:`HubSession.on_control`
   (heartbeats keep the last load and summary in the hub's :class:`HubReport`),
   so a link costs no task beyond the one hypercorn runs it in. A second link of
   the same hub replaces the first, which is closed.
3. **Liveness**, one message each way per interval: the hub's heartbeats prove the
   link to the manager, which closes a link on which nothing at all came for
   ``heartbeat_interval + pong_timeout`` (an ASGI websocket gives the app no
   deadline of its own); the manager's ``{"type": "ping"}`` every ``ping_interval``
   proves it to the hub, which drops a link silent for ``pingInterval +
   pongTimeout``. The welcome's ``"answerPings": false`` tells the hub not to answer
   pings: a pong would only repeat what its heartbeats already say, and at 5,000
   idle links it was a third of the manager's messages. (A hub that answers anyway,
   as older ones do, is not wrong: every message counts as a sign of life.) One
   scheduler task does this for every link, from a heap holding one due time per
   link, waking a little after the earliest due time so that links coming due
   together share one wakeup (:data:`PING_BATCH_FRACTION`); each ping is sent by a
   short task of its own, so a hub that stopped reading delays nobody else. A hub
   is *healthy*
   while its link is up and its last heartbeat (or the connection, before the
   first one) is at most ``missed_heartbeats * heartbeat_interval`` old.
4. **Watchdog**: logs health changes and closes the links of hubs revoked in the
   registry meanwhile (``cpm hub revoke`` writes the SQLite file directly). The
   registry is read only when another process has written it (SQLite's
   ``PRAGMA data_version``), so an idle fleet costs no periodic scan of it.

Idle links are the common case (thousands per manager), so what a link keeps
is small: health and ping state live in memory and reach SQLite only when a link
comes up or goes down; the last load is kept as compact JSON, and an empty
summary as one shared empty mapping.

When a link ends, the registry records ``lastDisconnected`` (unless a newer link
of the same hub took over); the hub's last :class:`HubReport` stays in memory
(not the link itself), so its instances are still listed, as ``unknown``, never
killed.

The proxy (:func:`forward`) carries one HTTP request into the hub over a new
stream: the request body goes up while the response comes down, each direction
flow-controlled on its own, and the response body is read from the link only as
fast as the HTTP client takes it. A call without a body first waits a moment
(:data:`QUICK_ANSWER_SECONDS`) for a whole short answer, which then goes out with no
task watching the client: most calls are that, and the watcher was a tenth of the
manager's CPU per call.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, TypeVar, cast

import trio

from spacehub.models import HubRecord, LoadCheck
from spacehub.protocol.auth import challenge_payload, make_challenge, verify_challenge
from spacehub.protocol.control import (
    Auth,
    Challenge,
    ControlError,
    Conversation,
    Heartbeat,
    Join,
    Leaving,
    Ping,
    Pong,
    Refused,
    Revoked,
    Role,
    Stage,
    Welcome,
)
from spacehub.protocol.link import (
    BATCH_FEATURE,
    ControlReceived,
    LinkConnection,
    LinkError,
    LinkProtocolError,
)
from spacehub.server.http import Request, Send
from spacehub.server.link.session import (
    InboundStream,
    LinkClosed,
    LinkSession,
    OutboundStream,
    StreamAborted,
)

from .. import __version__
from ..config import ManagerConfig
from ..errors import (
    BadRequest,
    Conflict,
    HubLinkFailed,
    HubNotFound,
    HubRevoked,
    HubUnavailable,
    JoinRefused,
    ManagerError,
    Refusal,
    SpaceNotFound,
)
from ..loadhistory import LoadHistory, load_percentages
from ..registry import Hub, Registry, iso_utc
from .transport import (
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_PROTOCOL,
    AsgiWebSocketTransport,
)

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "HubReport",
    "HubSession",
    "HubSessions",
    "RemoteHub",
    "forward",
    "forward_on",
    "remote_hubs",
]

logger = logging.getLogger("cpm.link")
T = TypeVar("T")

#: Seconds a hub has, once connected, to answer the challenge.
HANDSHAKE_TIMEOUT: Final = 10.0
#: Seconds a take-over waits for the replica that held the hub to close its old link.
TAKEOVER_NOTICE_SECONDS: Final = 1.0
#: Seconds between the watchdog's rounds (health changes, revocations).
WATCHDOG_INTERVAL: Final = 2.0
#: Seconds a refusal or a revocation notice gets to leave before the link is closed.
NOTICE_TIMEOUT: Final = 2.0
#: Ended links the ping heap may still pin before it is compacted (see _forget_schedule).
MAX_STALE_DUE: Final = 64
#: The ping scheduler sleeps this part of a ping interval past its earliest due entry, so
#: that links coming due together are served in one wakeup: at 5,000 links and 10 s, a
#: few wakeups a second instead of one per link (each an epoll round and a pass of trio's
#: run loop: together ~6 % of a core). Pings and silence checks run up to this late.
PING_BATCH_FRACTION: Final = 1 / 40
#: The proxy's quick path (see :func:`forward`): seconds a bodiless request waits for the
#: whole answer before the proxy watches its client too, and the most body it takes whole.
#: Measured on GET /version through the Space: 0.08 ms of the manager's ~0.95 ms per call.
QUICK_ANSWER_SECONDS: Final = 0.25
QUICK_ANSWER_BYTES: Final = 64 * 1024
#: The parts of a heartbeat's summary the Space API shows.
SUMMARY_KINDS: Final = ("sequences", "instances", "topics", "history")
#: Request headers never forwarded to a hub: hop-by-hop ones, and the caller's
#: credentials for the manager (the hub trusts its link, not the caller).
DROP_REQUEST_HEADERS: Final = frozenset(
    {
        "authorization",
        "connection",
        "host",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Response headers never passed back: hop-by-hop ones (hypercorn frames the body itself).
DROP_RESPONSE_HEADERS: Final = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)


#: The items of a summary that lists nothing; shared by every such hub, never changed.
_NO_ITEMS: Final[dict[str, list[dict[str, Any]]]] = {}


def _summary_items(summary: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The summary's non-empty ``sequences``, ``instances`` and ``topics`` (objects only)."""
    items: dict[str, list[dict[str, Any]]] = {}
    for kind in SUMMARY_KINDS:
        values = summary.get(kind)
        if isinstance(values, list):
            kept = [item for item in values if isinstance(item, dict)]
            if kept:
                items[kind] = kept
    return items or _NO_ITEMS


@dataclass(eq=False, slots=True)
class HubReport:
    """What a hub last told this manager; kept after its link ends, until it links again."""

    hub_id: str
    space: str
    version: str = ""
    #: trio clock, for health; wall clock for records
    last_heartbeat: float | None = None
    last_heartbeat_wall: float | None = None
    #: the last heartbeat's load, as compact JSON (a parsed one is ~2 KB per hub)
    load_json: str | None = None
    summary_items: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: _NO_ITEMS)
    #: the last hour's load, a point a minute (the console's chart); made on the first load
    history: LoadHistory | None = None

    @property
    def load(self) -> dict[str, Any] | None:
        return None if self.load_json is None else cast(dict[str, Any], json.loads(self.load_json))

    def items(self, kind: str) -> list[dict[str, Any]]:
        """The last summary's ``sequences``, ``instances`` or ``topics`` (objects only)."""
        return self.summary_items.get(kind, [])

    def heartbeat(self, message: Heartbeat) -> None:
        self.last_heartbeat = trio.current_time()
        self.last_heartbeat_wall = time.time()
        if message.load is not None:
            self.load_json = json.dumps(message.load, separators=(",", ":"))
            if self.history is None:
                self.history = LoadHistory()
            self.history.add(self.last_heartbeat_wall, *load_percentages(message.load))
        if message.summary is not None:
            self.summary_items = _summary_items(message.summary)


@dataclass(frozen=True, slots=True)
class RemoteHub:
    """A hub whose link another replica holds: its state and report there."""

    state: str
    report: HubReport


def remote_hubs(space: str, raw: object) -> dict[str, RemoteHub]:
    """Another replica's :meth:`HubSessions.reports`, read defensively (what does not fit is left out)."""
    hubs: dict[str, RemoteHub] = {}
    if not isinstance(raw, dict):
        return hubs
    for hub_id, entry in raw.items():
        if not isinstance(entry, dict) or entry.get("state") not in ("connected", "unhealthy"):
            continue
        version, last, load, items = (entry.get(k) for k in ("version", "lastHeartbeat", "load", "items"))
        report = HubReport(hub_id, space, version if isinstance(version, str) else "")
        if isinstance(last, int | float) and not isinstance(last, bool):
            report.last_heartbeat_wall = float(last)
        if isinstance(load, str):
            report.load_json = load
        if isinstance(items, dict):
            report.summary_items = _summary_items(items)
        hubs[hub_id] = RemoteHub(entry["state"], report)
    return hubs


@dataclass(eq=False, slots=True)
class HubSession:
    """One connected hub: its link, its report, and the state of our pings."""

    hub_id: str
    space: str
    transport: AsgiWebSocketTransport
    #: trio clock
    connected_at: float
    report: HubReport
    #: the ownership epoch this link was admitted with (cpm/replicas.py: fencing)
    epoch: int = 0
    link: LinkSession = field(init=False)
    connected: bool = True
    was_healthy: bool = True
    #: pings sent (each carries the count as its nonce)
    pings: int = 0
    #: trio time the next ping is due
    next_ping: float = 0.0
    #: set once the link is being closed for silence
    closing: bool = False
    #: why the hub said it is leaving (control message ``leaving``), if it did
    leaving: str | None = None
    #: the control conversation, past the handshake (linked)
    conversation: Conversation = field(default_factory=lambda: Conversation(Role.MANAGER, Stage.LINKED))

    def healthy(self, now: float, window: float) -> bool:
        if not self.connected:
            return False
        last = self.report.last_heartbeat
        since = last if last is not None else self.connected_at
        return now - since <= window

    def on_control(self, raw: dict[str, Any]) -> None:
        """A control message from the hub, handled in the link's read loop (never waits)."""
        try:
            message = self.conversation.received(raw)
        except ControlError as exc:
            raise LinkProtocolError(f"hub {self.hub_id}: {exc}") from None
        if isinstance(message, Heartbeat):
            self.report.heartbeat(message)
        elif isinstance(message, Leaving):  # the hub stops on purpose; its link closes next
            self.leaving = message.reason or "it is stopping"
        elif not isinstance(message, Pong):  # pongs: a sign of life like any message
            logger.debug("hub %s: control message %r ignored", self.hub_id, message.type)

    async def close(self, reason: str, notice: Revoked | None = None, code: int = CLOSE_NORMAL) -> None:
        """Close the link (sending ``notice`` first, if given) and end its task."""
        logger.info("closing the link of hub %s: %s", self.hub_id, reason)
        if notice is not None and not self.link.closed:
            with trio.move_on_after(NOTICE_TIMEOUT):
                with contextlib.suppress(LinkClosed, LinkError):
                    await self.link.send_control(self.conversation.send(notice))
        await self.transport.aclose(code, reason[:120])
        self.link.close()  # cancels the session's run(): the link's task ends


class HubSessions:
    """Every hub link of this manager, and what each hub last reported."""

    def __init__(self, registry: Registry, config: ManagerConfig, manager_id: str) -> None:
        self.registry = registry
        self.config = config
        self.manager_id = manager_id
        self._live: dict[str, HubSession] = {}
        #: the latest report of every hub seen since start, live or not
        self._last: dict[str, HubReport] = {}
        #: (due time, tie-breaker, session): when the scheduler next looks at a session's pings
        self._due: list[tuple[float, int, HubSession]] = []
        self._order = itertools.count()
        #: links ended since the heap was last compacted (see _forget_schedule)
        self._stale_due = 0
        self._wakeup = trio.Event()
        #: the registry's data version when the watchdog last read the hubs
        self._seen_version: int | None = None
        #: the registry's data version as last read (None: unreadable now); the API's token
        #: cache keys on it when the registry is shared (cpm/api/tokens.py)
        self.registry_version: int | None = None
        #: links closed because another replica took their hub over (metrics)
        self.links_fenced = 0
        #: every hub's (space, revoked reason) and (owner replica, epoch), as last read: used
        #: while the registry's database cannot be reached
        self.known_standing: dict[str, tuple[str, str | None]] = {}
        self.known_owners: dict[str, tuple[str, int]] = {}
        #: links accepted and ended since start (metrics)
        self.links_opened = 0
        self.links_closed = 0
        #: told each registry call's name and seconds (metrics)
        self.on_db: Callable[[str, float], None] | None = None
        #: told every hub's (space, revoked reason) when the registry changed (cpm/topics.py
        #: stops keeping records for revoked hubs)
        self.on_standing: Callable[[dict[str, tuple[str, str | None]]], None] | None = None
        #: told (replica, hub, epoch) when a hub's link comes up here while another replica held
        #: it (cpm/replicas.py tells that replica to let its old link go)
        self.on_taken_over: Callable[[str, str, int], Awaitable[None]] | None = None
        #: serves the streams hubs open (Space-wide topics, cpm/topics.py): hub id, space, stream
        self.on_hub_stream: Callable[[str, str, InboundStream], Awaitable[None]] | None = None

    @property
    def health_window(self) -> float:
        return self.config.missed_heartbeats * self.config.heartbeat_interval

    @property
    def silence_limit(self) -> float:
        """Seconds a link may carry nothing from its hub before it is closed."""
        return self.config.heartbeat_interval + self.config.pong_timeout

    async def db(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a registry call in a worker thread: another process may hold the write lock."""
        began = time.monotonic()
        try:
            return await trio.to_thread.run_sync(partial(call, *args, **kwargs))
        finally:
            if self.on_db is not None:
                self.on_db(getattr(call, "__name__", "call"), time.monotonic() - began)

    async def cut(self, hub: str) -> list[str]:
        """Close the links of ``hub`` ("*": all) at once, as a failing network would (fault
        injection, cpm/faults.py); the ids of the hubs cut."""
        chosen = [s for s in list(self._live.values()) if hub in ("*", s.hub_id)]
        for session in chosen:
            await session.close("fault injected: link cut", code=CLOSE_INTERNAL)
        return [session.hub_id for session in chosen]

    def open_streams(self) -> int:
        """Streams open on every link now (calls being forwarded, tails)."""
        return sum(session.link.open_streams for session in self._live.values())

    def heartbeat_ages(self) -> list[float]:
        """Seconds since each linked hub's last heartbeat (hubs yet to send one left out)."""
        now = trio.current_time()
        return [
            now - session.report.last_heartbeat
            for session in self._live.values()
            if session.report.last_heartbeat is not None
        ]

    # -- queries for the API ----------------------------------------------------------------

    def live(self, hub_id: str) -> HubSession | None:
        return self._live.get(hub_id)

    def last_report(self, hub_id: str) -> HubReport | None:
        """What the hub last reported (kept after its link ends, until it links again)."""
        return self._last.get(hub_id)

    def state(self, hub_id: str) -> str:
        """connected: linked and heartbeating; unhealthy: linked, heartbeats late; disconnected: no link."""
        live = self._live.get(hub_id)
        if live is None:
            return "disconnected"
        return "connected" if live.healthy(trio.current_time(), self.health_window) else "unhealthy"

    def record(self, hub: Hub, remote: Mapping[str, RemoteHub] | None = None) -> HubRecord:
        """The Space API's hub record: the registry's, plus what the link knows (the link
        here, or the one another replica holds: ``remote``, see cpm/replicas.py)."""
        record = hub.record()
        live = self._live.get(hub.id)
        last = self._last.get(hub.id)
        state = self.state(hub.id)
        elsewhere = remote.get(hub.id) if remote and live is None else None
        if elsewhere is not None:
            last, state = elsewhere.report, elsewhere.state
        record["healthy"] = state == "connected"
        record["isConnectionActive"] = live is not None or elsewhere is not None
        record["state"] = state
        seen = [t for t in (hub.last_connected, hub.last_disconnected) if t is not None]
        if last is not None and last.last_heartbeat_wall is not None:
            seen.append(last.last_heartbeat_wall)
        record["lastSeen"] = iso_utc(max(seen)) if seen else None
        record["selfHosted"] = True
        if hub.revoked_at is not None:
            record["revoked"] = iso_utc(hub.revoked_at)
            record["disconnectReason"] = f"revoked: {hub.revoked_reason or ''}".rstrip(": ")
        if last is not None:
            record["version"] = last.version
            record["load"] = cast(LoadCheck | None, last.load)
            if last.last_heartbeat_wall is not None:
                record["lastHeartbeat"] = iso_utc(last.last_heartbeat_wall)
            record["sequences"] = [item.get("id") for item in last.items("sequences")]
            record["instances"] = [item.get("id") for item in last.items("instances")]
            record["topics"] = [item.get("name") for item in last.items("topics")]
        return record

    def aggregate(
        self,
        space: str,
        kind: str,
        hubs: Collection[str],
        remote: Mapping[str, RemoteHub] | None = None,
    ) -> list[dict[str, Any]]:
        """``sequences``, ``instances`` or ``topics`` over the space's hubs, each naming its hub.

        Connected hubs give their last heartbeat's summary (``remote``: those linked to
        other replicas); for ``instances``, hubs whose link is down give their last known
        instances with ``"status": "unknown"``. Only the hubs named in ``hubs`` (the space's
        hubs that are not revoked) are counted.
        """
        items: list[dict[str, Any]] = []
        reports = dict(self._last)
        for hub_id, elsewhere in (remote or {}).items():
            if hub_id not in self._live:
                reports[hub_id] = elsewhere.report
        for hub_id in sorted(reports):
            report = reports[hub_id]
            if report.space != space or hub_id not in hubs:
                continue
            live = self._live.get(hub_id)
            connected = (live is not None and live.report is report) or (
                remote is not None and hub_id in remote and live is None
            )
            if not connected and kind not in ("instances", "history"):
                continue
            for item in report.items(kind):
                entry = {**item, "hub": hub_id}
                if not connected and kind == "instances":
                    entry["status"] = "unknown"
                items.append(entry)
        if kind == "history":  # newest first, over every hub
            items.sort(key=lambda item: str(item.get("ended") or ""), reverse=True)
        return items

    # -- one link ---------------------------------------------------------------------------

    async def serve(self, transport: AsgiWebSocketTransport, peer: str = "?") -> None:
        """Own one websocket until it ends: accept it, admit the hub, then run its session.
        The session runs in this frame, not a callee's: an idle link keeps every suspended
        frame of its chain for as long as it lives, and a manager holds thousands."""
        connection = LinkConnection("manager")
        admitted = await self._admit(connection, transport, peer)
        if admitted is None:
            return
        hub_id, space, version, batching, epoch = admitted
        transport.hub_id = hub_id
        now = trio.current_time()
        session = HubSession(hub_id, space, transport, now, HubReport(hub_id, space, version), epoch)
        on_stream = None if self.on_hub_stream is None else partial(self.on_hub_stream, hub_id, space)
        link = session.link = LinkSession(
            connection, transport, on_control_nowait=session.on_control, on_stream=on_stream
        )
        link.batching = batching
        old = self._live.get(hub_id)
        self._live[hub_id] = session
        self._last[hub_id] = session.report
        self._schedule(session, now)  # the first ping goes out at once
        self.links_opened += 1
        logger.info(
            "hub %s connected (space %s, sth %s)",
            hub_id,
            space,
            version or "?",
            extra={"hub": hub_id, "space": space},
        )
        try:
            if old is not None:
                await old.close("replaced by a newer link of the same hub")
            await link.run()
        finally:
            session.connected = False
            self.links_closed += 1
            with trio.CancelScope(shield=True):
                link.close()
                await transport.aclose()
                if self._live.get(hub_id) is session:
                    del self._live[hub_id]
                    context = {"hub": hub_id, "space": space}
                    if session.leaving is not None:
                        logger.info("hub %s left: %s", hub_id, session.leaving, extra=context)
                    else:
                        reason = link.close_reason or "closed"
                        logger.info("hub %s disconnected: %s", hub_id, reason, extra=context)
                    with trio.move_on_after(NOTICE_TIMEOUT):
                        try:
                            await self.db(self.registry.release_hub, hub_id, self.manager_id, epoch)
                        except ManagerError as exc:
                            logger.error("cannot record that hub %s disconnected: %s", hub_id, exc)
            self._forget_schedule()

    async def _admit(
        self, connection: LinkConnection, transport: AsgiWebSocketTransport, peer: str
    ) -> tuple[str, str, str, bool, int] | None:
        """Accept the websocket and run the handshake: the hub's id, space, version,
        whether it reads BATCH and its ownership epoch; None (the websocket closed, the
        reason logged) otherwise."""
        try:
            await transport.accept()
        except LinkClosed as exc:  # a peer that leaves at once is no error of ours
            logger.debug("link websocket from %s not accepted: %r", peer, exc)
            return None
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                return await self._handshake(connection, transport)
        except Refusal as refusal:
            logger.warning("refused a hub from %s: %s (%s)", peer, refusal.reason, refusal.code)
            notice = Refused(refusal.code, refusal.reason, retry=False)
            with trio.move_on_after(NOTICE_TIMEOUT):
                with contextlib.suppress(LinkClosed, LinkError):
                    await transport.send(connection.send_control(notice))
            await transport.aclose(CLOSE_POLICY, refusal.code)
        except trio.TooSlowError:
            logger.warning("a hub from %s did not finish the handshake in %g s", peer, HANDSHAKE_TIMEOUT)
            await transport.aclose(CLOSE_PROTOCOL, "handshake timeout")
        except (LinkClosed, LinkError) as exc:
            logger.info("a link from %s failed during the handshake: %s", peer, exc)
            await transport.aclose(CLOSE_PROTOCOL, "handshake failed")
        except ManagerError as exc:
            # The registry is busy or broken: not the hub's fault, so no refusal; it dials again.
            logger.error("cannot admit a hub from %s: %s", peer, exc)
            await transport.aclose(CLOSE_INTERNAL, "manager error")
        return None

    async def _handshake(
        self, connection: LinkConnection, transport: AsgiWebSocketTransport
    ) -> tuple[str, str, str, bool, int]:
        """The admitted hub's id, space, version, whether it reads BATCH frames (not its
        registry row: the link would keep it), and the ownership epoch this link holds."""
        conversation = Conversation(Role.MANAGER)
        nonce = make_challenge()
        challenge = Challenge(nonce, self.manager_id, __version__)
        await transport.send(connection.send_control(conversation.send(challenge)))
        events = connection.receive_message(await transport.receive())
        if len(events) != 1 or not isinstance(events[0], ControlReceived):
            raise Refusal("bad-request", "the first message must be a join or auth control message")
        try:
            hello = conversation.received(events[0].message)
        except ControlError as exc:
            raise Refusal("bad-request", str(exc)) from None
        assert isinstance(hello, Join | Auth)  # the table allows nothing else now
        space = hello.space
        if isinstance(hello, Auth):
            # The common case (every reconnect, thousands at once when a replica dies): one
            # trip to a worker thread for the lookups, the signature and the claim.
            hub, epoch, previous = await self.db(self._auth_and_claim, hello, nonce)
            if previous not in (None, self.manager_id) and self.on_taken_over is not None:
                # Tell the replica that held it at once (the watchdog would within 2 s), so that
                # its old link is closed before this one is welcomed.
                with trio.move_on_after(TAKEOVER_NOTICE_SECONDS):
                    await self.on_taken_over(str(previous), hub.id, epoch)
        else:
            await self.db(self._space_exists, space)
            hub = await self._join(hello, nonce)
            try:
                hub, epoch = await self.db(self.registry.claim_hub, hub.id, self.manager_id)
            except HubRevoked as exc:
                raise Refusal(exc.code, exc.message) from None
        welcome = Welcome(
            hub_id=hub.id,
            space=space,
            heartbeat_interval=self.config.heartbeat_interval,
            # The hub drops a link silent for pingInterval + pongTimeout (it sends no pings of its own).
            ping_interval=self.config.ping_interval,
            pong_timeout=self.config.pong_timeout,
            # Its heartbeats prove the link to us; a pong per ping would add nothing (see Liveness).
            answer_pings=False,
            # This manager reads BATCH frames (spacehub.protocol.link).
            link_features=(BATCH_FEATURE,),
        )
        await transport.send(connection.send_control(conversation.send(welcome)))
        return hub.id, hub.space, hello.version, BATCH_FEATURE in hello.link_features, epoch

    async def _join(self, message: Join, nonce: bytes) -> Hub:
        space, public_key = message.space, message.public_key
        if not verify_challenge(public_key, challenge_payload(nonce, "", space), message.signature):
            raise Refusal("bad-signature", "The join message's signature does not match its public key")
        try:
            hub = await self.db(
                self.registry.redeem_join_token,
                space,
                message.join_token,
                public_key,
                message.description,
                list(message.tags),
            )
        except JoinRefused as exc:
            raise Refusal(exc.code, exc.message) from None
        except BadRequest as exc:
            raise Refusal("bad-request", exc.message) from None
        except Conflict:
            # The key is registered already: the hub lost its id but kept its key, and has just
            # proved it holds that key. Let it in as that hub (the token stays unspent).
            hub = await self.db(self.registry.hub_by_key, public_key)
            if hub.space != space:
                raise Refusal("join-refused", "This hub's key is registered in another space") from None
            if hub.revoked:
                raise Refusal(HubRevoked.code, HubRevoked.default_message) from None
            logger.info("hub %s joined again with its registered key", hub.id)
            return hub
        logger.info("hub %s joined space %s", hub.id, space)
        return hub

    def _space_exists(self, space: str) -> None:
        try:
            self.registry.get_space(space)
        except SpaceNotFound:
            raise Refusal("space-unknown", f"The manager has no space {space!r}") from None

    def _auth_and_claim(self, message: Auth, nonce: bytes) -> tuple[Hub, int, str | None]:
        """A known hub proves its key; it is then claimed by this replica. In a worker thread."""
        hub_id, space, signature = message.hub_id, message.space, message.signature
        self._space_exists(space)
        unknown = Refusal(
            "hub-unknown", f"The manager knows no hub {hub_id!r} in space {space!r}; join again"
        )
        try:
            hub = self.registry.get_hub(hub_id)
        except HubNotFound:
            raise unknown from None
        if hub.space != space:
            raise unknown
        if hub.revoked:
            refused = hub.refused()
            raise Refusal(refused.code, refused.message)
        if not verify_challenge(hub.public_key, challenge_payload(nonce, hub_id, space), signature):
            raise Refusal("bad-signature", "The signature does not match the key this hub joined with")
        try:
            return self.registry.take_over(hub.id, self.manager_id)
        except HubRevoked as exc:
            raise Refusal(exc.code, exc.message) from None

    # -- pings --------------------------------------------------------------------------------

    def _forget_schedule(self) -> None:
        """A link ended: its entries in the ping heap pin its whole connection until they
        come due (up to a ping interval), so under a reconnect storm the heap is compacted
        once more than :data:`MAX_STALE_DUE` links have ended since the last time."""
        self._stale_due += 1
        if self._stale_due > MAX_STALE_DUE:
            self._stale_due = 0
            self._due = [entry for entry in self._due if self._live.get(entry[2].hub_id) is entry[2]]
            heapq.heapify(self._due)

    def _schedule(self, session: HubSession, when: float) -> None:
        """Have the scheduler look at ``session`` at trio time ``when``."""
        head = self._due[0][0] if self._due else math.inf
        heapq.heappush(self._due, (when, next(self._order), session))
        if when < head:
            self._wakeup.set()

    async def _run_pings(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ping every live link every ``ping_interval``; close those silent for :attr:`silence_limit`."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                now = trio.current_time()
                silence = self.silence_limit
                while self._due and self._due[0][0] <= now:
                    _, _, session = heapq.heappop(self._due)
                    if self._live.get(session.hub_id) is not session or session.closing:
                        continue  # that link has ended or is ending; its entry just runs out
                    heard = session.transport.last_received
                    if now - heard >= silence:
                        session.closing = True
                        reason = f"nothing from the hub for {silence:g} s"
                        nursery.start_soon(self._close_late, session, reason)
                        continue
                    if now >= session.next_ping:
                        session.pings += 1
                        session.next_ping = now + self.config.ping_interval
                        nursery.start_soon(self._ping, session, session.pings)
                    self._schedule(session, min(session.next_ping, heard + silence))
                self._wakeup = trio.Event()
                slack = self.config.ping_interval * PING_BATCH_FRACTION
                with trio.move_on_at(self._due[0][0] + slack if self._due else math.inf):
                    await self._wakeup.wait()

    # These two run in the scheduler's nursery: a failure must end one link, never the manager.

    async def _ping(self, session: HubSession, nonce: int) -> None:
        try:
            await session.link.send_control(session.conversation.send(Ping(nonce)))
        except (LinkClosed, LinkError):
            return  # the link is ending; its session task finds out why
        except Exception:
            logger.exception("cannot ping hub %s; closing its link", session.hub_id)
            session.link.close()

    async def _close_late(self, session: HubSession, reason: str) -> None:
        try:
            await session.close(reason)
        except Exception:
            logger.exception("cannot close the link of hub %s cleanly", session.hub_id)
            session.link.close()

    # -- the watchdog -----------------------------------------------------------------------

    async def run_watchdog(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ping the links; every :data:`WATCHDOG_INTERVAL`: log health changes, close revoked hubs' links."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._run_pings)
            try:
                self._seen_version = await self.db(self.registry.data_version)
            except ManagerError as exc:  # the database is down: the first round finds out more
                logger.error("cannot read the registry: %s", exc)
            self.registry_version = self._seen_version
            if self.registry.shared:
                self._seen_version = None  # the first round reads the standing and owners
            task_status.started()
            while True:
                await trio.sleep(WATCHDOG_INTERVAL)
                now = trio.current_time()
                for session in list(self._live.values()):
                    healthy = session.healthy(now, self.health_window)
                    if healthy != session.was_healthy:
                        session.was_healthy = healthy
                        if healthy:
                            logger.info("hub %s is healthy again", session.hub_id)
                        else:
                            logger.warning(
                                "hub %s is unhealthy: no heartbeat for %g s",
                                session.hub_id,
                                self.health_window,
                            )
                await self._close_revoked()

    def _registry_changes(
        self,
    ) -> tuple[int, dict[str, tuple[str, str | None]] | None, dict[str, tuple[str, int]] | None]:
        """The registry's data version; if another process (or replica) wrote since, every
        hub's standing and, on a shared registry, who holds which hub."""
        version = self.registry.data_version()
        if version == self._seen_version:
            return version, None, None
        owners = self.registry.owners() if self.registry.shared else None
        return version, self.registry.hub_standing(), owners

    async def _close_revoked(self) -> None:
        try:
            version, standing, owners = await self.db(self._registry_changes)
        except ManagerError as exc:
            self.registry_version = None
            logger.error("cannot check the registry for revoked hubs: %s", exc)
            return
        self._seen_version = self.registry_version = version
        if standing is None:
            return
        # Kept for when the database is down: calls for hubs held by other replicas can
        # still be forwarded (cpm/api/space.py).
        self.known_standing = standing
        if owners is not None:
            self.known_owners = owners
        if self.on_standing is not None:
            self.on_standing(standing)
        for session in list(self._live.values()):
            space, revoked_reason = standing.get(session.hub_id, (None, None))
            if space == session.space and revoked_reason is None:
                continue
            reason = revoked_reason or "the hub was removed"
            self._last.pop(session.hub_id, None)
            notice = Revoked(reason)
            await session.close(f"revoked: {reason}", notice, code=CLOSE_POLICY)
        if owners is not None:
            await self.fence(owners)

    async def fence(self, owners: dict[str, tuple[str, int]]) -> list[str]:
        """Close every link of ours that another replica has taken over since (its ownership
        epoch is newer than the one our link was admitted with): two replicas never serve one
        hub at once. The ids of the hubs let go."""
        fenced: list[str] = []
        for session in list(self._live.values()):
            owner = owners.get(session.hub_id)
            if owner is None or owner[0] == self.manager_id or owner[1] <= session.epoch:
                continue
            fenced.append(session.hub_id)
            self.links_fenced += 1
            await session.close(
                f"taken over by replica {owner[0]} (epoch {owner[1]} > {session.epoch})", code=CLOSE_NORMAL
            )
        return fenced

    def reports(self, space: str) -> dict[str, Any]:
        """What this replica knows of the ``space`` hubs whose links it holds, as JSON for
        the other replicas (``GET /api/v1/peer/reports``; :func:`remote_hubs` reads it)."""
        reports: dict[str, Any] = {}
        for hub_id, session in self._live.items():
            if session.space != space:
                continue
            report = session.report
            reports[hub_id] = {
                "state": self.state(hub_id),
                "version": report.version,
                "lastHeartbeat": report.last_heartbeat_wall,
                "load": report.load_json,
                "items": report.summary_items,
            }
        return reports

    def held(self) -> dict[str, int]:
        """The hubs whose links this replica holds: ``{hub id: epoch}``."""
        return {hub_id: session.epoch for hub_id, session in self._live.items()}


# -- the proxy ----------------------------------------------------------------------------------


def _request_headers(request: Request) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    for raw_name, raw_value in request.scope.get("headers", []):
        name = raw_name.decode("latin-1").lower()
        if name not in DROP_REQUEST_HEADERS and name != "x-request-id":
            headers.append((name, raw_value.decode("latin-1")))
    # The call's id goes on to the hub: one id in both daemons' logs.
    headers.append(("x-request-id", request.id))
    return headers


async def forward(session: HubSession, request: Request, send: Send, target: str) -> None:
    """Carry ``request`` to the hub as ``target`` (``/api/v1/...?query``) and stream the answer back.

    Raises :class:`HubUnavailable` / :class:`HubLinkFailed` only before the response has
    started; after that, a broken link or a reset stream cuts the response short.
    """
    await forward_on(
        session.link,
        request,
        send,
        target,
        _request_headers(request),
        unavailable=f"Hub {session.hub_id} is not connected",
        failed=lambda reason: HubLinkFailed(f"Hub {session.hub_id} did not answer: {reason}"),
    )


async def forward_on(
    link: LinkSession,
    request: Request,
    send: Send,
    target: str,
    headers: list[tuple[str, str]],
    *,
    unavailable: str,
    failed: Callable[[str], ManagerError],
) -> None:
    """:func:`forward` over any link (a hub's, or another replica's: cpm/replicas.py):
    :class:`HubUnavailable` (``unavailable``) if no stream can be opened, ``failed(reason)``
    if it breaks before the answer's head."""
    # HTTP/1.1: a request has a body only with a length or a transfer coding. Without one,
    # OPEN and END go together (one message to a hub that reads BATCH).
    no_body = request.header("transfer-encoding") is None and request.header("content-length") in (None, "0")
    try:
        stream = await link.open_stream(request.method, target, headers, end=no_body)
    except LinkClosed:
        raise HubUnavailable(unavailable) from None
    except LinkError as exc:
        raise HubUnavailable(f"{unavailable}: cannot take the request now: {exc}") from None

    done = False  # the exchange finished both ways: nothing to reset
    failure: str | None = None
    try:
        if no_body and await _answer_quickly(stream, send):
            done = True
            return
        async with trio.open_nursery() as nursery:
            uploaded = trio.Event()

            async def upload() -> None:
                try:
                    if not no_body:
                        await stream.send_body(request.stream())
                except trio.BrokenResourceError:
                    pass  # the client left mid-body
                except (LinkClosed, StreamAborted, LinkError):
                    return  # the reader of the response finds out why
                else:
                    uploaded.set()
                    await request.wait_disconnect()
                # The client is gone: nobody reads what the hub sends.
                nursery.cancel_scope.cancel()

            nursery.start_soon(upload)
            try:
                status, headers = await stream.response()
            except (LinkClosed, StreamAborted) as exc:
                failure = str(exc) or type(exc).__name__
                nursery.cancel_scope.cancel()
            else:
                await _stream_response(stream, send, status, headers)
                done = uploaded.is_set()
                nursery.cancel_scope.cancel()
    finally:
        if not done:
            with trio.CancelScope(shield=True), trio.move_on_after(NOTICE_TIMEOUT):
                await _reset(stream, "the HTTP client went away" if failure is None else failure)
    if failure is not None:
        raise failed(failure)


async def _answer_quickly(stream: OutboundStream, send: Send) -> bool:
    """Answer the client at once if the whole (short) answer comes within
    :data:`QUICK_ANSWER_SECONDS`; False, with nothing of the stream taken, if not.

    Most proxied calls are short: the head and the whole body arrive together. Those need
    no task watching for the client leaving (a client that leaves now is noticed at the
    latest when the answer is sent), and their body goes to hypercorn in one piece.
    """
    body: bytes | None = None
    with trio.move_on_after(QUICK_ANSWER_SECONDS):
        try:
            status, headers = await stream.response()
            body = await stream.whole_body(QUICK_ANSWER_BYTES)
        except (LinkClosed, StreamAborted):
            return False  # the full path reports it, as it would have without this one
    if body is None:
        return False
    # Outside the deadline: a slow client is not cut off half way through.
    await send(_response_start(status, headers))
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return True


def _response_start(status: int, headers: list[tuple[str, str]]) -> dict[str, Any]:
    raw_headers = [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in headers
        if name.lower() not in DROP_RESPONSE_HEADERS
    ]
    return {"type": "http.response.start", "status": status, "headers": raw_headers}


async def _stream_response(
    stream: OutboundStream, send: Send, status: int, headers: list[tuple[str, str]]
) -> None:
    await send(_response_start(status, headers))
    try:
        # hypercorn waits in send() while the client is slow; until then no credit goes back.
        async for chunk in stream.body():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except (LinkClosed, StreamAborted) as exc:
        # Headers are gone: all we can do is cut the body short, which the client sees.
        logger.warning("response from hub cut short: %s", exc)
        return
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _reset(stream: OutboundStream, reason: str) -> None:
    with contextlib.suppress(LinkClosed, LinkError):
        await stream.reset(reason)
