"""Size requests, dry runs and the request forms real clients send, on both transports.

``targetMegapixels`` is honoured exactly or refused with the reachable range; ``imageUpscale`` needs a
size and ``upscale`` takes the model's factors; ``X-Runware-Dry-Run: 1`` and ``?dryRun=1`` validate
without running, storing or sending anything; ``["URL"]`` is ``"URL"``; ``/v1/`` is ``/v1``; a body
must be an array.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession

from tests.api_helpers import api_client, data_uri, decode, encode, new_uuid, photo_crop, resize_settings, upscale_task
from upscale_server.config import Settings
from upscale_server.inference import ComputeConfig, InferenceService

KEY = "forms-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DRY = {**AUTH, "X-Runware-Dry-Run": "1"}
X4PLUS = "runware:504@1"  # its schema: factors 2 or 4; native factors 2 (x2plus) and 4
ANIME = "local:realesr-animevideov3@1"  # native factor 4 only
IMAGE = data_uri(encode(photo_crop(24, 16)))  # 384 pixels


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with api_client(resize_settings(tmp_path, api_keys=[KEY], max_output_side=64)) as test_client:
        yield test_client


def rest(client: TestClient, tasks: object, headers: dict[str, str] = AUTH, path: str = "/v1") -> tuple[int, Any]:
    response = client.post(path, json=tasks, headers=headers, follow_redirects=False)
    return response.status_code, response.json()


def ws_run(client: TestClient, tasks: list[dict[str, Any]], *, url: str = "/v1") -> list[dict[str, Any]]:
    """Authenticate on ``url``, send ``tasks`` in one frame, and return one frame per task."""
    with client.websocket_connect(url) as ws:
        ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": KEY}]))
        assert "data" in json.loads(ws.receive_text())
        ws.send_text(json.dumps(tasks))
        return [receive(ws) for _ in tasks]


def receive(ws: WebSocketTestSession) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(ws.receive_text())
    assert not ("data" in frame and "errors" in frame), frame
    return frame


def only_item(body: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = (body.get("data") or body["errors"])[0]
    return item


def output_size(item: dict[str, Any]) -> tuple[int, int]:
    image = decode(base64.b64decode(item["imageBase64Data"]))
    return image.size


def stored_images(client: TestClient) -> int:
    count, _ = client.app.state.context.images.stats()  # type: ignore[attr-defined]
    return int(count)


# --------------------------------------------------------------------------- targetMegapixels


@pytest.mark.parametrize("transport", ["rest", "ws"])
@pytest.mark.parametrize(
    ("sent", "size"),
    [
        (("imageUpscale", X4PLUS, 0.002), (55, 37)),  # 2.28x: the x4 network, then Lanczos down to the target
        (("upscale", ANIME, 0.000864), (36, 24)),  # 1.5x, aspect kept
        (("upscale", X4PLUS, 0.002688), (63, 42)),  # the most this input can reach under the 64 px side cap
    ],
)
def test_target_megapixels_gives_that_many_megapixels(
    client: TestClient, transport: str, sent: tuple[str, str, float], size: tuple[int, int]
) -> None:
    task_type, model, megapixels = sent
    task = upscale_task(
        IMAGE, taskType=task_type, model=model, upscaleFactor=None, targetMegapixels=megapixels, outputType="base64Data"
    )
    if transport == "rest":
        status, body = rest(client, [task])
        assert status == 200, body
    else:
        (body,) = ws_run(client, [task])
    item = only_item(body)
    assert item["taskUUID"] == task["taskUUID"], item
    assert output_size(item) == size
    width, height = size
    assert abs(width * height / 1e6 - megapixels) / megapixels < 0.02
    assert abs(width / height - 24 / 16) < 0.05


@pytest.mark.parametrize("transport", ["rest", "ws"])
@pytest.mark.parametrize(
    ("model", "megapixels", "reachable"),
    [
        (ANIME, 0.01, 0.002688),  # 64 px side cap: at most 64x42
        (X4PLUS, 1.0, 0.002688),
    ],
)
def test_a_target_out_of_reach_is_refused_with_the_range(
    client: TestClient, transport: str, model: str, megapixels: float, reachable: float
) -> None:
    task = upscale_task(IMAGE, model=model, upscaleFactor=None, targetMegapixels=megapixels)
    if transport == "rest":
        status, body = rest(client, [task])
        assert status == 400, body
    else:
        (body,) = ws_run(client, [task])
    error = body["errors"][0]
    assert (error["code"], error["parameter"], error["type"]) == (
        "invalidTargetMegapixels",
        "targetMegapixels",
        "number",
    )
    assert error["max"] == pytest.approx(reachable) and error["taskUUID"] == task["taskUUID"]
    assert "24x16" in error["message"] and f"{reachable:g}" in error["message"]


def test_the_factor_cap_bounds_the_target_too(tmp_path: Path) -> None:
    """Without the side cap in the way, the model's largest factor is the limit (x4: 96x64 here)."""
    with api_client(resize_settings(tmp_path, api_keys=[KEY])) as client:
        task = upscale_task(IMAGE, model=ANIME, upscaleFactor=None, targetMegapixels=0.0062)
        status, body = rest(client, [task])
        assert status == 400 and body["errors"][0]["max"] == pytest.approx(0.006144)
        assert "4x" in body["errors"][0]["message"]


