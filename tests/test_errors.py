"""The error table: codes, statuses, the one wire mapping (error_item) and the REST status rule."""

from __future__ import annotations

import json
import logging

import pytest

from upscale_server.errors import (
    INTERNAL_ERROR_MESSAGE,
    ConflictTaskUUIDError,
    ImageFetchError,
    ImageNotFoundError,
    ImageTooLargeError,
    InferenceError,
    InternalError,
    InvalidApiKeyError,
    InvalidImageError,
    InvalidModelError,
    InvalidParameterError,
    InvalidRequestError,
    InvalidUpscaleFactorError,
    MissingApiKeyError,
    MissingParameterError,
    ModelLoadError,
    ModelUnavailableError,
    PayloadTooLargeError,
    QueueFullError,
    TaskNotFoundError,
    UnknownTaskTypeError,
    UpscaleError,
    error_item,
    http_status_for,
)

UUID = "19abad0d-6ec5-40a6-b7af-203775fa5b7f"


@pytest.mark.parametrize(
    ("exc", "code", "status"),
    [
        (InvalidImageError("x"), "invalidImage", 400),
        (ImageTooLargeError("x"), "imageTooLarge", 413),
        (InvalidModelError("x"), "invalidModel", 400),
        (ModelLoadError("x"), "modelLoadFailed", 500),
        (ModelUnavailableError("x"), "modelUnavailable", 503),
        (InferenceError("x"), "inferenceError", 500),
        (InvalidUpscaleFactorError("x"), "invalidUpscaleFactor", 400),
        (InvalidRequestError("x"), "invalidRequest", 400),
        (InvalidApiKeyError(), "invalidApiKey", 401),
        (MissingApiKeyError(), "missingApiKey", 401),
        (ConflictTaskUUIDError(), "conflictTaskUUID", 409),
        (ImageNotFoundError(), "imageNotFound", 404),
        (TaskNotFoundError(), "taskNotFound", 404),
        (PayloadTooLargeError(), "payloadTooLarge", 413),
        (QueueFullError(), "rateLimitExceeded", 429),
        (ImageFetchError("x"), "downloadFailed", 400),
        (InternalError(), "internalServerError", 500),
        (UnknownTaskTypeError(allowed_values=["upscale"]), "invalidTaskType", 400),
    ],
)
def test_codes_and_statuses(exc: UpscaleError, code: str, status: int) -> None:
    assert isinstance(exc, UpscaleError)
    assert (exc.code, exc.http_status) == (code, status)
    assert error_item(exc, task_type=None, task_uuid=None)["code"] == code


@pytest.mark.parametrize(
    ("parameter", "invalid", "missing"),
    [
        ("upscaleFactor", "invalidUpscaleFactor", "missingUpscaleFactor"),
        ("outputFormat", "invalidOutputFormat", "missingOutputFormat"),
        ("taskUUID", "invalidTaskUUID", "missingTaskUUID"),
        ("inputImage", "invalidInputImage", "missingInputImage"),
        ("inputs.image", "invalidImage", "missingImage"),  # a nested field is named after its leaf
    ],
)
def test_parameter_codes_follow_the_runware_pattern(parameter: str, invalid: str, missing: str) -> None:
    assert InvalidParameterError("bad", parameter=parameter).code == invalid
    assert MissingParameterError(parameter=parameter).code == missing
    assert InvalidParameterError("bad", parameter=parameter, code="invalidParameter").code == "invalidParameter"


def test_instance_codes_do_not_leak_into_the_class() -> None:
    InvalidParameterError("bad", parameter="ttl")
    assert InvalidParameterError.code == "invalidParameter"
    assert MissingParameterError.code == "missingParameter"


def test_missing_parameter_has_a_default_message() -> None:
    exc = MissingParameterError(parameter="taskUUID")
    assert exc.message == "Missing required parameter 'taskUUID'."
    assert (exc.parameter, exc.http_status) == ("taskUUID", 400)


def test_default_parameters_and_explicit_overrides() -> None:
    assert ConflictTaskUUIDError().parameter == "taskUUID"
    assert TaskNotFoundError("gone").message == "gone"
    assert ImageNotFoundError().parameter == "inputImage"
    assert ImageNotFoundError("no such image", parameter="image").parameter == "image"
    assert InvalidApiKeyError("Invalid API key.", parameter="apiKey").parameter == "apiKey"
    assert QueueFullError().parameter is None


