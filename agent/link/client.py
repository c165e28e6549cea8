"""The hub's side of the link: dial the manager, prove who we are, serve its calls.

Theory of operation
-------------------
:class:`LinkClient` is a service in the hub's nursery. It reports ``started`` at
once (the hub never waits for its manager) and then loops for as long as the hub
runs, following :mod:`agent.link.state`:

1. ``connecting``: build the TLS context (the manager's CA from ``--cpm-ca``, or
   fetched and checked against ``--cpm-fingerprint``, or the system store) and
   dial ``<cpm-url>/api/v1/link`` with ``websockets.trio``; ``open_timeout``
   bounds the dial, TLS included, so a bad certificate fails fast.
2. ``authenticating``: the manager sends a challenge; the hub signs it with its
   Ed25519 key (``<data dir>/hub.key``, 0600, made on first start) and answers
   with ``join`` (first time, with the one-time join token) or ``auth`` (once
   ``<data dir>/link.json`` records the hub id it was given). :data:`AUTH_TIMEOUT`
   bounds this step.
3. ``connected``: a :class:`~spacehub.server.link.LinkSession` runs. Each stream the
   manager opens is served by the hub's own ASGI app in-process
   (:func:`~spacehub.server.link.serve_asgi`, ``/api/v1/`` only); a heartbeat (load-check
   and summary) goes out at once and then every :data:`HEARTBEAT_INTERVAL` ±
   :data:`HEARTBEAT_JITTER`. The manager pings every link (its ``pingInterval``, in
   the welcome); a hub that hears nothing at all from it for that interval plus its
   ``pongTimeout`` (by default :data:`PING_INTERVAL` + :data:`PING_TIMEOUT`, 20 s)
   drops the link. Pings are answered only if the welcome lacks
   ``"answerPings": false``: a manager that says so takes the heartbeats as the
   hub's sign of life, so an idle link costs it one message each way per interval.
   The websocket's own keepalive pings are off for the same reason: a fleet of
   thousands pays for every message. ``close_timeout`` is short so closing it never
   holds the next attempt back.
4. any failure: ``backoff`` for ``uniform(0, min(cap, base * 2**attempt))``
   seconds ("full jitter"), then ``connecting`` again, forever. The cap is
   :data:`BACKOFF_CAP`, or :data:`UNREACHABLE_CAP` when the manager could not be
   reached at all (:func:`is_unreachable`), so the hub is back within seconds of a
   network cut ending; such attempts do not grow the backoff either. The attempt
   count starts again once a link stayed up :data:`STABLE_AFTER` seconds (a
   minute), so a link that drops after a good run is back within about a second,
   while a manager that keeps dropping the hub at once is retried less and less.
5. ``refused`` (``refused`` with ``retry: false``, ``revoked``, or a local problem
   no retry can fix, such as no join token and no ``link.json``): no more attempts;
   the reason is logged and shown by ``/status``. The hub goes on working alone.

Every failure is logged once with its reason (a repeat of the same reason is
logged at debug level only).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import random
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import trio
from websockets.exceptions import InvalidStatus
from websockets.trio.client import ClientConnection, connect

from spacehub import __version__
from spacehub.models import LoadCheck
from spacehub.protocol.auth import challenge_payload
from spacehub.protocol.control import (
    Auth,
    Challenge,
    ControlError,
    ControlMessage,
    Conversation,
    Heartbeat,
    Join,
    Leaving,
    Ping,
    Pong,
    Refused,
    Revoked,
    Role,
    Welcome,
)
from spacehub.protocol.link import (
    BATCH_FEATURE,
    FRAME_HEADER_SIZE,
    MAX_FRAME_PAYLOAD,
    MAX_HEAD_BYTES,
    ControlReceived,
    LinkConnection,
    LinkError,
)
from spacehub.server.files import PRIVATE, write_atomic
from spacehub.server.keys import (
    HubKey,
    KeyFileError,
    generate_hub_key,
    load_private_key,
    public_key_bytes,
    save_private_key,
    sign_challenge,
)
from spacehub.server.link import (
    ASGIApp,
    InboundStream,
    LinkClosed,
    LinkSession,
    WebsocketsTransport,
    serve_asgi,
)
from spacehub.tls import check_ca_fingerprint, client_ssl_context

from ..config import HubConfig, is_loopback
from ..errors import AttemptFailed, LinkRefused
from ..identity import LINK_FILE, joined_hub_id
from .state import LinkState, LinkTrigger, next_state

__all__ = [
    "AUTH_TIMEOUT",
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_JITTER",
    "KEY_FILE",
    "LINK_FILE",
    "LINK_PATH",
    "STABLE_AFTER",
    "UNREACHABLE_CAP",
    "LinkClient",
    "LinkRefused",
    "backoff_delay",
]

#: Seconds between heartbeats ...
HEARTBEAT_INTERVAL: Final = 10.0
#: ... give or take this fraction.
HEARTBEAT_JITTER: Final = 0.1
#: The first backoff is at most this many seconds; each failure doubles it ...
BACKOFF_BASE: Final = 1.0
#: ... up to this cap.
BACKOFF_CAP: Final = 60.0
#: The cap while the manager cannot be reached at all (no route, no answer, the dial timed
#: out, nothing listening): the network is cut or the manager restarting, not overloaded,
#: and the hub must be back within about 5 s of it answering again, however long it was away.
UNREACHABLE_CAP: Final = 3.0
#: A link up this long resets the backoff (long enough to show that it worked: a manager
#: that drops hubs right after welcoming them still sees the backoff grow).
STABLE_AFTER: Final = 60.0
#: The manager's ping interval and pong deadline, until its welcome says otherwise:
#: silence from the manager for their sum means the link is dead.
PING_INTERVAL: Final = 10.0
PING_TIMEOUT: Final = 10.0
#: Seconds for TCP, TLS and the websocket handshake together.
OPEN_TIMEOUT: Final = 10.0
#: Seconds the closing handshake may take before the connection is dropped.
CLOSE_TIMEOUT: Final = 1.0
#: The websocket close code of a hub that stops on purpose (RFC 6455: normal closure).
CLOSE_NORMAL: Final = 1000
#: What a stopping hub tells its manager (control message ``leaving``) before it closes the link.
LEAVING_REASON: Final = "the hub is shutting down"
#: Seconds from the websocket opening to ``welcome``.
AUTH_TIMEOUT: Final = 10.0
#: The largest websocket message the link carries.
MAX_MESSAGE: Final = FRAME_HEADER_SIZE + max(MAX_FRAME_PAYLOAD, MAX_HEAD_BYTES)
#: The manager's websocket endpoint, under the configured URL.
LINK_PATH: Final = "/api/v1/link"
#: Files in the data dir.
KEY_FILE: Final = "hub.key"
#: The most bytes of the manager's CA fetched for a fingerprint check.
_MAX_CA_PEM: Final = 64 * 1024

logger = logging.getLogger("agent.link")


def backoff_delay(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Full jitter: a uniform delay in ``[0, min(cap, base * 2**attempt)]``."""
    return random.uniform(0, min(cap, base * 2 ** min(attempt, 62)))


