"""The OpenAPI documents: served by the real daemons, valid OpenAPI 3.1, and equal to what
their routers serve, both ways (every route documented, every documented route served)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from agent.api.app import API_BASE, build_router
from agent.api.openapi import OPERATIONS as HUB_OPERATIONS
from agent.config import HubConfig
from agent.service import Hub
from agent.streams import RecordRing
from cpm.api.app import ManagerApp
from cpm.api.openapi import FAULT_OPERATIONS, FORWARDED
from cpm.api.openapi import OPERATIONS as MANAGER_OPERATIONS
from cpm.config import ManagerConfig
from cpm.registry import Registry
from cpm.service import Manager
from harness.daemons import run_sth
from spacehub.server.openapi import mismatches, path_template
from tests.cpm_helpers import run_cpm
from tests.e2e.test_link_e2e import ssl_context

METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


def operations_of(doc: dict[str, Any], prefix: str = "") -> set[tuple[str, str]]:
    return {
        (method.upper(), prefix + path)
        for path, item in doc["paths"].items()
        for method in item
        if method in METHODS
    }


def check_shape(doc: dict[str, Any]) -> None:
    """What OpenAPI 3.1 asks of each operation, checked here (the fuzzing test reads the
    documents with schemathesis, which refuses an invalid one)."""
    assert doc["openapi"] == "3.1.0" and doc["info"]["title"] and doc["info"]["version"]
    for path, item in doc["paths"].items():
        names = set(re.findall(r"{(\w+)}", path))
        declared = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
        assert names == declared, path
        for method, operation in item.items():
            if method not in METHODS:
                continue
            assert operation["summary"] and operation["responses"], (method, path)
            for status in operation["responses"]:
                assert status == "default" or re.fullmatch(r"[1-5][0-9][0-9]", status), status


def test_hub_document_matches_its_router(tmp_path: Path) -> None:
    hub = Hub(
        HubConfig(data_dir=tmp_path, sequences_root=tmp_path / "seq"), RecordRing(10), logging.getLogger("t")
    )
    served = build_router(hub).routes()
    undocumented, unserved = mismatches(((m, p) for m, p, _ in HUB_OPERATIONS), served)
    assert not undocumented, f"routes with no entry in agent/api/openapi.py: {sorted(undocumented)}"
    assert not unserved, f"documented but not served: {sorted(unserved)}"


@pytest.mark.parametrize("faults", [False, True])
async def test_manager_document_matches_its_router(tmp_path: Path, faults: bool) -> None:
    config = ManagerConfig(data_dir=tmp_path, fault_injection=faults)
    app = ManagerApp(Manager(config, Registry(tmp_path / "r.sqlite3")))
    operations = [*MANAGER_OPERATIONS, *(FAULT_OPERATIONS if faults else [])]
    documented = [(m, p) for m, p, _ in operations if p != FORWARDED]
    undocumented, unserved = mismatches(documented, app.router.routes())
    assert not undocumented, f"routes with no entry in cpm/api/openapi.py: {sorted(undocumented)}"
    assert not unserved, f"documented but not served: {sorted(unserved)}"
    await trio.sleep(0)


def test_hub_serves_its_document(tmp_path: Path) -> None:
    with run_sth(tmp_path / "seq") as hub, httpx.Client(timeout=20) as client:
        answer = client.get(f"http://{hub.address}{API_BASE}/openapi.json")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/json")
        doc = answer.json()
        check_shape(doc)
        assert doc["servers"] == [{"url": "/api/v1"}]
        assert operations_of(doc) == {(m, path_template(p)) for m, p, _ in HUB_OPERATIONS}
        # Every documented GET without a parameter answers (long polls and streams aside).
        for method, path in sorted(operations_of(doc)):
            if method != "GET" or "{" in path or path in ("/log",):
                continue
            got = client.get(f"http://{hub.address}{API_BASE}{path}")
            assert got.status_code == 200, (path, got.text[:200])


def test_manager_serves_its_document(tmp_path: Path) -> None:
    with (
        run_cpm(tmp_path / "cpm") as manager,
        httpx.Client(base_url=manager.base, verify=ssl_context(manager), timeout=20) as client,
    ):
        answer = client.get("/api/v1/openapi.json")
        assert answer.status_code == 200
        doc = answer.json()
        check_shape(doc)
        assert operations_of(doc) == {(m, path_template(p)) for m, p, _ in MANAGER_OPERATIONS}
        assert set(doc["components"]["securitySchemes"]) == {"spaceToken", "metricsToken"}
        # Every documented Space route refuses a call with no token, as documented (403).
        for method, path in sorted(operations_of(doc)):
            if not path.startswith("/api/v1/space/"):
                continue
            concrete = re.sub(r"{\w+}", "x", path)
            got = client.request(method, concrete)
            assert got.status_code == 403, (method, path, got.status_code)


@pytest.mark.parametrize("name", ["hub", "manager", "manager with faults"])
def test_documents_are_valid_openapi(name: str, tmp_path: Path) -> None:
    import openapi_spec_validator as validator

    if name == "hub":
        from agent.api.openapi import hub_openapi

        doc = hub_openapi()
    else:
        from cpm.api.openapi import manager_openapi

        doc = manager_openapi(name.endswith("faults"))
    validator.validate(doc)
