"""Manager replicas sharing one PostgreSQL registry (docs/replicas.md).

Theory of operation
-------------------
Any number of ``cpm serve --registry postgresql://...`` processes serve one set of
Spaces. Each is a *replica*, named by its manager id, reachable by the others at its
``--advertise-url``; hubs link to any of them.

* **Liveness.** Every :data:`LIVENESS_INTERVAL` a replica writes its row in ``replicas``
  (not counted as a registry change). A replica silent for :data:`REPLICA_DEAD_AFTER`
  is dead: any live replica deletes its row and the ownership rows it held, recording
  those hubs disconnected, so nothing stays stuck on it. Heartbeats of hubs never reach
  the database: only links coming up and going down do.
* **Ownership with fencing.** Admitting a hub's link claims the hub in ``hub_owners``
  with an epoch one above the last (cpm/registry: ``take_over``) and tells the replica
  that held it, over the peer link, to close its old link before the new one is welcomed
  (``POST /api/v1/peer/fence``, :meth:`Replicas.tell_taken_over`); a link that ends
  releases only its own epoch. Every replica's watchdog also re-reads the owners when the
  registry's change counter moves and closes any link of a hub another replica has
  claimed with a newer epoch (:meth:`cpm.link.sessions.HubSessions.fence`), which covers
  a holder that could not be told: a hub that dials a second replica ends up linked to
  exactly one. A replica that lost the
  database long enough for its rows to be released puts back those of the links it
  still holds, unless someone claimed them meanwhile.
* **Forwarding.** A call for a hub whose link another replica holds goes to that
  replica over a *peer link*: a websocket to ``/api/v1/peer-link`` carrying the same
  frames and per-stream flow control as a hub's link (spacehub/server/link), bodies
  streamed both ways. One outbound peer link per replica pair and direction, dialled on
  first use and kept. It is authenticated by a secret every replica reads from the
  shared database (``cluster``), over TLS verified with the CA every replica shares
  (made by the first replica and kept in the database too: see ``share_ca``). The far
  replica serves each stream with its own app: its token check and its proxy, but
  never forwards a forwarded call again.
* **Space-wide topics** (cpm/topics.py) are kept by one replica, the *topics home*: the
  first replica that needed it records itself in ``cluster`` and stays home until it is
  gone (then the next to need it takes over). The other replicas relay their hubs' topic
  streams to it over the peer links, frame for frame with flow control end to end, and
  forward the Space API's topic calls to it. Records the home took but had not delivered
  when it died stay in its data dir (docs/replicas.md).
* **The cluster view.** The Space API's listings (hubs, sequences, instances, topics)
  ask every live peer, over the peer links, for what its linked hubs last reported
  (``GET /api/v1/peer/reports``), so every replica answers the same.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable, MutableMapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

import trio
from websockets.exceptions import WebSocketException
from websockets.trio.client import connect

from spacehub.protocol.link import LinkConnection, LinkError
from spacehub.server.files import write_atomic
from spacehub.server.link import (
    InboundStream,
    LinkClosed,
    LinkSession,
    OutboundStream,
    StreamAborted,
    WebsocketsTransport,
    serve_asgi,
)
from spacehub.tls import client_ssl_context

from .config import ConfigError
from .console.auth import same_secret
from .errors import HubUnavailable, ManagerError
from .link.sessions import DROP_REQUEST_HEADERS, RemoteHub, forward_on, remote_hubs
from .link.transport import AsgiWebSocketTransport
from .registry import HubOwner, Registry, Replica
from .tls import TlsFiles, ensure_ca_and_server_cert

if TYPE_CHECKING:
    from spacehub.server.http import Request, Send

    from .service import Manager

__all__ = [
    "FORWARDED_BY",
    "LIVENESS_INTERVAL",
    "PEER_LINK_PATH",
    "REPLICA_DEAD_AFTER",
    "Replicas",
    "share_ca",
]

logger = logging.getLogger("cpm.replicas")
T = TypeVar("T")

#: Seconds between a replica's liveness writes (and its look at the others).
LIVENESS_INTERVAL: Final = 3.0
#: Seconds without a liveness write after which a replica is taken for dead.
REPLICA_DEAD_AFTER: Final = 15.0
#: The peers' websocket.
PEER_LINK_PATH: Final = "/api/v1/peer-link"
#: The cluster view: what a replica's linked hubs of a space last reported (peer links only).
REPORTS_PATH: Final = "/api/v1/peer/reports"
#: A take-over: "close your link of this hub, I hold it at this epoch" (peer links only).
FENCE_PATH: Final = "/api/v1/peer/fence"
#: Header naming the replica a call was forwarded by (served by the far replica's own app).
FORWARDED_BY: Final = "x-spacehub-forwarded-by"
#: Names in the ``cluster`` table.
PEER_SECRET: Final = "peer-secret"
CLUSTER_CA: Final = "ca"
TOPICS_HOME: Final = "home:topics"
#: Headers naming the hub (and its space) a relayed topic stream belongs to.
RELAYED_HUB: Final = "x-spacehub-hub"
RELAYED_SPACE: Final = "x-spacehub-space"
#: Seconds to dial a peer (and to wait for its reports) before answering without it.
PEER_TIMEOUT: Final = 3.0
#: Seconds a peer that could not be dialled is not dialled again (calls for its hubs fail at
#: once meanwhile: after a kill -9, thousands of them in the seconds before it is taken for dead).
PEER_REDIAL_SECONDS: Final = 2.0
#: Most bytes of one peer's reports read (a few KB a hub).
MAX_REPORTS_BYTES: Final = 64 * 1024 * 1024
#: Largest websocket message on a peer link (as on hubs' links: one frame and room to spare).
MAX_PEER_MESSAGE: Final = 320 * 1024
#: Seconds between websocket pings on a peer link (a peer that stops answering is let go).
PEER_PING_SECONDS: Final = 10.0


def share_ca(registry: Registry, data_dir: Path, public_names: list[str]) -> None:
    """Make every replica serve under one CA, so that a hub trusting it (by file or
    fingerprint) can link to any of them: the first replica's generated CA is stored in the
    shared database, and the others write it into their data dir (and sign their own server
    certificates with it). Runs under the registry's write lock: two replicas starting at
    once agree on one CA. The CA's key is then as secret as the database."""
    files = TlsFiles.in_dir(data_dir)

    def generated() -> str:
        ensure_ca_and_server_cert(data_dir, public_names, [])
        return json.dumps({"cert": files.ca_cert.read_text(), "key": files.ca_key.read_text()})

    shared = json.loads(registry.cluster_value(CLUSTER_CA, generated))
    current = files.ca_cert.read_text() if files.ca_cert.exists() else None
    if current != shared["cert"]:
        logger.info("taking the Space's CA from the shared registry")
        write_atomic(files.ca_key, shared["key"].encode(), 0o600)
        write_atomic(files.ca_cert, shared["cert"].encode(), 0o644)
        for leaf in (files.server_cert, files.server_key):
            leaf.unlink(missing_ok=True)
    ensure_ca_and_server_cert(data_dir, public_names, [])