def test_the_smallest_native_factor_that_reaches_the_target_runs() -> None:
    settings = Settings(device="cpu", engine="resize", preload_default_model=False)
    service = InferenceService(settings, ComputeConfig.from_settings(settings))
    assert service.plan_target(100, 50, 0.0112, X4PLUS).factor == 2  # 1.5x
    assert service.plan_target(100, 50, 0.0112, X4PLUS).model.id == "local:realesrgan-x2plus@1"
    assert service.plan_target(100, 50, 0.02, X4PLUS).factor == 2  # exactly 2x
    assert service.plan_target(100, 50, 0.0201, X4PLUS).factor == 4
    plan = service.plan_target(100, 50, 0.0112, ANIME)
    assert (plan.factor, plan.output_size, plan.input_size) == (4, (150, 75), (100, 50))


@pytest.mark.parametrize("transport", ["rest", "ws"])
def test_a_factor_and_a_target_together_are_refused(client: TestClient, transport: str) -> None:
    task = upscale_task(IMAGE, upscaleFactor=2, targetMegapixels=0.002)
    body = rest(client, [task])[1] if transport == "rest" else ws_run(client, [task])[0]
    assert body["errors"][0]["code"] == "incompatibleParameters"


# --------------------------------------------------------------------------- upscaleFactor


@pytest.mark.parametrize("transport", ["rest", "ws"])
def test_image_upscale_without_a_factor_is_refused(client: TestClient, transport: str) -> None:
    task = upscale_task(IMAGE, upscaleFactor=None)
    if transport == "rest":
        status, body = rest(client, [task])
        assert status == 400
    else:
        (body,) = ws_run(client, [task])
    error = body["errors"][0]
    assert (error["code"], error["parameter"], error["allowedValues"]) == (
        "missingUpscaleFactor",
        "upscaleFactor",
        [2, 3, 4],
    )
    assert error["taskUUID"] == task["taskUUID"]


@pytest.mark.parametrize("transport", ["rest", "ws"])
def test_upscale_takes_the_model_schema_factors(client: TestClient, transport: str) -> None:
    refused = upscale_task(IMAGE, taskType="upscale", model=X4PLUS, upscaleFactor=3)
    default = upscale_task(IMAGE, taskType="upscale", model=X4PLUS, upscaleFactor=None, outputType="base64Data")
    legacy = upscale_task(IMAGE, model=X4PLUS, upscaleFactor=3, outputType="base64Data")  # imageUpscale: 2-4
    if transport == "rest":
        status, body = rest(client, [refused])
        assert status == 400
        frames = [body, rest(client, [default])[1], rest(client, [legacy])[1]]
    else:
        frames = ws_run(client, [refused]) + ws_run(client, [default]) + ws_run(client, [legacy])
    error = frames[0]["errors"][0]
    assert (error["code"], error["allowedValues"], error["min"], error["max"]) == ("invalidUpscaleFactor", [2, 4], 2, 4)
    assert X4PLUS in error["message"]
    width, height = output_size(frames[1]["data"][0])  # factor 4 by default, input shrunk for the side cap
    assert width <= 64 and width % 4 == 0 and height % 4 == 0
    assert output_size(frames[2]["data"][0]) == (63, 42)


# --------------------------------------------------------------------------- dry runs


def test_rest_dry_run_validates_and_answers_without_running(client: TestClient) -> None:
    task = upscale_task(IMAGE, outputType="base64Data", includeCost=True, deliveryMethod="async")
    upload = {"taskType": "imageUpload", "taskUUID": new_uuid(), "image": IMAGE}
    before = stored_images(client)
    status, body = rest(client, [task, upload], headers=DRY)
    assert status == 200, body
    items = {item["taskUUID"]: item for item in body["data"]}
    assert items[task["taskUUID"]] == {"taskType": "imageUpscale", "taskUUID": task["taskUUID"], "cost": 0}
    assert items[upload["taskUUID"]] == {"taskType": "imageUpload", "taskUUID": upload["taskUUID"]}
    assert stored_images(client) == before
    # Nothing was recorded: the UUIDs are still free, and a real run with them works.
    poll = rest(client, [{"taskType": "getResponse", "taskUUID": task["taskUUID"]}])[1]
    assert poll["errors"][0]["code"] == "taskNotFound"
    status, body = rest(client, [{**task, "deliveryMethod": "sync"}, upload])
    assert status == 200 and len(body["data"]) == 2
    assert {"imageBase64Data", "cost"} <= set(next(i for i in body["data"] if i["taskUUID"] == task["taskUUID"]))


