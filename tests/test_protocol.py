"""The Runware wire format: golden envelopes as Runware documents them, task parsing, and fuzzing."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upscale_server.errors import (
    InvalidApiKeyError,
    InvalidParameterError,
    InvalidRequestError,
    InvalidUpscaleFactorError,
    MissingApiKeyError,
    MissingParameterError,
    UnknownTaskTypeError,
    UpscaleError,
    error_item,
)
from upscale_server.protocol import (
    TASK_TYPES,
    AuthenticationTask,
    GetResponseTask,
    ImageUploadTask,
    PingTask,
    UpscaleTask,
    ack_item,
    auth_item,
    envelope,
    image_output,
    parse_request_body,
    parse_task,
    pong_item,
    processing_item,
    task_identity,
    upload_item,
    upscale_item,
    with_status,
)

TASK = "19abad0d-6ec5-40a6-b7af-203775fa5b7f"
INPUT = "fd613011-3872-4f37-b4aa-0d343c051a27"
OUTPUT = "e0b6ed2b-311d-4abc-aa01-8f3fdbdb8860"
UUID7 = "019c42a0-c3ff-7138-be83-ee257abc5331"
PNG_1PX = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def compact(value: object) -> str:
    """JSON as the docs print it, key order included."""
    return json.dumps(value, separators=(",", ":"))


def upscale(**fields: Any) -> dict[str, Any]:
    """An ``imageUpscale`` task at factor 4; ``field=...`` leaves a field out."""
    raw: dict[str, Any] = {"taskType": "imageUpscale", "taskUUID": TASK, "inputImage": INPUT, "upscaleFactor": 4}
    raw.update(fields)
    return {key: value for key, value in raw.items() if value is not ...}


def refused(raw: object) -> UpscaleError:
    with pytest.raises(UpscaleError) as caught:
        parse_task(raw)
    return caught.value


# --------------------------------------------------------------------------- golden envelopes


def test_auth_success_is_the_documented_frame_without_task_uuid() -> None:
    """SDK-JS matches ``taskUUID || taskType``, so a taskUUID would hide the auth reply."""
    golden = '{"data":[{"taskType":"authentication","connectionSessionUUID":"f40c2aeb-f8a7-4af7-a1ab-7594c9bf778f"}]}'
    assert compact(envelope(data=[auth_item("f40c2aeb-f8a7-4af7-a1ab-7594c9bf778f")])) == golden


def test_ping_reply() -> None:
    """The keep-alive answer every SDK waits for: no taskUUID."""
    assert compact(envelope(data=[pong_item()])) == '{"data":[{"taskType":"ping","pong":true}]}'


def test_upscale_result_matches_the_docs_example() -> None:
    """The response example of Runware's upscaling docs, key order included."""
    golden = (
        '{"data":[{"taskType":"imageUpscale","taskUUID":"19abad0d-6ec5-40a6-b7af-203775fa5b7f",'
        '"imageUUID":"e0b6ed2b-311d-4abc-aa01-8f3fdbdb8860","inputImageUUID":"fd613011-3872-4f37-b4aa-0d343c051a27",'
        '"imageURL":"https://im.runware.ai/image/ws/0.5/ii/e0b6ed2b-311d-4abc-aa01-8f3fdbdb8860.jpg","cost":0}]}'
    )
    url = f"https://im.runware.ai/image/ws/0.5/ii/{OUTPUT}.jpg"
    item = upscale_item("imageUpscale", TASK, OUTPUT, INPUT, image_output("URL", url), 0)
    reply = envelope(data=[item])
    assert compact(reply) == golden
    assert "errors" not in reply  # runware-sdk's REST transport fails on an ``errors`` key, even empty


def test_upscale_result_output_fields_and_optional_keys() -> None:
    base64_item = upscale_item("upscale", TASK, OUTPUT, None, image_output("base64Data", "iVBOR"), None)
    assert base64_item == {
        "taskType": "upscale",
        "taskUUID": TASK,
        "imageUUID": OUTPUT,
        "imageBase64Data": "iVBOR",
    }
    data_uri = upscale_item("upscale", TASK, OUTPUT, None, image_output("dataURI", PNG_1PX), 0.25)
    assert data_uri["imageDataURI"] == PNG_1PX and data_uri["cost"] == 0.25
    for output in ({}, {"imageURL": "u", "imageDataURI": "d"}, {"webhookURL": "u"}):
        with pytest.raises(ValueError, match="exactly one"):
            upscale_item("upscale", TASK, OUTPUT, None, output, None)


