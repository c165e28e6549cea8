"""Sequence routes: upload, list, info, replace, delete, start."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spacehub.server.http import Request, Response, Router, json_response, parse_bool_header

from .. import limits
from ..errors import ArchiveTooLarge, BadRequest, SequenceInUse, UnsupportedMediaType
from ..topics import check_name

if TYPE_CHECKING:
    from ..service import Hub

#: Content types a package upload may carry (or none at all).
PACKAGE_TYPES = frozenset(
    {
        "application/octet-stream",
        "application/gzip",
        "application/x-gzip",
        "application/x-tar",
        "application/x-compressed-tar",
    }
)


def _check_package_type(request: Request) -> None:
    if request.content_type is not None and request.content_type not in PACKAGE_TYPES:
        raise UnsupportedMediaType(
            f"send the package as a raw tar.gz body with Content-Type application/octet-stream,"
            f" not {request.content_type}"
        )


def _check_announced_size(request: Request) -> None:
    """Refuse a package whose Content-Length is over the bound before reading any of it."""
    length = request.header("content-length")
    if length is not None and length.isdigit() and int(length) > limits.MAX_PACKAGE_COMPRESSED_BYTES:
        raise ArchiveTooLarge(
            f"package of {int(length)} bytes is over the limit of {limits.MAX_PACKAGE_COMPRESSED_BYTES}"
        )


def _start_payload(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest("start options must be a JSON object")
    checks = {
        "appConfig": (dict, "an object"),
        "args": (list, "an array"),
        "instanceId": (str, "a string"),
        "inputTopic": (str, "a string"),
        "outputTopic": (str, "a string"),
        "limits": (dict, "an object"),
    }
    for key, (kind, text) in checks.items():
        if value.get(key) is not None and not isinstance(value[key], kind):
            raise BadRequest(f"{key} must be {text}")
    _check_limits(value.get("limits") or {})
    for key in ("inputTopic", "outputTopic"):
        if value.get(key):
            check_name(value[key])  # 400 now, rather than a start that connects nothing
    return value


def _check_limits(requested: dict[str, Any]) -> None:
    """Each limit a known name with a positive number up to its bound: a limit that cannot be
    read must refuse the start, never run the instance without it."""
    for name, amount in requested.items():
        bound = limits.MAX_LIMITS.get(name)
        if bound is None:
            known = ", ".join(sorted(limits.MAX_LIMITS))
            raise BadRequest(f"limits.{name} is not a limit this hub knows ({known})")
        if isinstance(amount, bool) or not isinstance(amount, int | float) or not 0 < amount <= bound:
            raise BadRequest(f"limits.{name} must be a number above 0 and at most {bound}")
        if name == "pids" and amount != int(amount):
            raise BadRequest("limits.pids must be a whole number")


def register(router: Router, hub: Hub) -> None:
    store, supervisor = hub.store, hub.supervisor

    async def list_sequences(request: Request) -> Response:
        return json_response([s.info() for s in store.list()])

    async def upload(request: Request) -> Response:
        _check_package_type(request)
        _check_announced_size(request)
        sequence = await store.add(request.stream())
        hub.logger.info(
            "sequence %s uploaded (%s %s)", sequence.id, sequence.package.name, sequence.package.version
        )
        return json_response({"id": sequence.id}, 202)

    async def replace(request: Request) -> Response:
        _check_package_type(request)
        sequence = store.get(request.params["id"])
        if any(supervisor.get(i).is_live for i in sequence.instances):
            raise SequenceInUse("Can't update sequence with instances running")
        sequence = await store.replace(sequence.id, request.stream())
        return json_response({"id": sequence.id})

    async def info(request: Request) -> Response:
        return json_response(store.get(request.params["id"]).info())

    async def instances(request: Request) -> Response:
        return json_response(list(store.get(request.params["id"]).instances))

    async def delete(request: Request) -> Response:
        sequence = store.get(request.params["id"])
        force = parse_bool_header(request.header("x-seq-kill-inst"), False)
        live = [supervisor.get(i) for i in sequence.instances if supervisor.get(i).is_live]
        if live and not force:
            raise SequenceInUse(
                f"Can't remove sequence in use: {len(live)} instance(s) running;"
                " kill them first or send the header x-seq-kill-inst: true"
            )
        if live:
            await supervisor.kill_and_wait(live)
        await store.remove(sequence.id)
        hub.logger.info("sequence %s deleted", sequence.id)
        return json_response({"id": sequence.id, "opStatus": "OK"})

    async def start(request: Request) -> Response:
        sequence = store.get(request.params["id"])
        payload = _start_payload(await request.json(default={}))
        instance = await supervisor.start(sequence, payload)
        return json_response(
            {"result": "success", "message": f"Sequence {instance.id} starting", **instance.info()}
        )

    router.add("GET", "/sequences", list_sequences)
    router.add("POST", "/sequence", upload)
    router.add("GET", "/sequence/:id", info)
    router.add("PUT", "/sequence/:id", replace)
    router.add("DELETE", "/sequence/:id", delete)
    router.add("GET", "/sequence/:id/instances", instances)
    router.add("POST", "/sequence/:id/start", start)
