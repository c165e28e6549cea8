"""The console: server-rendered pages at ``/console/`` on the manager's own port and TLS.

Paths (all under ``/console``)::

    GET  /login, POST /login, POST /logout     sign in with an API token, sign out
    GET  /login/once/:code                     a one-time login link (``make run`` prints one)
    GET  /fleet?tag=&state=                    every hub, counts, filters
    GET  /fleet/events?tag=&state=             Server-Sent Events: the rows that changed
    GET  /hubs/:id                             a hub: load chart, sequences, instances, its log
    POST /hubs/:id/sequences                   upload a package (the raw body, from the page's script)
    POST /hubs/:id/sequences/:seq/start        start it (form: args, appConfig as JSON)
    POST /hubs/:id/sequences/:seq/delete
    GET  /hubs/:id/instances/:inst             an instance: live output, stdout, stderr, log, events
    POST /hubs/:id/instances/:inst/stop|kill
    GET  /hubs/:id/tail/log                    SSE: the hub's log
    GET  /hubs/:id/instances/:inst/tail/:name  SSE: an instance's stream
    POST /hubs/:id/revoke                      revoke a hub
    GET  /topics                               the Space's topics
    GET  /join, POST /join                     hubs and joining: make a join token, see its line
    POST /join/:token/revoke
    GET  /static/:name                         the stylesheet and the script

Every page needs a session (its cookie holds only a random id); every POST also needs the
session's CSRF token (a form field, or the ``X-CSRF-Token`` header from the script). The
API token a session signed in with is checked again on each request, so revoking it signs
the console out. Pages carry no API token; a join line (with its one-time join token) is
shown once, right after it is made.
"""

from __future__ import annotations

import codecs
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, quote, urlencode

import jinja2
import trio
from markupsafe import Markup

from spacehub.server.errors import HttpError
from spacehub.server.http import Request, Response, Router, StreamResponse, json_response

from ..api.joining import base_url, instructions, join_ttl
from ..errors import BadRequest, ConsoleRefused, HubUnavailable, NotFound
from ..loadhistory import HISTORY_MINUTES
from ..registry import DEFAULT_JOIN_TTL_SECONDS, Hub
from ..topics import topic_listing
from .auth import SESSION_SECONDS, ConsoleSession, ConsoleSessions, same_secret
from .fleet import STATES, FleetView, hub_row
from .hubcall import hub_json, hub_stream

if TYPE_CHECKING:
    from ..link.sessions import HubSession
    from ..service import Manager

__all__ = ["Console", "register"]

logger = logging.getLogger("cpm.console")

BASE: Final = "/console"
SESSION_COOKIE: Final = "spacehub_console"
LOGIN_COOKIE: Final = "spacehub_console_login"
#: Largest form body (sign-in, start, join token) the console reads.
MAX_FORM_BYTES: Final = 64 * 1024
#: Seconds between the fleet page's live updates (and its keep-alive).
FLEET_PUSH_SECONDS: Final = 2.0
#: Seconds with nothing to send before a comment keeps an event stream open through proxies.
KEEPALIVE_SECONDS: Final = 15.0
#: Event streams (fleet, tails) open at once on this manager; past it, new ones get 503.
MAX_LIVE_STREAMS: Final = 256
#: Largest piece of a tail sent as one event (a chunk from the hub may be larger).
TAIL_EVENT_CHARS: Final = 16 * 1024
#: The streams an instance page tails.
INSTANCE_STREAMS: Final = ("output", "stdout", "stderr", "log", "events")
STATIC_FILES: Final = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}

#: Sent with every console response.
SECURITY_HEADERS: Final = [
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cache-control", "no-store"),
]