def test_upload_result_has_uuid_and_url() -> None:
    """The ``runware`` SDK indexes ``imageURL`` directly."""
    golden = (
        '{"data":[{"taskType":"imageUpload","taskUUID":"50836053-a0ee-4cf5-b9d6-ae7c5d140ada",'
        '"imageUUID":"989ba605-1449-4e1e-b462-cd83ec9c1a67","imageURL":"http://h/image/989ba605-1449-4e1e-b462-cd83ec9c1a67.png"}]}'
    )
    item = upload_item(
        "50836053-a0ee-4cf5-b9d6-ae7c5d140ada",
        "989ba605-1449-4e1e-b462-cd83ec9c1a67",
        "http://h/image/989ba605-1449-4e1e-b462-cd83ec9c1a67.png",
    )
    assert compact(envelope(data=[item])) == golden


def test_async_ack_processing_and_success() -> None:
    """The ACK and the processing answer carry nothing an SDK could take for a result."""
    uuid = "f8c76d6a-191f-4756-951e-8e72e7688774"
    assert compact(envelope(data=[ack_item("upscale", uuid)])) == (
        '{"data":[{"taskType":"upscale","taskUUID":"f8c76d6a-191f-4756-951e-8e72e7688774"}]}'
    )
    processing = processing_item("upscale", uuid)
    assert processing == {"taskType": "upscale", "taskUUID": uuid, "status": "processing"}
    terminal_suffixes = ("URL", "Base64Data", "DataURI")
    for item in (processing, ack_item("upscale", uuid)):
        assert not [key for key in item if key.endswith(terminal_suffixes)]
        assert not {"code", "error", "errorId"} & set(item)  # the ``runware`` SDK would see an error
    result = upscale_item("upscale", uuid, OUTPUT, None, image_output("URL", "http://h/i.jpg"), 0)
    success = with_status(result, "success")
    assert success == {
        "taskType": "upscale",
        "taskUUID": uuid,
        "status": "success",
        "imageUUID": OUTPUT,
        "imageURL": "http://h/i.jpg",
        "cost": 0,
    }
    assert "status" not in result  # with_status copies


def test_task_errors_echo_type_and_uuid_and_carry_status_in_polls() -> None:
    """runware-sdk delivers an error without taskUUID to every pending task."""
    item = error_item(InvalidUpscaleFactorError("bad factor"), task_type="upscale", task_uuid=TASK)
    assert (item["taskType"], item["taskUUID"]) == ("upscale", TASK)
    polled = with_status(item, "error")
    assert polled["status"] == "error" and polled["code"] == "invalidUpscaleFactor"
    assert compact(envelope(errors=[polled])).startswith('{"errors":[{"code":"invalidUpscaleFactor"')


def test_envelope_omits_empty_keys() -> None:
    ok: dict[str, object] = {"taskType": "ping", "pong": True}
    bad: dict[str, object] = {"code": "invalidRequest", "message": "m"}
    assert envelope(data=[ok]) == {"data": [ok]}
    assert envelope(errors=[bad]) == {"errors": [bad]}
    assert envelope(data=[ok], errors=[bad]) == {"data": [ok], "errors": [bad]}
    assert envelope() == {"data": []}
    assert envelope(data=[]) == {"data": []}


# --------------------------------------------------------------------------- parsing: accepted forms


@pytest.mark.parametrize("task_type", ["imageUpscale", "upscale"])
@pytest.mark.parametrize("with_model", [True, False])
@pytest.mark.parametrize("field", ["inputImage", "inputs.image"])
def test_both_task_names_both_image_fields_with_and_without_model(task_type: str, with_model: bool, field: str) -> None:
    raw: dict[str, Any] = {"taskType": task_type, "taskUUID": TASK, "upscaleFactor": 2}
    if field == "inputImage":
        raw["inputImage"] = INPUT
    else:
        raw["inputs"] = {"image": INPUT}
    if with_model:
        raw["model"] = "runware:504@1"
    task = parse_task(raw)
    assert isinstance(task, UpscaleTask)
    assert (task.task_type, task.task_uuid, task.image, task.image_parameter) == (
        task_type,
        TASK,
        INPUT,
        field,
    )
    assert task.model == ("runware:504@1" if with_model else None)
    assert task.upscale_factor == 2


