"""Join tokens over the Space API, and the software a new hub installs from the manager.

Paths::

    POST   /api/v1/space/:space/api/v1/join-tokens       make one: {id, token, expires, command, cloudInit}
    GET    /api/v1/space/:space/api/v1/join-tokens       the pending ones, without their secrets
    DELETE /api/v1/space/:space/api/v1/join-tokens/:id   revoke one
    GET    /install.sh                                   public: the installer (cpm/install.sh)
    GET    /install/SHA256SUMS                           public: the package's checksum
    GET    /install/spacehub_<version>_all.deb           public: the package

The Space routes sit behind the app's bearer-token gate like every Space route. The install
routes are public: they hand out nothing a stranger could not download from a release page.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import trio

from spacehub.server.http import Request, Response, Router, StreamResponse, json_response

from ..errors import BadRequest, NotFound
from ..joining import INSTALL_PATH, PACKAGE_CHUNK, cloud_init, install_script, join_line
from ..registry import DEFAULT_JOIN_TTL_SECONDS, MAX_JOIN_TTL_SECONDS, IssuedJoinToken
from .space import SPACE_BASE

if TYPE_CHECKING:
    from ..service import Manager

__all__ = ["base_url", "instructions", "join_ttl", "register"]

#: A Host header the manager will write into a command: a name, IPv4 or [IPv6], and a port.
HOST_HEADER: Final = re.compile(r"([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")
_FIELDS: Final = frozenset({"expires", "description", "tags"})


def base_url(manager: Manager, request: Request) -> str:
    """How new machines reach this manager: ``public_url``, else where this call came to."""
    if manager.config.public_url is not None:
        return manager.config.public_url
    host = request.header("host")
    if host is None or HOST_HEADER.fullmatch(host) is None:
        raise BadRequest(
            "cannot tell this manager's address from the Host header; start it with --public-url"
        )
    return ("https" if manager.config.tls else "http") + "://" + host


def join_ttl(expires: Any, now: float) -> float:
    """``expires``: seconds from now, or an ISO-8601 time with its zone."""
    if expires is None:
        return DEFAULT_JOIN_TTL_SECONDS
    if isinstance(expires, bool):
        raise BadRequest("expires is a number of seconds or an ISO-8601 time")
    if isinstance(expires, int | float):
        ttl = float(expires)
    elif isinstance(expires, str):
        try:
            when = datetime.fromisoformat(expires)
        except ValueError:
            raise BadRequest(f"expires is not an ISO-8601 time: {expires[:64]!r}") from None
        if when.tzinfo is None:
            raise BadRequest("expires needs a time zone, e.g. 2027-01-01T00:00:00Z")
        ttl = when.timestamp() - now
    else:
        raise BadRequest("expires is a number of seconds or an ISO-8601 time")
    if not math.isfinite(ttl) or not 0 < ttl <= MAX_JOIN_TTL_SECONDS:
        raise BadRequest(f"a join token must expire in the future and within {MAX_JOIN_TTL_SECONDS} s")
    return ttl


def _tags(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):  # "a,b" as si and the installer take them
        return [tag.strip() for tag in value.split(",") if tag.strip()]
    if isinstance(value, list):
        return value  # the registry checks each
    raise BadRequest("tags are a list of strings (or one comma-separated string)")


async def instructions(manager: Manager, base: str, issued: IssuedJoinToken) -> dict[str, Any]:
    """The token's record with the command and the cloud-init that use it (None, with
    ``commandError`` saying why, when the manager has no package to hand out)."""
    listing = issued.listing
    record: dict[str, Any] = {**listing.record(), "token": issued.token}
    package = await trio.to_thread.run_sync(manager.packages.find)
    if package is None:
        record.update(command=None, cloudInit=None, commandError=manager.packages.missing())
        return record
    tags = list(listing.tags)
    fingerprint = await trio.to_thread.run_sync(manager.ca_fingerprint)
    record["command"] = join_line(base, fingerprint, listing.space, issued.token, listing.description, tags)
    record["cloudInit"] = cloud_init(
        base, manager.ca_pem(), listing.space, issued.token, listing.description, tags
    )
    return record


def register(router: Router, manager: Manager) -> None:
    registry = manager.registry
    sessions = manager.sessions

    async def create(request: Request) -> Response:
        body = await request.json(default={})
        if not isinstance(body, dict):
            raise BadRequest("the body is a JSON object: {expires?, description?, tags?}")
        unknown = sorted(set(body) - _FIELDS)
        if unknown:
            raise BadRequest(f"unknown field(s) {', '.join(unknown)}; known: expires, description, tags")
        description = body.get("description") or ""
        issued = await sessions.db(
            registry.issue_join_token,
            request.params["space"],
            join_ttl(body.get("expires"), time.time()),
            description,
            _tags(body.get("tags")),
        )
        return json_response(await instructions(manager, base_url(manager, request), issued))

    async def listing(request: Request) -> Response:
        tokens = await sessions.db(registry.list_join_tokens, request.params["space"])
        return json_response([token.record() for token in tokens])

    async def revoke(request: Request) -> Response:
        token = await sessions.db(registry.revoke_join_token, request.params["space"], request.params["id"])
        return json_response(token.record())

    async def script(request: Request) -> Response:
        package = await trio.to_thread.run_sync(manager.packages.find)
        text = install_script(base_url(manager, request), package, manager.packages.missing())
        return Response(200, text.encode(), "text/x-shellscript; charset=utf-8")

    async def checksums(request: Request) -> Response:
        package = await trio.to_thread.run_sync(manager.packages.find)
        if package is None:
            raise NotFound(manager.packages.missing())
        return Response(200, f"{package.sha256}  {package.name}\n".encode(), "text/plain; charset=utf-8")

    async def package_file(request: Request) -> StreamResponse:
        package = await trio.to_thread.run_sync(manager.packages.find)
        if package is None:
            raise NotFound(manager.packages.missing())
        if request.params["name"] != package.name:
            raise NotFound(f"this manager hands out {package.name} only")

        async def chunks() -> AsyncIterator[bytes]:
            async with await trio.open_file(package.path, "rb") as file:
                while chunk := await file.read(PACKAGE_CHUNK):
                    yield chunk

        return StreamResponse(chunks(), "application/vnd.debian.binary-package")

    router.add("POST", f"{SPACE_BASE}/join-tokens", create)
    router.add("GET", f"{SPACE_BASE}/join-tokens", listing)
    router.add("DELETE", f"{SPACE_BASE}/join-tokens/:id", revoke)
    router.add("GET", "/install.sh", script)
    router.add("GET", f"{INSTALL_PATH}/SHA256SUMS", checksums)
    router.add("GET", f"{INSTALL_PATH}/:name", package_file)
