"""``context.hub``: the host client a sequence gets, calling the API of the hub it runs on.

The original platform gives every sequence a client of its own hub (``this.hub`` in Node,
over a tunnel of its own); ours calls the hub's API over loopback at ``SPACEHUB_HUB_URL``,
which the hub sets for each instance (the process runtime; Podman with ``--podman-network
host``). Standard library only, and loaded on first use: an instance that never asks for it
pays nothing. Each call runs in a worker thread, so the sequence's loop goes on meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Final

#: Seconds one call may take.
CALL_TIMEOUT: Final = 30.0
#: Largest answer read (lists of a busy hub included).
MAX_ANSWER_BYTES: Final = 16 * 1024 * 1024


class HubClientError(Exception):
    """A call to the hub failed: ``status`` (0 when it could not be reached) and its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message


class HubClient:
    """The hub this instance runs on: its version, load, config, status, sequences and
    instances, and starting a sequence (as the original's host client offers)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    def __repr__(self) -> str:
        return f"HubClient({self.base_url!r})"

    async def get_version(self) -> Any:
        return await self._call("GET", "version")

    async def get_load_check(self) -> Any:
        return await self._call("GET", "load-check")

    async def get_config(self) -> Any:
        return await self._call("GET", "config")

    async def get_status(self) -> Any:
        return await self._call("GET", "status")

    async def list_sequences(self) -> Any:
        return await self._call("GET", "sequences")

    async def list_instances(self) -> Any:
        return await self._call("GET", "instances")

    async def list_topics(self) -> Any:
        return await self._call("GET", "topics")

    async def get_sequence(self, sequence_id: str) -> Any:
        return await self._call("GET", f"sequence/{_segment(sequence_id)}")

    async def get_instance(self, instance_id: str) -> Any:
        return await self._call("GET", f"instance/{_segment(instance_id)}")

    async def start_sequence(
        self,
        sequence_id: str,
        app_config: dict[str, Any] | None = None,
        args: list[Any] | None = None,
        **options: Any,
    ) -> Any:
        """Start an instance of ``sequence_id``; its id and info (``{"id", ...}``). ``options``:
        the start request's other fields (``instanceId``, ``inputTopic``, ``outputTopic``, ``limits``)."""
        payload = {"appConfig": app_config or {}, "args": args or [], **options}
        return await self._call("POST", f"sequence/{_segment(sequence_id)}/start", payload)

    async def stop_instance(self, instance_id: str, timeout_ms: int = 7000) -> Any:
        body = {"timeout": timeout_ms, "canCallKeepalive": False}
        return await self._call("POST", f"instance/{_segment(instance_id)}/_stop", body)

    async def kill_instance(self, instance_id: str) -> Any:
        return await self._call("POST", f"instance/{_segment(instance_id)}/_kill", {})

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        if not self.base_url:
            raise HubClientError(0, "this instance has no hub URL (SPACEHUB_HUB_URL is not set)")
        return await asyncio.to_thread(self._blocking_call, method, path, body)

    def _blocking_call(self, method: str, path: str, body: Any) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.base_url}/{path}", data=data, method=method)
        if data is not None:
            request.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=CALL_TIMEOUT) as response:
                raw = response.read(MAX_ANSWER_BYTES + 1)
        except urllib.error.HTTPError as exc:
            raise HubClientError(exc.code, _error_text(exc.read(65536))) from None
        except (urllib.error.URLError, OSError) as exc:
            raise HubClientError(0, f"cannot reach the hub at {self.base_url}: {exc}") from None
        if len(raw) > MAX_ANSWER_BYTES:
            raise HubClientError(0, f"the hub's answer is over {MAX_ANSWER_BYTES} bytes")
        return json.loads(raw) if raw.strip() else None


def _segment(value: str) -> str:
    return urllib.parse.quote(str(value), safe="")


def _error_text(raw: bytes) -> str:
    try:
        document = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace").strip()
    if isinstance(document, dict):
        return str(document.get("error") or document.get("message") or document)
    return str(document)