def test_defaults() -> None:
    task = parse_task({"taskType": "upscale", "taskUUID": TASK, "inputs": {"image": PNG_1PX}})
    assert isinstance(task, UpscaleTask)
    assert task.upscale_factor == 4
    assert (task.output_type, task.output_format, task.output_quality) == ("URL", "JPG", 95)
    assert (task.delivery_method, task.include_cost) == ("sync", False)
    assert (task.webhook_url, task.upload_endpoint, task.ttl, task.model) == (None, None, None, None)


def test_captured_sdk_requests_parse() -> None:
    """Bodies captured from the three SDKs verbatim."""
    bodies = [
        '[{"taskType": "imageUpscale", "taskUUID": "e0baf9b0-6f93-483f-afc9-7144a28923ad",'
        ' "deliveryMethod": "sync", "upscaleFactor": 2,'
        ' "inputImage": "bf68ec0e-f343-4e36-a977-76981491986d", "outputType": "URL",'
        ' "outputFormat": "PNG", "includeCost": true}]',
        '[{"model": "runware:504@1", "inputs": {"image": "https://example.com/cat.png"}, "upscaleFactor": 4,'
        ' "outputType": "base64Data", "deliveryMethod": "sync", "taskType": "upscale",'
        ' "taskUUID": "ac172e4a-9c66-4f77-bf2b-dc7d16624b93"}]',
        '[{"upscaleFactor":2,"outputType":"URL","outputFormat":"PNG","includeCost":true,"outputQuality":90,'
        '"inputImage":"https://example.com/cat.png","taskType":"upscale","deliveryMethod":"sync",'
        '"taskUUID":"53d37186-cfa2-4c96-9629-fea374906968"}]',
    ]
    tasks = []
    for body in bodies:
        [raw] = parse_request_body(body.encode())
        task = parse_task(raw)
        assert isinstance(task, UpscaleTask) and isinstance(raw, dict)
        assert task.task_uuid == raw["taskUUID"]
        tasks.append(task)
    assert [t.output_type for t in tasks] == ["URL", "base64Data", "URL"]
    assert tasks[2].output_quality == 90


@pytest.mark.parametrize(
    ("sent", "expected"),
    [("jpg", "JPG"), ("JPEG", "JPG"), ("jpeg", "JPG"), ("Png", "PNG"), ("webp", "WEBP"), ("WEBP", "WEBP")],
)
def test_output_format_is_case_insensitive(sent: str, expected: str) -> None:
    task = parse_task(upscale(outputFormat=sent))
    assert isinstance(task, UpscaleTask) and task.output_format == expected


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("url", "URL"),
        ("URL", "URL"),
        ("BASE64DATA", "base64Data"),
        ("base64Data", "base64Data"),
        ("datauri", "dataURI"),
    ],
)
def test_output_type_is_case_insensitive(sent: str, expected: str) -> None:
    task = parse_task(upscale(outputType=sent))
    assert isinstance(task, UpscaleTask) and task.output_type == expected


def test_all_options() -> None:
    task = parse_task(
        upscale(
            upscaleFactor=3,
            outputQuality=20,
            includeCost=True,
            deliveryMethod="ASYNC",
            webhookURL="https://api.example.com/webhooks/runware?token=t",
            uploadEndpoint="http://storage.example.com/uploads/x.jpg",
            ttl=60,
            settings={"anything": 1},
            providerSettings={},
            safety={"checkContent": True},
            numberResults=1,
        )
    )
    assert isinstance(task, UpscaleTask)
    assert (task.upscale_factor, task.output_quality, task.include_cost, task.delivery_method) == (
        3,
        20,
        True,
        "async",
    )
    assert task.webhook_url == "https://api.example.com/webhooks/runware?token=t"
    assert task.upload_endpoint == "http://storage.example.com/uploads/x.jpg"
    assert task.ttl == 60


def test_integral_floats_count_as_integers() -> None:
    """The ``runware`` SDK types upscaleFactor as float, so ``2.0`` reaches the wire."""
    task = parse_task(upscale(upscaleFactor=2.0, outputQuality=90.0))
    assert isinstance(task, UpscaleTask)
    assert (task.upscale_factor, task.output_quality) == (2, 90)
    assert type(task.upscale_factor) is int