def _peer_headers(request: Request, replica: str) -> list[tuple[str, str]]:
    """The call's headers for the far replica: its credentials too (the far replica checks
    the token itself), and ``transfer-encoding`` (it tells the far replica's proxy that a
    body of unknown length follows); other hop-by-hop ones left out."""
    headers: list[tuple[str, str]] = []
    for raw_name, raw_value in request.scope.get("headers", []):
        name = raw_name.decode("latin-1").lower()
        if name in ("authorization", "transfer-encoding") or (
            name not in DROP_REQUEST_HEADERS and name not in ("x-request-id", FORWARDED_BY)
        ):
            headers.append((name, raw_value.decode("latin-1")))
    headers.append(("x-request-id", request.id))
    headers.append((FORWARDED_BY, replica))
    return headers


def forwarded(request: Request) -> bool:
    """Whether this call came from another replica over a peer link (never forwarded again)."""
    client = request.scope.get("client")
    return client is not None and client[0] == "link" and request.header(FORWARDED_BY) is not None


async def _pipe(inbound: InboundStream, outbound: OutboundStream) -> None:
    """Carry one stream on to another link and its answer back: each direction at the pace
    its reader takes it (credit flows end to end); either side failing resets the other."""
    async with trio.open_nursery() as nursery:

        async def upstream() -> None:
            try:
                await outbound.send_body(inbound.body())
            except (LinkClosed, StreamAborted, LinkError) as exc:
                with contextlib.suppress(LinkClosed, LinkError):
                    await outbound.reset(f"relay: {exc}"[:200])
                nursery.cancel_scope.cancel()

        nursery.start_soon(upstream)
        try:
            status, headers = await outbound.response()
            await inbound.respond(status, headers)
            async for chunk in outbound.body():
                await inbound.send(chunk)
            await inbound.end()
        except (LinkClosed, StreamAborted, LinkError) as exc:
            for side in (inbound, outbound):
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(1),
                    contextlib.suppress(LinkClosed, LinkError),
                ):
                    await side.reset(f"relay: {exc}"[:200])
            nursery.cancel_scope.cancel()