def _cookies(request: Request) -> dict[str, str]:
    jar: dict[str, str] = {}
    for part in (request.header("cookie") or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            jar.setdefault(name, value)
    return jar


def _query(request: Request, name: str) -> str | None:
    values = parse_qs(request.scope.get("query_string", b"").decode("latin-1")).get(name)
    return values[0] if values else None


def _redirect(location: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(303, b"", None, [("location", location), *SECURITY_HEADERS, *(headers or [])])


def _safe_next(value: str | None) -> str:
    """Only console paths: a login never sends its user elsewhere."""
    if value and value.startswith(BASE + "/") and not value.startswith("//") and "\\" not in value:
        return value
    return BASE + "/fleet"


def _parse_json_field(name: str, text: str, default: Any) -> Any:
    if not text.strip():
        return default
    try:
        return json.loads(text, parse_constant=lambda c: _bad_constant(name, c))
    except ValueError as exc:
        raise BadRequest(f"{name} is not valid JSON: {exc}") from None


def _bad_constant(name: str, constant: str) -> Any:
    raise BadRequest(f"{name}: {constant} is not a number JSON allows")


def _sse(event: str | None, data: str) -> bytes:
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return (f"event: {event}\n" if event else "").encode() + lines.encode() + b"\n"


def _chart(points: list[tuple[int, float, float, float]], now: float) -> dict[str, Any]:
    """The load chart's polylines (SVG coordinates: 0..600 wide for the hour, 0..100 high).

    Each point holds for its minute, so it is drawn as a step across that minute: a single
    point is a short line, not an invisible dot.
    """
    start = now - HISTORY_MINUTES * 60

    def x(when: float) -> str:
        return f"{min(max((when - start) / 6, 0.0), 600.0):.1f}"

    lines: dict[str, str] = {}
    for index, name in enumerate(("cpu", "memory", "disk"), start=1):
        lines[name] = " ".join(
            f"{x(point[0])},{100 - point[index]:.1f} {x(point[0] + 60)},{100 - point[index]:.1f}"
            for point in points
        )
    latest = points[-1] if points else None
    return {"lines": lines, "count": len(points), "latest": latest}


class Console:
    """The console's state: templates, sessions, the fleet view; see the module docstring."""

    def __init__(self, manager: Manager, token_allows: Callable[[str, str], Awaitable[bool]]) -> None:
        self.manager = manager
        self.sessions = ConsoleSessions(time.time)
        self._token_allows = token_allows
        self.fleet = FleetView(manager.sessions, self._list_hubs, BASE)
        self.live_streams = 0
        #: the stylesheet and the script, read once (a few KB)
        self.static_files = {
            name: resources.files("cpm.console").joinpath("static").joinpath(name).read_bytes()
            for name in STATIC_FILES
        }
        self._templates = jinja2.Environment(
            loader=jinja2.PackageLoader("cpm.console", "templates"),
            autoescape=True,
            # Instances and sequences differ by runtime and version: a missing key shows as nothing.
            undefined=jinja2.ChainableUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    async def _list_hubs(self, space: str) -> list[Hub]:
        registry = self.manager.registry
        return await self.manager.sessions.db(registry.list_hubs, space, include_revoked=False)

    # -- sessions -------------------------------------------------------------------------------

    def secure_attribute(self) -> str:
        return "; Secure" if self.manager.config.tls else ""

    def session_cookie(self, session: ConsoleSession) -> tuple[str, str]:
        return (
            "set-cookie",
            f"{SESSION_COOKIE}={session.id}; Path={BASE}; HttpOnly; SameSite=Strict; "
            f"Max-Age={SESSION_SECONDS}{self.secure_attribute()}",
        )

    def clear_cookie(self, name: str) -> tuple[str, str]:
        return (
            "set-cookie",
            f"{name}=; Path={BASE}; HttpOnly; SameSite=Strict; Max-Age=0{self.secure_attribute()}",
        )

    async def session_of(self, request: Request) -> ConsoleSession | None:
        """The request's live session; a session whose API token was revoked ends here."""
        session = self.sessions.get(_cookies(request).get(SESSION_COOKIE))
        if session is None:
            return None
        if not await self._token_allows(session.space, session.token):
            self.sessions.sign_out(session.id)
            return None
        return session

    async def require(self, request: Request) -> ConsoleSession:
        """The session of a state-changing request, with its CSRF token checked."""
        session = await self.session_of(request)
        if session is None:
            raise ConsoleRefused()
        return session

    def check_csrf(self, request: Request, session: ConsoleSession, form: dict[str, str]) -> None:
        given = form.get("csrf") or request.header("x-csrf-token")
        if not same_secret(given, session.csrf):
            raise ConsoleRefused("Forbidden: the form's CSRF token is missing or wrong; reload the page")

    async def spaces_opened_by(self, token: str) -> list[str]:
        registry = self.manager.registry

        def opened() -> list[str]:
            return [s.name for s in registry.list_spaces() if registry.check_api_token(s.name, token)]

        return await trio.to_thread.run_sync(opened)

    # -- rendering ------------------------------------------------------------------------------

    def page(
        self,
        template: str,
        session: ConsoleSession | None,
        status: int = 200,
        headers: list[tuple[str, str]] | None = None,
        **values: Any,
    ) -> Response:
        html = self._templates.get_template(template).render(
            session=session,
            space=session.space if session else None,
            csrf=session.csrf if session else None,
            base=BASE,
            **values,
        )
        return Response(
            status, html.encode(), "text/html; charset=utf-8", [*SECURITY_HEADERS, *(headers or [])]
        )

    def error_page(self, session: ConsoleSession | None, error: HttpError) -> Response:
        return self.page("error.html", session, status=error.status, message=error.message)

    async def form(self, request: Request) -> dict[str, str]:
        raw = await request.body(MAX_FORM_BYTES)
        kind = request.content_type
        if raw and kind not in (None, "application/x-www-form-urlencoded"):
            raise BadRequest(f"expected a form (application/x-www-form-urlencoded), not {kind}")
        try:
            parsed = parse_qs(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=100)
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequest(f"the form is not valid: {exc}") from None
        return {name: values[0] for name, values in parsed.items()}

    def hub_session(self, session: ConsoleSession, hub_id: str) -> HubSession:
        live = self.manager.sessions.live(hub_id)
        if live is None or live.space != session.space:
            raise HubUnavailable(f"Hub {hub_id} is not connected")
        return live

    async def hub_in_space(self, session: ConsoleSession, hub_id: str) -> Hub:
        hub = await self.manager.sessions.db(self.manager.registry.get_hub, hub_id)
        if hub.space != session.space or hub.revoked:
            raise NotFound(f"hub {hub_id!r} not found")
        return hub

    # -- live streams ---------------------------------------------------------------------------

    def stream(self, chunks: AsyncIterator[bytes]) -> StreamResponse:
        if self.live_streams >= MAX_LIVE_STREAMS:
            raise HubUnavailable(f"too many live console streams open (at most {MAX_LIVE_STREAMS})")
        self.live_streams += 1

        def closed() -> None:
            self.live_streams -= 1

        return StreamResponse(
            chunks, "text/event-stream; charset=utf-8", on_close=closed, headers=list(SECURITY_HEADERS)
        )

    async def fleet_events(self, space: str, tag: str | None, state: str | None) -> AsyncIterator[bytes]:
        """The rows that changed since the last event (all of them first), and the counts."""
        sent: dict[str, tuple[Any, ...]] = {}
        quiet_since = trio.current_time()
        yield b"retry: 3000\n\n"
        while True:
            snapshot = await self.fleet.snapshot(space)
            rows = snapshot.select(tag, state)
            changed = [row for row in rows if sent.get(row.id) != row.key]
            shown = {row.id for row in rows}
            removed = [hub_id for hub_id in sent if hub_id not in shown]
            if changed or removed or not sent:
                for row in changed:
                    sent[row.id] = row.key
                for hub_id in removed:
                    del sent[hub_id]
                # The rows' JSON is made once per change by the shared snapshot, not per console.
                payload = (
                    f'{{"counts":{json.dumps(snapshot.counts_of(rows, tag, state))},'
                    f'"rows":[{",".join(row.json for row in changed)}],'
                    f'"removed":{json.dumps(removed)}}}'
                )
                yield _sse("hubs", payload)
                quiet_since = trio.current_time()
            elif trio.current_time() - quiet_since >= KEEPALIVE_SECONDS:
                yield b": keep-alive\n\n"
                quiet_since = trio.current_time()
            await trio.sleep(FLEET_PUSH_SECONDS)

    async def tail_events(self, source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """A hub's stream as events, each a JSON string of text (bytes decoded as UTF-8)."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        yield b"retry: 3000\n\n"
        try:
            async for chunk in source:
                text = decoder.decode(chunk)
                for start in range(0, len(text), TAIL_EVENT_CHARS):
                    yield _sse(None, json.dumps(text[start : start + TAIL_EVENT_CHARS]))
        except HttpError as exc:
            yield _sse("failed", json.dumps(exc.message))
            return
        yield _sse("end", json.dumps("(the stream ended)"))


def register(router: Router, console: Console) -> None:
    manager = console.manager
    registry = manager.registry

    def page_route(
        handler: Callable[[Request, ConsoleSession], Awaitable[Response | StreamResponse]],
    ) -> Callable[[Request], Awaitable[Response | StreamResponse]]:
        """A page that needs a session: without one, to the sign-in form; errors as a page."""

        async def route(request: Request) -> Response | StreamResponse:
            session = await console.session_of(request)
            if session is None:
                if request.header("accept") == "text/event-stream":
                    raise ConsoleRefused()
                return _redirect(f"{BASE}/login?{urlencode({'next': request.path})}")
            try:
                return await handler(request, session)
            except HttpError as exc:
                return console.error_page(session, exc)

        return route

    def action_route(
        handler: Callable[[Request, ConsoleSession, dict[str, str]], Awaitable[Response]],
        *,
        form: bool = True,
    ) -> Callable[[Request], Awaitable[Response]]:
        """A state-changing request: a session and its CSRF token, or 403 before anything."""

        async def route(request: Request) -> Response:
            session = await console.require(request)
            fields = await console.form(request) if form else {}
            console.check_csrf(request, session, fields)
            return await handler(request, session, fields)

        return route

    # -- signing in and out -----------------------------------------------------------------------

    async def root(request: Request) -> Response:
        return _redirect(f"{BASE}/fleet")

    async def login_form(request: Request, message: str | None = None, status: int = 200) -> Response:
        # Login CSRF: the form's value must match this cookie's (double submit), so no other
        # site can sign a browser in to a Space of its choosing.
        nonce = _cookies(request).get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
        cookie = (
            "set-cookie",
            f"{LOGIN_COOKIE}={nonce}; Path={BASE}; HttpOnly; SameSite=Strict; Max-Age=3600"
            + console.secure_attribute(),
        )
        return console.page(
            "login.html",
            None,
            status=status,
            headers=[cookie],
            login_csrf=nonce,
            next=_safe_next(_query(request, "next")),
            message=message,
        )

    async def login_page(request: Request) -> Response:
        if await console.session_of(request) is not None:
            return _redirect(_safe_next(_query(request, "next")))
        return await login_form(request)

    async def login(request: Request) -> Response:
        fields = await console.form(request)
        nonce = _cookies(request).get(LOGIN_COOKIE)
        if nonce is None or not same_secret(fields.get("csrf"), nonce):
            raise ConsoleRefused("Forbidden: the sign-in form expired; reload it and sign in again")
        token = fields.get("token", "").strip()
        spaces = await console.spaces_opened_by(token) if token else []
        if not spaces:
            return await login_form(request, "That token opens no Space on this manager.", 403)
        session = console.sessions.sign_in(token, spaces)
        logger.info("console: signed in to %s", session.space)
        return _redirect(
            _safe_next(fields.get("next")),
            [console.session_cookie(session), console.clear_cookie(LOGIN_COOKIE)],
        )

    async def login_once(request: Request) -> Response:
        redeemed = console.sessions.redeem_login_link(request.params["code"])
        if redeemed is None or not await console._token_allows(*redeemed):
            return await login_form(request, "That login link was used already or has expired.", 403)
        space, token = redeemed
        spaces = await console.spaces_opened_by(token)
        session = console.sessions.sign_in(token, [space, *(s for s in spaces if s != space)])
        return _redirect(f"{BASE}/fleet", [console.session_cookie(session)])

    async def logout(request: Request, session: ConsoleSession, form: dict[str, str]) -> Response:
        console.sessions.sign_out(session.id)
        return _redirect(f"{BASE}/login", [console.clear_cookie(SESSION_COOKIE)])

    async def switch_space(request: Request, session: ConsoleSession, form: dict[str, str]) -> Response:
        wanted = form.get("space", "")
        if wanted not in session.spaces:
            raise BadRequest(f"this session does not open the space {wanted!r}")
        session.spaces.remove(wanted)
        session.spaces.insert(0, wanted)
        return _redirect(f"{BASE}/fleet")

    # -- the fleet --------------------------------------------------------------------------------

    async def fleet(request: Request, session: ConsoleSession) -> Response:
        tag = _query(request, "tag") or None
        state = _query(request, "state") or None
        if state is not None and state not in STATES.values():
            raise BadRequest(f"state is one of {', '.join(STATES.values())}")
        snapshot = await console.fleet.snapshot(session.space)
        rows = snapshot.select(tag, state)
        return console.page(
            "fleet.html",
            session,
            rows_html=Markup("".join(row.html for row in rows)),
            shown=len(rows),
            counts=snapshot.counts_of(rows, tag, state),
            all_counts=snapshot.all_counts,
            tags=snapshot.all_tags,
            tag=tag or "",
            state=state or "",
            states=list(STATES.values()),
            events_url=f"{BASE}/fleet/events?{urlencode({'tag': tag or '', 'state': state or ''})}",
        )

    async def fleet_stream(request: Request, session: ConsoleSession) -> StreamResponse:
        tag = _query(request, "tag") or None
        state = _query(request, "state") or None
        return console.stream(console.fleet_events(session.space, tag, state))

    # -- a hub ------------------------------------------------------------------------------------

    async def hub_page(request: Request, session: ConsoleSession) -> Response:
        hub_id = request.params["id"]
        hub = await console.hub_in_space(session, hub_id)
        record = dict(manager.sessions.record(hub))
        report = manager.sessions.last_report(hub_id)
        now = time.time()
        points = report.history.points(now) if report is not None and report.history is not None else []
        live = manager.sessions.live(hub_id)
        sequences: list[Any] = []
        instances: list[Any] = []
        problem = None
        if live is not None:
            try:
                sequences = await hub_json(live, "GET", "/sequences") or []
                instances = await hub_json(live, "GET", "/instances") or []
            except HttpError as exc:
                problem = exc.message
        else:
            problem = "The hub is not connected: its sequences and instances cannot be read now."
        return console.page(
            "hub.html",
            session,
            hub=record,
            row=hub_row(record),
            chart=_chart(points, now),
            sequences=[s for s in sequences if isinstance(s, dict)],
            instances=[i for i in instances if isinstance(i, dict)],
            problem=problem,
            connected=live is not None,
        )

    async def upload(request: Request, session: ConsoleSession, form: dict[str, str]) -> Response:
        live = console.hub_session(session, request.params["id"])
        answer = await hub_json(live, "POST", "/sequence", request.stream(), "application/octet-stream")
        return json_response(answer)

    async def start(request: Request, session: ConsoleSession, form: dict[str, str]) -> Response:
        hub_id, sequence_id = request.params["id"], request.params["seq"]
        live = console.hub_session(session, hub_id)
        args = _parse_json_field("args", form.get("args", ""), [])
        if not isinstance(args, list):
            raise BadRequest('args is a JSON list, e.g. ["Hi", 3]')
        app_config = _parse_json_field("appConfig", form.get("appConfig", ""), {})
        if not isinstance(app_config, dict):
            raise BadRequest('appConfig is a JSON object, e.g. {"rate": 10}')
        body = json.dumps({"args": args, "appConfig": app_config}).encode()

        async def chunks() -> AsyncIterator[bytes]:
            yield body

        answer = await hub_json(
            live, "POST", f"/sequence/{quote(sequence_id, safe='')}/start", chunks(), "application/json"
        )
        instance_id = answer.get("id") if isinstance(answer, dict) else None
        if not instance_id:
            return _redirect(f"{BASE}/hubs/{quote(hub_id)}")
        return _redirect(f"{BASE}/hubs/{quote(hub_id)}/instances/{quote(str(instance_id))}")

    async def delete_sequence(request: Request, session: ConsoleSession, form: dict[str, str]) -> Response:
        hub_id, sequence_id = request.params["id"], request.params["seq"]
        live = console.hub_session(session, hub_id)
        await hub_json(live, "DELETE", f"/sequence/{quote(sequence_id, safe='')}")
        return _redirect(f"{BASE}/hubs/{quote(hub_id)}")

    def instance_action(
        action: str,
    ) -> Callable[[Request, ConsoleSession, dict[str, str]], Awaitable[Response]]:
        async def handler(request: Request, session: ConsoleSession, form: dict[str, str]) -> Response:
            hub_id, instance_id = request.params["id"], request.params["inst"]
            live = console.hub_session(session, hub_id)
            await hub_json(live, "POST", f"/instance/{quote(instance_id, safe='')}/_{action}")
            return _redirect(
                _safe_next(form.get("next")) if form.get("next") else f"{BASE}/hubs/{quote(hub_id)}"
            )

        return handler

    async def instance_page(request: Request, session: ConsoleSession) -> Response:
        hub_id, instance_id = request.params["id"], request.params["inst"]
        await console.hub_in_space(session, hub_id)
        live = console.hub_session(session, hub_id)
        info = await hub_json(live, "GET", f"/instance/{quote(instance_id, safe='')}")
        return console.page(
            "instance.html",
            session,
            hub_id=hub_id,
            instance_id=instance_id,
            info=info if isinstance(info, dict) else {},
            streams=INSTANCE_STREAMS,
        )

    async def instance_tail(request: Request, session: ConsoleSession) -> StreamResponse:
        hub_id, instance_id, name = request.params["id"], request.params["inst"], request.params["name"]
        if name not in INSTANCE_STREAMS:
            raise NotFound(f"no stream {name!r}; streams: {', '.join(INSTANCE_STREAMS)}")
        live = console.hub_session(session, hub_id)
        return console.stream(
            console.tail_events(hub_stream(live, f"/instance/{quote(instance_id, safe='')}/{name}"))
        )

    async def hub_log_tail(request: Request, session: ConsoleSession) -> StreamResponse:
        live = console.hub_session(session, request.params["id"])
        return console.stream(console.tail_events(hub_stream(live, "/log")))

    async def revoke_hub(request: Request, session: ConsoleSession, form: dict[str, str]) -> Response:
        hub = await console.hub_in_space(session, request.params["id"])
        await manager.sessions.db(registry.revoke_hub, hub.id, "revoked from the console")
        return _redirect(f"{BASE}/join")

    # -- topics, hubs and joining -------------------------------------------------------------------

    async def topics(request: Request, session: ConsoleSession) -> Response:
        hubs = await console._list_hubs(session.space)
        items = manager.sessions.aggregate(session.space, "topics", {hub.id for hub in hubs})
        return console.page(
            "topics.html", session, topics=topic_listing(manager.topics, session.space, items)
        )

    async def join_page(
        request: Request, session: ConsoleSession, made: dict[str, Any] | None = None
    ) -> Response:
        tokens = await manager.sessions.db(registry.list_join_tokens, session.space)
        snapshot = await console.fleet.snapshot(session.space)
        return console.page(
            "join.html",
            session,
            tokens=[token.record() for token in tokens],
            hubs=[row.data for row in snapshot.rows],
            made=made,
            default_hours=int(DEFAULT_JOIN_TTL_SECONDS // 3600),
        )

    async def make_join_token(request: Request, session: ConsoleSession, form: dict[str, str]) -> Response:
        try:
            hours = float(form.get("hours") or DEFAULT_JOIN_TTL_SECONDS / 3600)
        except ValueError:
            raise BadRequest("hours is a number") from None
        ttl = join_ttl(hours * 3600, time.time())
        tags = [tag.strip() for tag in form.get("tags", "").split(",") if tag.strip()]
        issued = await manager.sessions.db(
            registry.issue_join_token, session.space, ttl, form.get("description", "").strip(), tags
        )
        made = await instructions(manager, base_url(manager, request), issued)
        try:
            return await join_page(request, session, made)
        except HttpError as exc:
            return console.error_page(session, exc)

    async def revoke_join_token(request: Request, session: ConsoleSession, form: dict[str, str]) -> Response:
        await manager.sessions.db(registry.revoke_join_token, session.space, request.params["token"])
        return _redirect(f"{BASE}/join")

    async def static(request: Request) -> Response:
        name = request.params["name"]
        kind = STATIC_FILES.get(name)
        if kind is None:
            raise NotFound(f"no console file {name!r}")
        body = console.static_files[name]
        headers = [h for h in SECURITY_HEADERS if h[0] != "cache-control"] + [
            ("cache-control", "max-age=300")
        ]
        return Response(200, body, kind, headers)

    async def join_get(request: Request, session: ConsoleSession) -> Response:
        return await join_page(request, session)

    router.add("GET", "/", root)
    router.add("GET", BASE, root)
    router.add("GET", f"{BASE}/login", login_page)
    router.add("POST", f"{BASE}/login", login)
    router.add("GET", f"{BASE}/login/once/:code", login_once)
    router.add("POST", f"{BASE}/logout", action_route(logout))
    router.add("POST", f"{BASE}/space", action_route(switch_space))
    router.add("GET", f"{BASE}/fleet", page_route(fleet))
    router.add("GET", f"{BASE}/fleet/events", page_route(fleet_stream))
    router.add("GET", f"{BASE}/hubs/:id", page_route(hub_page))
    router.add("POST", f"{BASE}/hubs/:id/sequences", action_route(upload, form=False))
    router.add("POST", f"{BASE}/hubs/:id/sequences/:seq/start", action_route(start))
    router.add("POST", f"{BASE}/hubs/:id/sequences/:seq/delete", action_route(delete_sequence))
    router.add("GET", f"{BASE}/hubs/:id/instances/:inst", page_route(instance_page))
    router.add("POST", f"{BASE}/hubs/:id/instances/:inst/stop", action_route(instance_action("stop")))
    router.add("POST", f"{BASE}/hubs/:id/instances/:inst/kill", action_route(instance_action("kill")))
    router.add("GET", f"{BASE}/hubs/:id/instances/:inst/tail/:name", page_route(instance_tail))
    router.add("GET", f"{BASE}/hubs/:id/tail/log", page_route(hub_log_tail))
    router.add("POST", f"{BASE}/hubs/:id/revoke", action_route(revoke_hub))
    router.add("GET", f"{BASE}/topics", page_route(topics))
    router.add("GET", f"{BASE}/join", page_route(join_get))
    router.add("POST", f"{BASE}/join", action_route(make_join_token))
    router.add("POST", f"{BASE}/join/:token/revoke", action_route(revoke_join_token))
    router.add("GET", f"{BASE}/static/:name", static)