def test_null_means_absent() -> None:
    raw = upscale(taskType="upscale", upscaleFactor=None, outputFormat=None, webhookURL=None, model=None, inputs=None)
    task = parse_task(raw)
    assert isinstance(task, UpscaleTask)
    assert (task.upscale_factor, task.output_format, task.webhook_url) == (4, "JPG", None)


def test_image_upscale_requires_a_size() -> None:
    """The seeds mark upscaleFactor required for imageUpscale; the model schema of ``upscale`` does not."""
    for factor in (..., None):
        exc = refused(upscale(upscaleFactor=factor))
        assert (exc.code, exc.parameter, exc.allowed_values) == ("missingUpscaleFactor", "upscaleFactor", [2, 3, 4])
        assert "targetMegapixels" in exc.message
    task = parse_task(upscale(taskType="upscale", upscaleFactor=...))
    assert isinstance(task, UpscaleTask)
    assert (task.upscale_factor, task.target_megapixels) == (4, None)


@pytest.mark.parametrize("task_type", ["imageUpscale", "upscale"])
def test_target_megapixels_replaces_the_factor(task_type: str) -> None:
    for sent, parsed in ((2, 2.0), (0.5, 0.5), (16.7, 16.7)):
        task = parse_task(upscale(taskType=task_type, upscaleFactor=..., targetMegapixels=sent))
        assert isinstance(task, UpscaleTask)
        assert (task.upscale_factor, task.target_megapixels) == (None, parsed)
        assert type(task.target_megapixels) is float


@pytest.mark.parametrize("value", [0, -1, "2", True, [2], {"mp": 2}, 10**400], ids=repr)
def test_target_megapixels_must_be_a_positive_number(value: object) -> None:
    exc = refused(upscale(upscaleFactor=..., targetMegapixels=value))
    assert (exc.code, exc.parameter, exc.type) == ("invalidTargetMegapixels", "targetMegapixels", "number")


def test_a_factor_and_a_target_are_refused_together() -> None:
    """Neither silently wins: they ask for two output sizes."""
    exc = refused(upscale(upscaleFactor=2, targetMegapixels=4))
    assert (exc.code, exc.parameter) == ("incompatibleParameters", "targetMegapixels")
    assert "upscaleFactor" in exc.message


@pytest.mark.parametrize("sent", [["URL"], ["base64data"], ["dataURI"]])
def test_output_type_as_a_one_element_array(sent: list[str]) -> None:
    task = parse_task(upscale(outputType=sent))
    assert isinstance(task, UpscaleTask)
    assert task.output_type == parse_task(upscale(outputType=sent[0])).output_type  # type: ignore[union-attr]


@pytest.mark.parametrize("sent", [[], ["URL", "dataURI"], [3], [["URL"]]])
def test_output_type_arrays_hold_exactly_one_type(sent: list[object]) -> None:
    exc = refused(upscale(outputType=sent))
    assert (exc.code, exc.parameter) == ("invalidOutputType", "outputType")
    assert exc.allowed_values == ["URL", "base64Data", "dataURI"]


@pytest.mark.parametrize("uuid", [TASK, UUID7, TASK.upper(), "00000000-0000-0000-0000-000000000000"])
def test_any_uuid_version_is_accepted_and_echoed_verbatim(uuid: str) -> None:
    task = parse_task(upscale(taskUUID=uuid))
    assert isinstance(task, UpscaleTask) and task.task_uuid == uuid


def test_other_task_types() -> None:
    auth = parse_task({"taskType": "authentication", "apiKey": "sk-secret", "connectionSessionUUID": UUID7})
    assert isinstance(auth, AuthenticationTask)
    assert (auth.api_key, auth.connection_session_uuid) == ("sk-secret", UUID7)
    assert "sk-secret" not in repr(auth)  # keys stay out of logs
    fresh = parse_task({"taskType": "authentication", "apiKey": "k", "connectionSessionUUID": "not-a-uuid"})
    assert isinstance(fresh, AuthenticationTask) and fresh.connection_session_uuid is None

    assert parse_task({"taskType": "ping", "ping": True}) == PingTask()
    assert parse_task({"taskType": "ping", "taskUUID": TASK}) == PingTask(task_uuid=TASK)

    upload = parse_task({"taskType": "imageUpload", "taskUUID": TASK, "image": PNG_1PX})
    assert upload == ImageUploadTask(task_uuid=TASK, image=PNG_1PX)
    assert PNG_1PX not in repr(upload)

    assert parse_task({"taskType": "getResponse", "taskUUID": TASK}) == GetResponseTask(task_uuid=TASK)