class Replicas:
    """This replica among the others: liveness, peer links, forwarding, the cluster view.
    With an SQLite registry there is one manager and this does next to nothing."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self.registry = manager.registry
        self.id = manager.id
        self.active = manager.registry.shared
        #: how the peers reach this replica (set by :meth:`run`)
        self.url = ""
        self.started = time.time()
        #: the ASGI app peer streams are served with (the manager's own: set by ManagerApp)
        self.app: Callable[..., Any] | None = None
        self._secret: str | None = None
        #: live peers, as of the last liveness round
        self.peers: list[Replica] = []
        #: outbound peer links, by replica id
        self._links: dict[str, LinkSession] = {}
        self._dialing: dict[str, trio.Lock] = {}
        #: trio time until which a peer that could not be dialled is not tried again
        self._unreachable: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None
        #: counters (metrics, the replicas' benchmark)
        self.forwarded_calls = 0
        self.peer_links_accepted = 0
        self.replicas_released = 0
        self._db_failing = False
        #: the topics home as last read, and until when (trio time) that is trusted
        self._home: str | None = None
        self._home_until = -1.0

    async def db(self, call: Callable[..., T], *args: Any) -> T:
        return await self.manager.sessions.db(call, *args)

    def advertise(self, addresses: list[str]) -> str:
        """This replica's URL for its peers: --advertise-url, else --public-url, else the
        first address the API listens on."""
        config = self.manager.config
        if config.advertise_url:
            return config.advertise_url
        if config.public_url:
            return config.public_url
        host, _, port = addresses[0].rpartition(":")
        if host in ("0.0.0.0", "[::]", "::"):
            raise ConfigError(
                "a replica listening on every address needs --advertise-url (how its peers reach it)"
            )
        return f"{'https' if config.tls else 'http'}://{host}:{port}"

    async def prepare(self) -> None:
        """Before any hub links: forget what a previous run of this replica held (its links
        are gone), and read the peers' secret."""
        released = await self.db(self.registry.forget_replica, self.id)
        if released:
            logger.info("released %d hub(s) a previous run of this manager held", released)
        if self.active:
            self._secret = await self.db(
                self.registry.cluster_value, PEER_SECRET, partial(secrets.token_urlsafe, 32)
            )

    async def run(self, url: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep this replica's liveness row and look after the others', until cancelled."""
        self.url = url
        if not self.active:
            task_status.started()
            return
        await self.db(self.registry.replica_alive, self.id, self.url, self.started)
        await self._look_around()
        logger.info(
            "replica %s at %s; peers: %s", self.id, url, ", ".join(p.id for p in self.peers) or "none"
        )
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    await trio.sleep(LIVENESS_INTERVAL)
                    try:
                        await self.db(self.registry.replica_alive, self.id, self.url, self.started)
                        # Right after an outage every row looks old: give the others a round
                        # to write theirs before taking anyone for dead.
                        await self._look_around(release_dead=not self._db_failing)
                        if self._db_failing:
                            logger.warning("the registry's database is back")
                        self._db_failing = False
                    except ManagerError as exc:
                        if not self._db_failing:
                            logger.error("replica liveness: %s (serving the hubs linked here meanwhile)", exc)
                        self._db_failing = True
        finally:
            self._nursery = None
            # A clean stop: the others need not wait for this replica's row to age.
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                try:
                    await self.db(self.registry.forget_replica, self.id)
                except ManagerError as exc:
                    logger.warning("cannot remove this replica's rows: %s", exc)

    async def _look_around(self, *, release_dead: bool = True) -> None:
        now = time.time()
        replicas = await self.db(self.registry.replicas)
        self.peers = [r for r in replicas if r.id != self.id and now - r.seen < REPLICA_DEAD_AFTER]
        dead_ones = await self.db(self.registry.dead_replicas, REPLICA_DEAD_AFTER) if release_dead else []
        for dead in dead_ones:
            if dead == self.id:
                continue
            released = await self.db(self.registry.forget_replica, dead)
            self.replicas_released += 1
            logger.warning("replica %s is gone: released the %d hub(s) it held", dead, released)
            link = self._links.pop(dead, None)
            if link is not None:
                link.close()
        held = self.manager.sessions.held()
        if held:
            mine = await self.db(self.registry.owned_by, self.id)
            missing = {hub: epoch for hub, epoch in held.items() if hub not in mine}
            if missing:
                await self.db(self.registry.reassert_hubs, self.id, missing)

    # -- peer links: the serving end -----------------------------------------------------

    def admits(self, authorization: str | None) -> bool:
        """Whether a peer link's ``authorization`` carries the replicas' secret."""
        if not self.active or self._secret is None or authorization is None:
            return False
        scheme, _, secret = authorization.partition(" ")
        return scheme.lower() == "bearer" and same_secret(secret.strip(), self._secret)

    async def serve_peer(self, transport: AsgiWebSocketTransport, peer: str) -> None:
        """Own one inbound peer link until it ends, serving its streams with the manager's app."""
        try:
            await transport.accept()
        except LinkClosed:
            return
        self.peer_links_accepted += 1
        link = LinkSession(LinkConnection("manager"), transport, on_stream=self._serve_stream)
        link.batching = True
        logger.info("peer link from %s", peer)
        try:
            await link.run()
        finally:
            logger.info("peer link from %s ended: %s", peer, link.close_reason)

    async def _serve_stream(self, stream: InboundStream) -> None:
        headers = dict(stream.headers)
        hub, space = headers.get(RELAYED_HUB), headers.get(RELAYED_SPACE)
        if hub is not None and space is not None and stream.path.startswith("/space-topics"):
            # A hub's topic stream another replica relays: this replica is the topics home.
            await self.manager.topics.serve_hub_stream(hub, space, stream)
            return
        await serve_asgi(stream, self._peer_app)

    async def _peer_app(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == FENCE_PATH:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            try:
                hub, replica, epoch = query["hub"][0], query["replica"][0], int(query["epoch"][0])
            except (KeyError, IndexError, ValueError):
                status = 400
            else:
                await self.manager.sessions.fence({hub: (replica, epoch)})
                status = 204
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if scope["path"] == REPORTS_PATH:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            space = (query.get("space") or [""])[0]
            body = json.dumps(self.manager.sessions.reports(space), separators=(",", ":")).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        if self.app is None:
            raise RuntimeError("no app to serve peer streams with")
        await self.app(scope, receive, send)

    # -- peer links: the dialling end -----------------------------------------------------

    async def _link_to(self, replica: str, url: str) -> LinkSession:
        link = self._links.get(replica)
        if link is not None and not link.closed:
            return link
        if self._nursery is None:
            raise HubUnavailable("this replica is not serving")
        async with self._dialing.setdefault(replica, trio.Lock()):
            link = self._links.get(replica)
            if link is not None and not link.closed:
                return link
            if trio.current_time() < self._unreachable.get(replica, -1.0):
                raise HubUnavailable(f"replica {replica} at {url} cannot be reached (just tried)")
            try:
                with trio.fail_after(PEER_TIMEOUT):
                    started: LinkSession = await self._nursery.start(self._hold_link, replica, url)
                    self._unreachable.pop(replica, None)
                    return started
            except (OSError, trio.TooSlowError, LinkClosed, LinkError, WebSocketException) as exc:
                # Refused, timed out, a bad certificate, a refused handshake (wrong secret).
                self._unreachable[replica] = trio.current_time() + PEER_REDIAL_SECONDS
                raise HubUnavailable(f"replica {replica} at {url} cannot be reached: {exc!r}") from None

    async def _hold_link(
        self, replica: str, url: str, *, task_status: trio.TaskStatus[LinkSession] = trio.TASK_STATUS_IGNORED
    ) -> None:
        parts = urlsplit(url)
        secure = parts.scheme == "https"
        ws_url = urlunsplit(("wss" if secure else "ws", parts.netloc, PEER_LINK_PATH, "", ""))
        config = self.manager.config
        context = (
            client_ssl_context(ca_file=config.ca_path) if secure and config.ca_path is not None else None
        )
        started = False
        link: LinkSession | None = None
        try:
            async with connect(
                ws_url,
                ssl=context if secure else None,
                open_timeout=PEER_TIMEOUT,
                ping_interval=PEER_PING_SECONDS,
                ping_timeout=PEER_PING_SECONDS,
                max_size=MAX_PEER_MESSAGE,
                compression=None,
                proxy=None,
                additional_headers={"authorization": f"Bearer {self._secret}", FORWARDED_BY: self.id},
            ) as websocket:
                link = LinkSession(LinkConnection("hub"), WebsocketsTransport(websocket))
                link.batching = True
                async with trio.open_nursery() as nursery:
                    await nursery.start(link.run)
                    self._links[replica] = link
                    started = True
                    logger.info("peer link to replica %s at %s", replica, url)
                    task_status.started(link)
        except Exception as exc:  # once started: logged, and the link is just gone
            if not started:
                raise
            logger.warning("peer link to replica %s ended: %r", replica, exc)
        finally:
            if link is not None and self._links.get(replica) is link:
                del self._links[replica]

    async def forward(self, owner: HubOwner, request: Request, send: Send) -> None:
        """Carry a Space API call for a hub held by ``owner`` to that replica, as it came."""
        if owner.url is None:
            raise HubUnavailable(f"the replica holding this hub ({owner.replica}) is gone")
        link = await self._link_to(owner.replica, owner.url)
        target = (request.scope.get("raw_path") or request.path.encode()).decode("latin-1")
        query = request.scope.get("query_string", b"")
        if query:
            target += "?" + query.decode("latin-1")
        self.forwarded_calls += 1
        name = f"replica {owner.replica}"
        await forward_on(
            link,
            request,
            send,
            target,
            _peer_headers(request, self.id),
            unavailable=f"The {name} holding this hub cannot be reached",
            failed=lambda reason: HubUnavailable(
                f"The {name} holding this hub went away during the call ({reason}); retry"
            ),
        )

    async def tell_taken_over(self, previous: str, hub: str, epoch: int) -> None:
        """This replica took ``hub`` over at ``epoch`` from ``previous``: have it close its old
        link now (fencing without waiting for its watchdog). A peer that cannot be reached is
        left to its watchdog, or is dead."""
        peer = next((p for p in self.peers if p.id == previous), None)
        if peer is None:
            return
        target = f"{FENCE_PATH}?hub={quote(hub)}&replica={quote(self.id)}&epoch={epoch}"
        try:
            link = await self._link_to(peer.id, peer.url)
            stream = await link.open_stream("POST", target, [], end=True)
            await stream.response()
        except (ManagerError, LinkClosed, LinkError, StreamAborted) as exc:
            logger.info("could not tell replica %s that hub %s moved here: %s", previous, hub, exc)

    # -- Space-wide topics ---------------------------------------------------------------

    async def topics_home(self) -> Replica | None:
        """The replica keeping the Space-wide topics; None when it is this one (or there are
        no replicas). :class:`HubUnavailable` when it is another that cannot be found alive."""
        if not self.active:
            return None
        now = trio.current_time()
        if self._home is None or now >= self._home_until:
            try:
                self._home = await self.db(self.registry.cluster_value, TOPICS_HOME, lambda: self.id)
                self._home_until = now + LIVENESS_INTERVAL
            except ManagerError:
                if self._home is None:
                    raise
                # The database is down: the home we knew is still the best guess.
        if self._home == self.id:
            return None
        for peer in self.peers:
            if peer.id == self._home:
                return peer
        self._home_until = -1.0  # ask again next time
        raise HubUnavailable(
            f"the replica keeping this Space's topics ({self._home}) is not reachable; retry"
        )

    async def serve_hub_stream(self, hub: str, space: str, stream: InboundStream) -> None:
        """A topic stream a hub linked here opened: served here if this replica is the
        topics home, else relayed to the home as it is."""
        try:
            home = await self.topics_home()
        except ManagerError as exc:
            await stream.reset(exc.message[:200])
            return
        if home is None:
            await self.manager.topics.serve_hub_stream(hub, space, stream)
            return
        try:
            link = await self._link_to(home.id, home.url)
            headers = [*stream.headers, (RELAYED_HUB, hub), (RELAYED_SPACE, space)]
            relayed = await link.open_stream(stream.method, stream.path, headers)
        except (ManagerError, LinkClosed, LinkError) as exc:
            await stream.reset(f"the topics home cannot be reached: {exc}"[:200])
            return
        await _pipe(stream, relayed)

    async def forward_to_home(self, home: Replica, request: Request, send: Send) -> None:
        """A Space API topic call, carried to the topics home as it came."""
        await self.forward(HubOwner(home.id, 0, home.url, home.seen), request, send)

    async def remote_hubs(self, space: str) -> dict[str, RemoteHub]:
        """What every live peer's linked hubs of ``space`` last reported; a peer that does
        not answer within :data:`PEER_TIMEOUT` is left out (its hubs show disconnected)."""
        if not self.active or not self.peers:
            return {}
        found: dict[str, RemoteHub] = {}
        async with trio.open_nursery() as nursery:
            for peer in self.peers:
                nursery.start_soon(self._reports_of, peer, space, found)
        return found

    async def _reports_of(self, peer: Replica, space: str, found: dict[str, RemoteHub]) -> None:
        with trio.move_on_after(PEER_TIMEOUT) as scope:
            try:
                link = await self._link_to(peer.id, peer.url)
                stream = await link.open_stream("GET", f"{REPORTS_PATH}?space={quote(space)}", [], end=True)
                try:
                    status, _ = await stream.response()
                    body = bytearray()
                    async for chunk in stream.body():
                        body += chunk
                        if len(body) > MAX_REPORTS_BYTES:
                            raise ValueError("too large")
                finally:
                    if not stream._remote_ended:
                        with (
                            trio.CancelScope(shield=True),
                            trio.move_on_after(1),
                            contextlib.suppress(LinkClosed, LinkError),
                        ):
                            await stream.reset("not wanted any more")
                if status == 200:
                    found.update(remote_hubs(space, json.loads(body)))
                    return
                logger.warning("replica %s answered %d for its hubs' reports", peer.id, status)
            except (ManagerError, LinkClosed, LinkError, StreamAborted, ValueError) as exc:
                logger.warning("no reports from replica %s: %s", peer.id, exc)
        if scope.cancelled_caught:
            logger.warning("no reports from replica %s within %g s", peer.id, PEER_TIMEOUT)
