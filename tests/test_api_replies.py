"""Replies are bounded: repeated polls are answered once, and inline images per reply are capped."""

from __future__ import annotations

import json
from pathlib import Path

from tests.api_helpers import data_uri, encode, make_client, photo_crop, upscale_task

KEY = "replies-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def base64_task() -> dict[str, object]:
    return upscale_task(data_uri(encode(photo_crop(32, 32))), outputType="base64Data", outputFormat="PNG")


def test_repeated_polls_of_one_task_are_answered_once(tmp_path: Path) -> None:
    with make_client(tmp_path, KEY) as client:
        task = base64_task()
        assert client.post("/v1", json=[task], headers=AUTH).status_code == 200
        polls = [{"taskType": "getResponse", "taskUUID": task["taskUUID"]}] * 24
        reply = client.post("/v1", json=polls, headers=AUTH).json()
        assert len(reply["data"]) == 1 and "errors" not in reply
        assert reply["data"][0]["imageBase64Data"]


def test_inline_images_past_the_reply_limit_are_refused_per_task(tmp_path: Path) -> None:
    with make_client(tmp_path, KEY) as client:
        one = len(client.post("/v1", json=[base64_task()], headers=AUTH).json()["data"][0]["imageBase64Data"])
    limit = int(one * 1.5)
    with make_client(tmp_path / "capped", KEY, max_reply_bytes=limit) as client:
        tasks = [base64_task(), base64_task()]
        response = client.post("/v1", json=tasks, headers=AUTH)
        assert response.status_code == 200
        reply = response.json()
        assert len(reply["data"]) == 1 and len(reply["errors"]) == 1
        error = reply["errors"][0]
        assert error["code"] == "payloadTooLarge" and error["max"] == limit
        assert error["parameter"] == "outputType" and error["taskType"] == "imageUpscale"
        refused = error["taskUUID"]
        assert refused in {task["taskUUID"] for task in tasks} - {reply["data"][0]["taskUUID"]}

        polls = [{"taskType": "getResponse", "taskUUID": task["taskUUID"]} for task in tasks]
        reply = client.post("/v1", json=polls, headers=AUTH).json()
        assert len(reply["data"]) == 1 and reply["errors"][0]["code"] == "payloadTooLarge"
        alone = client.post("/v1", json=[{"taskType": "getResponse", "taskUUID": refused}], headers=AUTH).json()
        assert alone["data"][0]["status"] == "success" and alone["data"][0]["imageBase64Data"]

        with client.websocket_connect("/v1") as ws:
            ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": KEY}]))
            ws.receive_text()
            ws.send_text(json.dumps(polls))
            frames = [json.loads(ws.receive_text()) for _ in polls]
            assert sorted("data" in frame for frame in frames) == [False, True]
            assert next(frame for frame in frames if "errors" in frame)["errors"][0]["code"] == "payloadTooLarge"