def test_unknown_fields_are_logged_at_debug_with_the_task_uuid(caplog: pytest.LogCaptureFixture) -> None:
    """A typo such as ``outputFromat`` is ignored like any field Runware's SDKs forward, but not silently."""
    with caplog.at_level(logging.DEBUG, logger="upscale_server.protocol"):
        task = parse_task(upscale(outputFromat="PNG", numberResults=1))
    assert isinstance(task, UpscaleTask) and task.output_format == "JPG"
    [record] = [r for r in caplog.records if "unknown" in r.getMessage()]
    assert record.levelno == logging.DEBUG
    assert TASK in record.getMessage() and "numberResults, outputFromat" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="upscale_server.protocol"):
        parse_task(upscale(outputFormat="PNG"))
    assert not caplog.records


# --------------------------------------------------------------------------- parsing: refusals


@pytest.mark.parametrize(
    ("fields", "code", "parameter", "extras"),
    [
        (
            {"upscaleFactor": 5},
            "invalidUpscaleFactor",
            "upscaleFactor",
            {"min": 2, "max": 4, "allowedValues": [2, 3, 4]},
        ),
        ({"upscaleFactor": 2.5}, "invalidUpscaleFactor", "upscaleFactor", {"type": "integer"}),
        ({"upscaleFactor": "2"}, "invalidUpscaleFactor", "upscaleFactor", {"type": "integer"}),
        ({"upscaleFactor": True}, "invalidUpscaleFactor", "upscaleFactor", {"type": "integer"}),
        ({"upscaleFactor": 1}, "invalidUpscaleFactor", "upscaleFactor", {"min": 2}),
        (
            {"outputQuality": 10},
            "invalidOutputQuality",
            "outputQuality",
            {"min": 20, "max": 99, "type": "integer"},
        ),
        (
            {"outputQuality": 100},
            "invalidOutputQuality",
            "outputQuality",
            {"min": 20, "max": 99, "type": "integer"},
        ),
        ({"outputQuality": "95"}, "invalidOutputQuality", "outputQuality", {"type": "integer"}),
        (
            {"outputFormat": "GIF"},
            "invalidOutputFormat",
            "outputFormat",
            {"allowedValues": ["JPG", "PNG", "WEBP"]},
        ),
        ({"outputFormat": 1}, "invalidOutputFormat", "outputFormat", {"type": "string"}),
        (
            {"outputType": "file"},
            "invalidOutputType",
            "outputType",
            {"allowedValues": ["URL", "base64Data", "dataURI"], "type": "string"},
        ),
        ({"outputType": ["URL", "URL"]}, "invalidOutputType", "outputType", {"type": "string"}),
        (
            {"deliveryMethod": "later"},
            "invalidDeliveryMethod",
            "deliveryMethod",
            {"allowedValues": ["sync", "async"]},
        ),
        ({"ttl": 30}, "invalidTtl", "ttl", {"min": 60, "type": "integer"}),
        ({"ttl": 60.5}, "invalidTtl", "ttl", {"min": 60}),
        ({"includeCost": "true"}, "invalidIncludeCost", "includeCost", {"type": "boolean"}),
        ({"includeCost": 1}, "invalidIncludeCost", "includeCost", {"type": "boolean"}),
        ({"webhookURL": "ftp://x"}, "invalidWebhookURL", "webhookURL", {"type": "string"}),
        ({"webhookURL": "https://"}, "invalidWebhookURL", "webhookURL", {}),
        ({"webhookURL": ""}, "invalidWebhookURL", "webhookURL", {}),
        ({"uploadEndpoint": "/relative/path"}, "invalidUploadEndpoint", "uploadEndpoint", {}),
        ({"uploadEndpoint": {"url": "https://x"}}, "invalidUploadEndpoint", "uploadEndpoint", {}),
        ({"taskUUID": "abc"}, "invalidTaskUUID", "taskUUID", {"type": "string"}),
        ({"taskUUID": 12}, "invalidTaskUUID", "taskUUID", {}),
        ({"taskUUID": TASK + "\n"}, "invalidTaskUUID", "taskUUID", {}),
        ({"taskUUID": ...}, "missingTaskUUID", "taskUUID", {}),
        ({"inputImage": ...}, "missingInputImage", "inputImage", {}),
        ({"inputImage": ..., "inputs": {}}, "missingImage", "inputs.image", {}),
        ({"inputImage": ..., "inputs": "x"}, "invalidInputs", "inputs", {"type": "object"}),
        ({"inputImage": 5}, "invalidInputImage", "inputImage", {"type": "string"}),
        ({"inputImage": "  "}, "invalidInputImage", "inputImage", {}),
        ({"inputImage": ..., "inputs": {"image": ["x"]}}, "invalidImage", "inputs.image", {"type": "string"}),
        ({"inputs": {"image": INPUT}}, "incompatibleParameters", "inputImage", {}),
        ({"model": 504}, "invalidModel", "model", {"type": "string"}),
        ({"model": ""}, "invalidModel", "model", {}),
    ],
)
def test_each_bad_field_is_reported_precisely(
    fields: dict[str, Any], code: str, parameter: str, extras: dict[str, object]
) -> None:
    exc = refused(upscale(**fields))
    item = error_item(exc, task_type="imageUpscale", task_uuid=TASK)
    assert (item["code"], item["parameter"]) == (code, parameter)
    for key, value in extras.items():
        assert item[key] == value, key
    assert exc.http_status == 400
    assert parameter in exc.message
    assert "pydantic" not in exc.message.lower() and "validation error" not in exc.message.lower()


