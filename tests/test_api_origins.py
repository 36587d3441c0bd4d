"""A local server is not a web page's to drive: foreign Origins and unknown Host names are refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from tests.api_helpers import api_client, resize_settings

PING = [{"taskType": "ping", "ping": True}]
EVIL = "http://evil.example"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    """An open-mode server on its default address (127.0.0.1): the one a browser could reach."""
    with api_client(resize_settings(tmp_path)) as test_client:
        yield test_client


def ping(client: TestClient, **headers: str) -> Any:
    return client.post("/v1", json=PING, headers=headers)


def refused(response: Any, code: str) -> bool:
    return response.status_code == 403 and response.json()["errors"][0]["code"] == code


def test_a_post_from_another_origin_is_refused_with_a_runware_error(client: TestClient) -> None:
    assert refused(ping(client, origin=EVIL), "originNotAllowed")
    plain = client.post("/v1", content=b'[{"taskType":"ping"}]', headers={"origin": EVIL, "content-type": "text/plain"})
    assert refused(plain, "originNotAllowed")  # the form a page sends without a CORS preflight
    assert refused(ping(client, origin="null"), "originNotAllowed")  # sandboxed frames, file:// pages


def test_sdks_and_the_servers_own_pages_pass(client: TestClient) -> None:
    assert ping(client).status_code == 200  # no Origin: not a browser
    assert ping(client, origin="http://testserver").status_code == 200  # the page it serves itself
    assert ping(client, host="127.0.0.1:8000", origin="http://127.0.0.1:8000").status_code == 200
    assert refused(ping(client, host="127.0.0.1:8000", origin="http://127.0.0.1:8001"), "originNotAllowed")
    assert ping(client, host="[::1]:8000", origin="http://[::1]:8000").status_code == 200
    assert ping(client, host="localhost", origin="http://LOCALHOST:80").status_code == 200  # default port, any case
    assert client.get("/playground/models", headers={"origin": EVIL}).status_code == 200  # reading is harmless


def test_a_websocket_upgrade_from_another_origin_is_refused(client: TestClient) -> None:
    with pytest.raises(WebSocketDisconnect), client.websocket_connect("/v1", headers={"origin": EVIL}):
        pass
    with client.websocket_connect("/v1", headers={"origin": "http://testserver"}) as ws:
        ws.send_json(PING)
        assert ws.receive_json()["data"][0]["taskType"] == "ping"


@pytest.mark.parametrize("host", ["localhost:8000", "127.0.0.1:8000", "[::1]:8000", "192.168.1.20", "testserver"])
def test_local_names_and_ip_addresses_are_answered(client: TestClient, host: str) -> None:
    assert ping(client, host=host).status_code == 200


def test_a_rebound_name_is_refused_on_every_route(client: TestClient) -> None:
    """DNS rebinding: the page is same-origin with its own name, which the server does not answer to."""
    rebound = {"host": "evil.example:8000", "origin": "http://evil.example:8000"}
    assert refused(ping(client, **rebound), "hostNotAllowed")
    assert refused(client.get("/playground/models", headers=rebound), "hostNotAllowed")
    with pytest.raises(WebSocketDisconnect), client.websocket_connect("/v1", headers=rebound):
        pass


def test_allowed_origins_hosts_and_the_public_url_are_accepted(tmp_path: Path) -> None:
    settings = resize_settings(
        tmp_path,
        public_url="https://upscale.example.com",
        allowed_origins=["https://app.example.com"],
        allowed_hosts=["upscale.internal"],
    )
    with api_client(settings) as client:
        assert ping(client, host="upscale.example.com", origin="https://upscale.example.com").status_code == 200
        assert ping(client, host="upscale.internal:8000", origin="https://app.example.com").status_code == 200
        assert refused(ping(client, host="other.example"), "hostNotAllowed")


def test_a_server_bound_to_every_interface_answers_any_name_unless_told(tmp_path: Path) -> None:
    with api_client(resize_settings(tmp_path, host="0.0.0.0")) as client:
        assert ping(client, host="anything.example").status_code == 200
        assert refused(ping(client, host="anything.example", origin=EVIL), "originNotAllowed")
    with api_client(resize_settings(tmp_path, host="0.0.0.0", allowed_hosts=["api.example"])) as client:
        assert ping(client, host="api.example").status_code == 200
        assert refused(ping(client, host="anything.example"), "hostNotAllowed")


def test_swagger_ui_is_off_by_default_and_the_schema_stays(tmp_path: Path) -> None:
    """Swagger UI loads its script from a CDN, on the origin where the playground keeps its key."""
    with api_client(resize_settings(tmp_path)) as client:
        assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
        assert client.get("/openapi.json").json()["info"]["title"] == "Upscale Server"
    with api_client(resize_settings(tmp_path, api_docs=True)) as client:
        assert client.get("/docs").status_code == 200