#: Dial errors that mean the manager could not be reached (rather than that it answered badly).
_UNREACHABLE_ERRNOS: Final = frozenset(
    {
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ENETDOWN,
        errno.EHOSTDOWN,
        errno.ETIMEDOUT,
        # Nothing listens: the manager is restarting (an upgrade, a crash, a reboot). Every hub
        # must be back within seconds of it listening again, however long it was down.
        errno.ECONNREFUSED,
    }
)


def is_unreachable(exc: BaseException) -> bool:
    """Whether an attempt failed because the manager could not be reached: no route to it,
    nothing listening (it restarts), or the dial (TCP, TLS, websocket handshake) timed out.
    Causes and groups are searched."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, TimeoutError) or (
            isinstance(current, OSError) and current.errno in _UNREACHABLE_ERRNOS
        ):
            return True
        if isinstance(current, BaseExceptionGroup):
            stack.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                stack.append(linked)
    return False


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def describe_error(exc: BaseException) -> str:
    """A one-line reason for the log and ``/status``; certificate failures say so first."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            detail = current.verify_message or current.reason or str(current)
            return f"certificate verify failed: {detail}"
        if isinstance(current, BaseExceptionGroup):
            stack.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                stack.append(linked)
    if isinstance(exc, InvalidStatus):
        return f"the manager answered HTTP {exc.response.status_code} to the link request"
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return describe_error(exc.exceptions[0])
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, AttemptFailed | LinkRefused) else f"{type(exc).__name__}: {text}"