def test_messages_show_what_was_received_without_repeating_megabytes() -> None:
    exc = refused(upscale(upscaleFactor=5))
    assert exc.message == "Invalid value for 'upscaleFactor' parameter. It must be an integer: 2, 3 or 4; got 5."
    long_value = "x" * 100_000
    assert len(refused(upscale(outputFormat=long_value)).message) < 200
    assert "an object" in refused(upscale(outputType={"a": 1})).message
    assert "very large" in refused(upscale(upscaleFactor=10**5000)).message


def test_first_violation_wins() -> None:
    exc = refused(upscale(taskUUID="abc", upscaleFactor=9, outputFormat="GIF"))
    assert exc.parameter == "taskUUID"
    assert refused(upscale(upscaleFactor=9, outputFormat="GIF")).parameter == "upscaleFactor"


def test_task_level_refusals() -> None:
    unknown = refused({"taskType": "imageInference", "taskUUID": TASK})
    assert isinstance(unknown, UnknownTaskTypeError)
    item = error_item(unknown, task_type=None, task_uuid=None)
    assert (item["code"], item["parameter"], item["allowedValues"]) == (
        "invalidTaskType",
        "taskType",
        list(TASK_TYPES),
    )
    assert isinstance(refused({"taskType": 5}), UnknownTaskTypeError)
    missing = refused({"taskUUID": TASK})
    assert isinstance(missing, MissingParameterError) and missing.code == "missingTaskType"
    for element in ([{"taskType": "ping"}], "ping", 3, None, True):
        assert isinstance(refused(element), InvalidRequestError)


def test_other_tasks_need_their_fields() -> None:
    assert refused({"taskType": "imageUpload", "taskUUID": TASK}).code == "missingImage"
    assert refused({"taskType": "imageUpload", "taskUUID": TASK, "image": ""}).code == "invalidImage"
    assert refused({"taskType": "imageUpload", "image": PNG_1PX}).code == "missingTaskUUID"
    assert refused({"taskType": "getResponse"}).code == "missingTaskUUID"
    assert refused({"taskType": "getResponse", "taskUUID": "nope"}).code == "invalidTaskUUID"
    assert refused({"taskType": "ping", "ping": "yes"}).code == "invalidPing"
    assert isinstance(refused({"taskType": "authentication"}), MissingApiKeyError)
    assert isinstance(refused({"taskType": "authentication", "apiKey": ""}), MissingApiKeyError)
    assert isinstance(refused({"taskType": "authentication", "apiKey": 42}), InvalidApiKeyError)


# --------------------------------------------------------------------------- identity and bodies


def test_task_identity() -> None:
    assert task_identity({"taskType": "upscale", "taskUUID": "abc"}) == ("upscale", "abc")  # echoed as sent
    assert task_identity({"taskType": "authentication", "taskUUID": TASK}) == ("authentication", None)
    assert task_identity({"taskType": 5, "taskUUID": ["x"]}) == (None, None)
    assert task_identity({"taskType": "upscale", "taskUUID": "x" * 1000}) == ("upscale", None)
    assert task_identity([1]) == (None, None)
    assert task_identity(None) == (None, None)