def test_rest_dry_run_refuses_what_a_real_run_refuses(client: TestClient) -> None:
    bad = [
        upscale_task(new_uuid()),  # no such stored image
        upscale_task(IMAGE, taskType="upscale", model=X4PLUS, upscaleFactor=3),
        upscale_task(IMAGE, model="nope"),
        upscale_task(IMAGE, upscaleFactor=None, targetMegapixels=5),
        upscale_task("data:image/png;base64,AAAA"),
        upscale_task(IMAGE, webhookURL="http://127.0.0.1:9/hook"),
    ]
    for task in bad:
        dry = rest(client, [task], headers=DRY)
        real = rest(client, [{**task, "taskUUID": new_uuid()}])
        assert dry[0] == real[0] and dry[0] >= 400, (task, dry, real)
        dry_error, real_error = dry[1]["errors"][0], real[1]["errors"][0]
        assert dry_error["code"] == real_error["code"] and dry_error["taskUUID"] == task["taskUUID"]
    used = upscale_task(IMAGE)
    assert rest(client, [used])[0] == 200
    status, body = rest(client, [used], headers=DRY)
    assert status == 409 and body["errors"][0]["code"] == "conflictTaskUUID"


def test_rest_dry_run_header_values(client: TestClient) -> None:
    for value, dry in (("1", True), ("true", True), ("0", False), ("", False)):
        task = upscale_task(IMAGE)
        item = rest(client, [task], headers={**AUTH, "X-Runware-Dry-Run": value})[1]["data"][0]
        assert ("imageURL" not in item) == dry, value


def test_websocket_dry_run_from_the_url(client: TestClient) -> None:
    task = upscale_task(IMAGE, includeCost=True)
    missing = upscale_task(new_uuid())
    before = stored_images(client)
    frames = ws_run(client, [task, missing], url="/v1?sdk=js&version=1.3.2&dryRun=1")
    by_uuid = {only_item(frame)["taskUUID"]: frame for frame in frames}
    assert by_uuid[task["taskUUID"]] == {
        "data": [{"taskType": "imageUpscale", "taskUUID": task["taskUUID"], "cost": 0}]
    }
    assert by_uuid[missing["taskUUID"]]["errors"][0]["code"] == "imageNotFound"
    assert stored_images(client) == before
    (frame,) = ws_run(client, [task])  # a real run on a plain URL: the UUID was not used up
    assert "imageURL" in frame["data"][0]


# --------------------------------------------------------------------------- request forms


@pytest.mark.parametrize("transport", ["rest", "ws"])
def test_output_type_as_a_one_element_array(client: TestClient, transport: str) -> None:
    task = upscale_task(IMAGE, outputType=["base64Data"])
    body = rest(client, [task])[1] if transport == "rest" else ws_run(client, [task])[0]
    assert set(body["data"][0]) >= {"imageUUID", "imageBase64Data"}
    two = upscale_task(IMAGE, outputType=["URL", "dataURI"])
    body = rest(client, [two])[1] if transport == "rest" else ws_run(client, [two])[0]
    assert body["errors"][0]["code"] == "invalidOutputType"


def test_trailing_slash_on_both_transports(client: TestClient) -> None:
    status, body = rest(client, [{"taskType": "ping", "ping": True}], path="/v1/")
    assert (status, body) == (200, {"data": [{"taskType": "ping", "pong": True}]})  # answered, not redirected
    task = upscale_task(IMAGE)
    status, body = rest(client, [task], path="/v1/")
    assert status == 200 and body["data"][0]["taskUUID"] == task["taskUUID"]
    (frame,) = ws_run(client, [{"taskType": "ping", "ping": True}], url="/v1/?sdk=js")
    assert frame == {"data": [{"taskType": "ping", "pong": True}]}


def test_a_lone_task_object_is_refused(client: TestClient) -> None:
    task = upscale_task(IMAGE)
    status, body = rest(client, task)
    assert status == 400 and body["errors"][0]["code"] == "invalidRequest"
    assert "array" in body["errors"][0]["message"]
    with client.websocket_connect("/v1") as ws:
        ws.send_text(json.dumps({"taskType": "authentication", "apiKey": KEY}))
        assert receive(ws)["errors"][0]["code"] == "invalidRequest"