def _write_private_json(path: Path, value: dict[str, Any]) -> None:
    """Write ``value`` as JSON, 0600, atomically."""
    write_atomic(path, (json.dumps(value, indent=2) + "\n").encode(), PRIVATE)


class LinkClient:
    """The hub's link to its manager. See the module docstring."""

    def __init__(
        self,
        config: HubConfig,
        app: ASGIApp,
        *,
        load: Callable[[], LoadCheck | dict[str, Any]] | None = None,
        summary: Callable[[], dict[str, Any]] | None = None,
        on_hub_id: Callable[[str], None] | None = None,
        on_session: Callable[[LinkSession | None], None] | None = None,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        heartbeat_jitter: float = HEARTBEAT_JITTER,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        unreachable_cap: float = UNREACHABLE_CAP,
        stable_after: float = STABLE_AFTER,
        ping_interval: float = PING_INTERVAL,
        ping_timeout: float = PING_TIMEOUT,
        open_timeout: float = OPEN_TIMEOUT,
        auth_timeout: float = AUTH_TIMEOUT,
    ) -> None:
        self._config = config
        #: which of config.cpm_urls the next attempt dials (moves on after each failure)
        self._url_index = 0
        self._app = app
        self._load = load or (lambda: {})
        self._summary = summary or (lambda: {"sequences": [], "instances": [], "topics": []})
        #: told the id the Space knows this hub by, as soon as it is known (joined before, or now)
        self._on_hub_id = on_hub_id or (lambda hub_id: None)
        #: told each session once it is up, and None when it ends (Space-wide topics ride on it)
        self._on_session = on_session or (lambda session: None)
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_jitter = heartbeat_jitter
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.unreachable_cap = unreachable_cap
        self.stable_after = stable_after
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.open_timeout = open_timeout
        self.auth_timeout = auth_timeout
        self.data_dir = Path(config.data_dir)
        self.key_path = self.data_dir / KEY_FILE
        self.link_path = self.data_dir / LINK_FILE
        self.state = LinkState.DISABLED
        self._key: HubKey | None = None
        self._hub_id: str | None = None
        self._ca_data: bytes | None = None
        self._last_error: str | None = None
        self._last_logged: str | None = None
        self._last_connected: float | None = None
        self._last_disconnected: float | None = None
        self._session: LinkSession | None = None
        #: failed attempts since the last stable link that reached the manager (the backoff's
        #: exponent); an unreachable or restarting manager does not count
        self.backoff_attempts = 0
        #: the control conversation of the current connection (a new one per connection)
        self._conversation = Conversation(Role.HUB)
        #: the websocket of the link in use, closed normally when the hub stops
        self._websocket: ClientConnection | None = None
        #: trio time the heartbeat being sent started, None between heartbeats
        self._heartbeat_since: float | None = None
        #: connections made so far (for tests and the log)
        self.connections = 0

    @property
    def session(self) -> LinkSession | None:
        """The link's session while it is up (metrics read its open streams)."""
        return self._session

    # --- what /status shows ----------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The link as ``GET /status`` shows it (no secrets)."""
        return {
            "connected": self.state is LinkState.CONNECTED,
            "state": self.state.value,
            "cpmUrl": self._url,
            "hubId": self._hub_id,
            "space": self._config.space,
            "lastError": self._last_error,
            "lastConnected": _iso(self._last_connected),
            "lastDisconnected": _iso(self._last_disconnected),
            # Failed attempts that reached the manager: what grows the backoff.
            "backoffAttempts": self.backoff_attempts,
        }

    @property
    def _url(self) -> str:
        """The manager (replica) this attempt dials."""
        urls = self._config.cpm_urls or [self._config.cpm_url]
        return urls[self._url_index % len(urls)]

    def _next_url(self) -> None:
        """After a failed attempt or a lost link, another replica (if several are given),
        drawn at random: when a replica dies, its hubs spread over the others instead of
        all landing on the one listed next."""
        count = len(self._config.cpm_urls)
        if count > 1:
            self._url_index = (self._url_index + random.randrange(1, count)) % count

    def _move(self, trigger: LinkTrigger) -> None:
        self.state = next_state(self.state, trigger)

    def _fail(self, reason: str, *, final: bool = False) -> None:
        self._last_error = reason
        if final:
            logger.error("link to %s refused, not retrying: %s", self._url, reason)
        elif reason != self._last_logged:
            logger.warning("link to %s: %s", self._url, reason)
        else:
            logger.debug("link to %s: %s (again)", self._url, reason)
        self._last_logged = reason

    # --- the service -----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the link up until cancelled; ``started`` at once."""
        task_status.started()
        if not self._config.cpm_url:
            return
        self._move(LinkTrigger.START)
        # The link lives in a shielded scope of its own, so that when the hub stops, the
        # websocket (whose reader task would die with a plain cancellation, cutting the TCP
        # connection) can still close normally, 1000: the manager then records a hub that
        # left, not a link that broke. The guard turns the hub's cancellation into that.
        link_scope = trio.CancelScope(shield=True)

        async def leave_when_cancelled() -> None:
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    session, websocket = self._session, self._websocket
                    if session is not None:
                        # The manager's server cannot tell a closing handshake from a cut
                        # connection (it reports 1006 for both): say it first.
                        with contextlib.suppress(LinkClosed, LinkError):
                            await session.send_control(self._conversation.send(Leaving(LEAVING_REASON)))
                    if websocket is not None:
                        await websocket.aclose(CLOSE_NORMAL, LEAVING_REASON)
                link_scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(leave_when_cancelled)
                with link_scope:
                    await self._run()
                nursery.cancel_scope.cancel()
        finally:
            if self.state is not LinkState.REFUSED:  # a refusal stays visible in /status
                self._move(LinkTrigger.STOP)

    async def _run(self) -> None:
        try:
            await trio.to_thread.run_sync(self._prepare_identity)
        except LinkRefused as exc:
            self._fail(exc.reason, final=True)
            self.state = LinkState.REFUSED
            return
        self.backoff_attempts = 0
        while True:
            connected_at: list[float] = []
            cap = self.backoff_cap
            unreachable = False
            try:
                await self._attempt(connected_at)
                reason = "the link closed"
            except LinkRefused as exc:
                self._fail(str(exc), final=True)
                if connected_at:
                    self._last_disconnected = time.time()
                self._move(LinkTrigger.REFUSED)
                return
            except Exception as exc:  # noqa: BLE001 - any failure means: back off and try again
                reason = describe_error(exc)
                unreachable = is_unreachable(exc)
                if unreachable:
                    cap = min(cap, self.unreachable_cap)
            if connected_at:
                self._last_disconnected = time.time()
                if trio.current_time() - connected_at[0] >= self.stable_after:
                    self.backoff_attempts = 0
            self._fail(reason)
            self._move(LinkTrigger.FAILED)
            self._next_url()
            delay = backoff_delay(self.backoff_attempts, self.backoff_base, cap)
            # An unreachable manager costs nobody anything to retry (and its delay is
            # capped short, so a cut network is rejoined within seconds of coming
            # back): only attempts that reached the manager grow the backoff.
            if not unreachable:
                self.backoff_attempts += 1
            logger.debug("link: next attempt in %.2f s", delay)
            await trio.sleep(delay)
            self._move(LinkTrigger.RETRY)

    def _prepare_identity(self) -> None:
        """Load (or make) the key and read link.json; runs in a thread."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._key = load_private_key(self.key_path)
        except FileNotFoundError:
            self._key = generate_hub_key()
            save_private_key(self._key, self.key_path)
            logger.info("made the hub's link key %s", self.key_path)
        except (KeyFileError, OSError) as exc:
            raise LinkRefused("key-file", str(exc)) from None
        self._hub_id = self._joined_hub_id()
        if self._hub_id is not None:
            self._on_hub_id(self._hub_id)
        if self._hub_id is None and not self._config.join_token:
            raise LinkRefused(
                "not-joined",
                f"this hub has not joined space {self._config.space!r} yet and no --join-token was given",
            )

    def _joined_hub_id(self) -> str | None:
        """The hub id link.json records for the configured space, if any."""
        return joined_hub_id(self.data_dir, self._config.space)

    # --- one attempt -----------------------------------------------------------

    def _link_url(self) -> str:
        parts = urlsplit(self._url)
        path = parts.path.rstrip("/")
        if not path.endswith(LINK_PATH):
            path += LINK_PATH
        return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))

    async def _ssl_context(self) -> ssl.SSLContext | None:
        parts = urlsplit(self._url)
        if parts.scheme != "wss":
            return None
        fingerprint = self._config.cpm_fingerprint or None
        if self._config.cpm_ca:
            try:
                return client_ssl_context(ca_file=self._config.cpm_ca, fingerprint=fingerprint)
            except (OSError, ValueError) as exc:
                raise AttemptFailed(f"cannot use the CA file {self._config.cpm_ca}: {exc}") from None
        if fingerprint is not None:
            if self._ca_data is None:
                self._ca_data = await self._fetch_ca(fingerprint)
            return client_ssl_context(ca_data=self._ca_data, fingerprint=fingerprint)
        return ssl.create_default_context()

    async def _fetch_ca(self, fingerprint: str) -> bytes:
        """The manager's CA, fetched without verification and then checked by its fingerprint."""
        import httpx  # only here, once per hub: the idle hub does not carry an HTTP client

        parts = urlsplit(self._url)
        url = urlunsplit(("https", parts.netloc, "/api/v1/ca.pem", "", ""))
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        try:
            async with (
                httpx.AsyncClient(verify=unverified, timeout=self.open_timeout, trust_env=False) as client,
                client.stream("GET", url) as response,
            ):
                if response.status_code != 200:
                    raise AttemptFailed(f"fetching the manager's CA: {url} answered {response.status_code}")
                pem = bytearray()
                async for chunk in response.aiter_bytes():
                    pem += chunk
                    if len(pem) > _MAX_CA_PEM:
                        raise AttemptFailed(f"fetching the manager's CA: {url} sent too much")
        except httpx.HTTPError as exc:
            raise AttemptFailed(f"fetching the manager's CA from {url}: {describe_error(exc)}") from None
        if not check_ca_fingerprint(bytes(pem), fingerprint):
            raise AttemptFailed(
                f"the CA served at {url} does not match --cpm-fingerprint; not connecting"
                " (check the fingerprint `cpm` printed)"
            )
        return bytes(pem)

    async def _attempt(self, connected_at: list[float]) -> None:
        """Dial, authenticate and serve until the link ends (returns) or fails (raises)."""
        context = await self._ssl_context()
        host = urlsplit(self._url).hostname or ""
        async with connect(
            self._link_url(),
            ssl=context,
            ping_interval=None,  # the manager's pings prove the link (see the module docstring)
            close_timeout=CLOSE_TIMEOUT,
            open_timeout=self.open_timeout,
            max_size=MAX_MESSAGE,
            compression=None,
            proxy=None if is_loopback(host) else True,
            additional_headers={"x-sth-version": __version__},
        ) as websocket:
            self._move(LinkTrigger.DIALED)
            transport = WebsocketsTransport(websocket)
            connection = LinkConnection("hub")
            with trio.fail_after(self.auth_timeout):
                welcome = await self._authenticate(transport, connection)
            self._move(LinkTrigger.WELCOMED)
            connected_at.append(trio.current_time())
            self._last_connected = time.time()
            self._last_error = None
            self._last_logged = None
            self.connections += 1
            logger.info("linked to %s as %s in space %s", self._url, self._hub_id, self._config.space)
            interval = _seconds(welcome.heartbeat_interval, 1)
            if interval is not None:
                self.heartbeat_interval = interval
            ping, pong = _seconds(welcome.ping_interval, 0.1), _seconds(welcome.pong_timeout, 0.1)
            silence = (ping or self.ping_interval) + (pong or self.ping_timeout)
            # A manager that says nothing expects pongs (older ones close a link without them).
            answer_pings = welcome.answer_pings
            batching = BATCH_FEATURE in welcome.link_features
            self._websocket = websocket
            try:
                await self._serve(transport, connection, websocket.stream, silence, answer_pings, batching)
            finally:
                self._websocket = None

    async def _receive_control(
        self, transport: WebsocketsTransport, connection: LinkConnection
    ) -> ControlMessage:
        """The next message, which must be a control message the handshake allows now
        (nothing else comes before welcome)."""
        events = connection.receive_message(await transport.receive())
        if len(events) != 1 or not isinstance(events[0], ControlReceived):
            raise AttemptFailed("the manager sent something other than a control message before welcome")
        try:
            return self._conversation.received(events[0].message)
        except ControlError as exc:
            raise AttemptFailed(f"the manager broke the handshake: {exc}") from None

    async def _authenticate(self, transport: WebsocketsTransport, connection: LinkConnection) -> Welcome:
        self._conversation = Conversation(Role.HUB)
        challenge = await self._receive_control(transport, connection)
        assert isinstance(challenge, Challenge)  # the table allows nothing else first
        assert self._key is not None
        space = self._config.space
        joining = self._hub_id is None
        try:
            payload = challenge_payload(challenge.nonce, "" if joining else (self._hub_id or ""), space)
        except ValueError as exc:
            raise AttemptFailed(f"bad challenge: {exc}") from None
        signature = sign_challenge(self._key, payload)
        hello: Join | Auth
        if joining:
            hello = Join(
                space=space,
                join_token=self._config.join_token,
                public_key=public_key_bytes(self._key),
                signature=signature,
                description=self._config.description,
                tags=tuple(self._config.tags),
                version=__version__,
                link_features=(BATCH_FEATURE,),
            )
        else:
            assert self._hub_id is not None
            hello = Auth(
                space=space,
                hub_id=self._hub_id,
                signature=signature,
                version=__version__,
                link_features=(BATCH_FEATURE,),
            )
        await transport.send(connection.send_control(self._conversation.send(hello)))
        reply = await self._receive_control(transport, connection)
        if isinstance(reply, Refused):
            if reply.retry:
                raise AttemptFailed(f"refused ({reply.code}): {reply.reason}")
            raise LinkRefused(reply.code, reply.reason)
        assert isinstance(reply, Welcome)  # the table allows welcome or refused only
        hub_id = reply.hub_id
        if joining:
            record = {"hubId": hub_id, "space": space, "cpmUrl": self._url}
            await trio.to_thread.run_sync(_write_private_json, self.link_path, record)
            logger.info("joined space %s as %s; the join token is not used again", space, hub_id)
            self._on_hub_id(hub_id)
        elif hub_id != self._hub_id:
            raise AttemptFailed(f"the manager welcomed hub {hub_id!r}, but this hub is {self._hub_id!r}")
        self._hub_id = hub_id
        return reply

    async def _serve(
        self,
        transport: WebsocketsTransport,
        connection: LinkConnection,
        stream: trio.abc.Stream,
        silence: float,
        answer_pings: bool,
        batching: bool,
    ) -> None:
        async def on_stream(stream: InboundStream) -> None:
            await serve_asgi(stream, self._app)

        async def on_control(raw: dict[str, Any]) -> None:
            try:
                message = self._conversation.received(raw)
            except ControlError as exc:
                raise AttemptFailed(f"the manager broke the link's protocol: {exc}") from None
            if isinstance(message, Ping):
                if answer_pings:
                    await session.send_control(self._conversation.send(Pong(message.nonce)))
            elif isinstance(message, Revoked):
                raise LinkRefused("hub-revoked", message.reason or "revoked by the manager")
            else:
                logger.debug("link: ignoring control message %r", message.type)

        session = LinkSession(connection, transport, on_stream=on_stream, on_control=on_control)
        session.batching = batching
        self._session = session
        self._on_session(session)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeats, session)
                nursery.start_soon(self._stall_watchdog, stream)
                nursery.start_soon(self._silence_watchdog, transport, stream, silence)
                try:
                    await session.run()
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # Only the session's run() can raise here (heartbeats catch their errors).
            refused = group.subgroup(LinkRefused)
            if refused is not None:
                raise refused.exceptions[0] from None
            raise
        finally:
            self._session = None
            self._on_session(None)
        raise AttemptFailed(f"the link closed: {session.close_reason}")

    async def _heartbeats(self, session: LinkSession) -> None:
        with contextlib.suppress(LinkClosed):
            while True:
                try:
                    load = await trio.to_thread.run_sync(self._load)
                    summary = self._summary()
                except Exception:
                    logger.exception("link: building the heartbeat failed")
                    load, summary = {}, {}
                self._heartbeat_since = trio.current_time()
                try:
                    await self._send_heartbeat(session, load, summary)
                finally:
                    self._heartbeat_since = None
                jitter = self.heartbeat_jitter
                await trio.sleep(self.heartbeat_interval * random.uniform(1 - jitter, 1 + jitter))

    async def _stall_watchdog(self, stream: trio.abc.Stream) -> None:
        """Drop the link once a heartbeat has been stuck in its send for the pong deadline.

        On a dead link the socket's buffer fills (Trio sends only while less than 16 KiB
        is unsent) and the send blocks, holding the websocket's send lock; the kernel
        would not give up for many minutes. The silence watchdog would notice too, but
        later (ping interval + pong deadline). The write itself is shielded (a frame is
        never torn), so closing the stream is what ends it.
        """
        while True:
            await trio.sleep(min(1.0, self.ping_timeout / 4))
            since = self._heartbeat_since
            if since is not None and trio.current_time() - since >= self.ping_timeout:
                logger.warning(
                    "link: a heartbeat has not gone out for %g s; dropping the link", self.ping_timeout
                )
                await trio.aclose_forcefully(stream)
                return

    async def _silence_watchdog(
        self, transport: WebsocketsTransport, stream: trio.abc.Stream, silence: float
    ) -> None:
        """Drop the link once nothing at all has come from the manager for ``silence`` seconds.

        The manager pings every link; on a dead link (a NAT that forgot the connection, a
        cable pulled) nothing arrives, and no read error ever would. Closing the stream
        ends the session's read loop, and the attempt fails like any broken link.
        """
        while True:
            quiet = trio.current_time() - transport.last_received
            if quiet >= silence:
                logger.warning("link: nothing from the manager for %g s; dropping the link", silence)
                await trio.aclose_forcefully(stream)
                return
            await trio.sleep(max(silence - quiet, 0.05))

    async def _send_heartbeat(
        self, session: LinkSession, load: LoadCheck | dict[str, Any], summary: dict[str, Any]
    ) -> None:
        """Send one heartbeat; lists too long for one control message are cut and flagged."""
        keep: int | None = None  # None: whole lists
        while True:
            part = summary
            if keep is not None:
                part = {k: v[:keep] if isinstance(v, list) else v for k, v in summary.items()}
                part["truncated"] = True
            heartbeat = Heartbeat(dict(load), part, int(time.time() * 1000))
            try:
                await session.send_control(self._conversation.send(heartbeat))
                return
            except LinkError:  # over MAX_HEAD_BYTES of JSON
                if keep == 0:
                    raise
                longest = max((len(v) for v in summary.values() if isinstance(v, list)), default=0)
                keep = longest // 2 if keep is None else keep // 2


def _seconds(value: Any, least: float) -> float | None:
    """A duration the manager sent, if it is a number of seconds between ``least`` and 600."""
    if isinstance(value, int | float) and not isinstance(value, bool) and least <= value <= 600:
        return float(value)
    return None