def test_request_bodies() -> None:
    assert parse_request_body(b'[{"taskType":"ping","ping":true}]') == [{"taskType": "ping", "ping": True}]
    assert parse_request_body('[{"a":1},2]') == [{"a": 1}, 2]  # elements are checked per task


def test_a_lone_task_object_is_refused() -> None:
    """Runware takes only arrays: an app that passed here with a bare object would fail there."""
    with pytest.raises(InvalidRequestError) as caught:
        parse_request_body(b'{"taskType":"ping"}')
    assert caught.value.code == "invalidRequest" and "array" in caught.value.message


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[",
        b"not json",
        b"[]",
        b'"ping"',
        b"3",
        b"null",
        b"[NaN]",
        b'[{"a": Infinity}]',
        b"\xff\xfe[",
        b"[" * 100_000,
    ],
)
def test_bad_bodies_are_invalid_requests(body: bytes) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_request_body(body)
    assert caught.value.code == "invalidRequest" and caught.value.http_status == 400


# --------------------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)

#: Plausible values next to random ones, so the fuzzer also reaches fields after the first check.
plausible: dict[str, st.SearchStrategy[Any]] = {
    "taskType": st.sampled_from(["imageUpscale", "upscale"]),
    "taskUUID": st.sampled_from([TASK, UUID7]),
    "inputImage": st.sampled_from([INPUT, PNG_1PX, "https://example.com/cat.png"]),
    "inputs": st.fixed_dictionaries({"image": st.sampled_from([INPUT, PNG_1PX])}),
    "model": st.just("runware:504@1"),
    "upscaleFactor": st.sampled_from([2, 3, 4, 2.0]),
    "outputType": st.sampled_from(["URL", "base64Data", "datauri"]),
    "outputFormat": st.sampled_from(["jpg", "PNG", "WEBP"]),
    "outputQuality": st.integers(20, 99),
    "includeCost": st.booleans(),
    "deliveryMethod": st.sampled_from(["sync", "async"]),
    "webhookURL": st.just("https://h/hook"),
    "uploadEndpoint": st.just("https://h/put"),
    "ttl": st.integers(60, 10**6),
    "settings": json_values,
}


def mostly(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``strategy`` three times in four, any JSON value otherwise."""
    return st.integers(0, 3).flatmap(lambda pick: json_values if pick == 0 else strategy)


#: taskType and taskUUID are valid and the other fields mostly plausible, so the fuzzer gets past the
#: first checks and reaches every field; test_fuzzed_elements_of_any_shape covers the rest.
upscale_tasks = st.fixed_dictionaries(
    {"taskType": plausible["taskType"], "taskUUID": plausible["taskUUID"]},
    optional={key: mostly(strategy) for key, strategy in plausible.items() if key not in ("taskType", "taskUUID")},
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(upscale_tasks)
def test_fuzzed_upscale_tasks_only_raise_upscale_errors(raw: dict[str, Any]) -> None:
    try:
        task = parse_task(raw)
    except UpscaleError as exc:
        task_type, task_uuid = task_identity(raw)
        item = error_item(exc, task_type=task_type, task_uuid=task_uuid)
        assert isinstance(item["code"], str) and item["code"]
        assert isinstance(item["message"], str) and item["message"]
        assert 400 <= exc.http_status < 500
        json.dumps(item, allow_nan=False)  # always serialisable as strict JSON
        return
    assert isinstance(task, UpscaleTask)
    assert task.upscale_factor in (2, 3, 4)
    assert 20 <= task.output_quality <= 99
    assert task.output_type in ("URL", "base64Data", "dataURI")
    assert task.ttl is None or task.ttl >= 60


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_fuzzed_elements_of_any_shape(raw: object) -> None:
    task_identity(raw)
    try:
        parse_task(raw)
    except UpscaleError as exc:
        assert isinstance(error_item(exc, task_type=None, task_uuid=None)["message"], str)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_fuzzed_bodies(body: bytes) -> None:
    try:
        tasks = parse_request_body(body)
    except InvalidRequestError:
        return
    assert isinstance(tasks, list) and tasks


def test_invalid_parameter_errors_are_the_parameter_type() -> None:
    assert isinstance(refused(upscale(ttl=1)), InvalidParameterError)
    assert isinstance(refused(upscale(upscaleFactor=7)), InvalidUpscaleFactorError)