def test_invalid_upscale_factor_is_an_invalid_parameter_with_limits() -> None:
    exc = InvalidUpscaleFactorError("upscaleFactor must be 2, 3 or 4", parameter="upscaleFactor")
    assert isinstance(exc, InvalidParameterError)
    assert error_item(exc, task_type="upscale", task_uuid=UUID) == {
        "code": "invalidUpscaleFactor",
        "message": "upscaleFactor must be 2, 3 or 4",
        "parameter": "upscaleFactor",
        "type": "integer",
        "min": 2,
        "max": 4,
        "allowedValues": [2, 3, 4],
        "taskType": "upscale",
        "taskUUID": UUID,
    }


def test_auth_failure_matches_the_runware_docs_byte_for_byte() -> None:
    """As Runware answers a bad key: no taskUUID, taskType authentication."""
    golden = (
        '{"errors":[{"code":"invalidApiKey","message":"Invalid API key. Get one at https://my.runware.ai/signup",'
        '"parameter":"apiKey","taskType":"authentication"}]}'
    )
    exc = InvalidApiKeyError("Invalid API key. Get one at https://my.runware.ai/signup")
    item = error_item(exc, task_type=None, task_uuid=None)
    assert json.dumps({"errors": [item]}, separators=(",", ":")) == golden


def test_auth_errors_default_to_the_authentication_task_type() -> None:
    # a failed handshake: no task to speak of, so the error answers under "authentication"
    assert error_item(MissingApiKeyError(), task_type=None, task_uuid=None)["taskType"] == "authentication"
    # a task sent before authenticating is refused under its own id, so SDKs route it to that task
    item = error_item(MissingApiKeyError(), task_type="upscale", task_uuid=UUID)
    assert item["taskType"] == "upscale"
    assert item["taskUUID"] == UUID


def test_error_item_omits_unknown_keys_and_keeps_the_order() -> None:
    item = error_item(InvalidImageError("not an image"), task_type=None, task_uuid=None)
    assert item == {"code": "invalidImage", "message": "not an image"}
    full = error_item(
        InvalidParameterError("bad", parameter="ttl", min=60, type="integer"),
        task_type="upscale",
        task_uuid=UUID,
    )
    assert list(full) == ["code", "message", "parameter", "type", "min", "taskType", "taskUUID"]


def test_zero_limits_are_sent() -> None:
    """0 is a limit, not 'unset': only None is left out."""
    item = error_item(InvalidParameterError("bad", parameter="x", min=0, max=0), task_type=None, task_uuid=None)
    assert (item["min"], item["max"]) == (0, 0)


def test_unexpected_exceptions_become_a_generic_internal_error_and_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    try:
        raise KeyError("/srv/secret/path.pth")
    except KeyError as exc:
        with caplog.at_level(logging.ERROR, logger="upscale_server.errors"):
            item = error_item(exc, task_type="upscale", task_uuid=UUID)
    assert item == {
        "code": "internalServerError",
        "message": INTERNAL_ERROR_MESSAGE,
        "taskType": "upscale",
        "taskUUID": UUID,
    }
    assert "secret" not in json.dumps(item)
    [record] = caplog.records
    assert UUID in record.getMessage()
    assert record.exc_info is not None and record.exc_info[1] is not None
    assert "secret" in str(record.exc_info[1])  # the details are in the log, with the traceback
    assert record.exc_info[2] is not None


def test_upscale_errors_are_not_logged_by_error_item(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="upscale_server.errors"):
        error_item(InvalidImageError("bad"), task_type=None, task_uuid=None)
    assert caplog.records == []


@pytest.mark.parametrize(
    ("errors", "status"),
    [
        ([InvalidImageError("x")], 400),
        ([QueueFullError()], 429),
        ([QueueFullError(), QueueFullError()], 429),
        ([ImageNotFoundError(), ImageNotFoundError()], 404),
        ([InvalidImageError("x"), MissingApiKeyError()], 401),  # credentials first
        ([ImageNotFoundError(), InvalidImageError("x")], 400),  # mixed client errors: generic 400
        ([QueueFullError(), InferenceError("x")], 400),  # a 4xx among them: do not invite a retry
        ([ModelUnavailableError("x"), InferenceError("x")], 500),  # mixed server errors
        ([ValueError("boom")], 500),
        ([404, 404], 404),  # statuses already mapped are accepted too
        ([404, InvalidImageError("x")], 400),
    ],
)
def test_http_status_for(errors: list[BaseException | int], status: int) -> None:
    assert http_status_for(errors) == status


def test_http_status_for_needs_an_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        http_status_for([])
