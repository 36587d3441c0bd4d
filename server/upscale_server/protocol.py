"""Runware wire format: task models, request parsing and reply builders.

This module holds only the external format: what the official SDKs send and what they need back
(docs/compatibility.md lists every field). It knows nothing about storage, models or HTTP frameworks.

One validation system: small readers check each field by hand and build frozen dataclasses, so that
every violation becomes exactly one typed :class:`~upscale_server.errors.UpscaleError` with the
Runware parameter name, code and limits (``invalidUpscaleFactor``, ``min``/``max``/``allowedValues``/
``type``). A schema library would validate the same fields a second time and word its own messages.

Decisions where Runware's documents and its SDKs leave room:

* both ``imageUpscale`` and ``upscale``, image in ``inputImage`` or ``inputs.image`` (exactly one);
* the output size is asked for one way: ``upscaleFactor`` or ``targetMegapixels`` (sent by Runware's
  ComfyUI nodes), never both (neither wins silently). ``imageUpscale`` requires one of them (the
  seeds mark ``upscaleFactor`` required); ``upscale`` follows the model's schema, which does not, so
  its factor defaults to 4. Integral floats (``2.0``) are accepted because the ``runware`` SDK types
  the factor as ``float``; ``2.5``, ``"2"`` and booleans are refused. Which factors a model takes,
  and which ``targetMegapixels`` an input can reach, is decided with the model and the image;
* ``outputType``, ``outputFormat`` and ``deliveryMethod`` match case-insensitively and are normalised
  (one doc page shows ``"jpg"``); ``JPEG`` means ``JPG``. ``outputType`` may also be a one-element
  array (``["URL"]``, the form imageInference takes); an upscale makes one output, so not more;
* JSON ``null`` means "absent" for every field (JS callers forward ``null`` for unset options);
* booleans must be JSON booleans, strings JSON strings: a client that sends ``"true"`` is wrong and
  is told so;
* unknown keys are ignored (``settings``, ``providerSettings``, ``safety``,
  ``routing``, ``numberResults``...): the SDKs forward whatever the caller set. They are logged at
  debug level with the taskUUID, so a typo such as ``outputFromat`` can be found;
* ``taskUUID`` must be a hyphenated UUID of any version (v4 and v7 both occur) and is echoed exactly
  as sent, never normalised: clients match replies by string.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeAlias, TypeVar
from urllib.parse import urlsplit

from upscale_server.errors import (
    InvalidApiKeyError,
    InvalidParameterError,
    InvalidRequestError,
    InvalidUpscaleFactorError,
    MissingApiKeyError,
    MissingParameterError,
    TooManyTasksError,
    UnknownTaskTypeError,
    error_item,
    http_status_of,
)
from upscale_server.vocabulary import DEFAULT_UPSCALE_FACTOR, OUTPUT_QUALITY, UPSCALE_FACTORS, ImageFormat, is_uuid

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- vocabulary

UpscaleTaskType = Literal["imageUpscale", "upscale"]
OutputType = Literal["URL", "base64Data", "dataURI"]
DeliveryMethod = Literal["sync", "async"]
ImageParameter = Literal["inputImage", "inputs.image"]
TaskStatus = Literal["processing", "success", "error"]

#: Every task type this server runs, in the order they are listed in errors.
TASK_TYPES: tuple[str, ...] = (
    "authentication",
    "ping",
    "imageUpload",
    "imageUpscale",
    "upscale",
    "getResponse",
)
UPSCALE_TASK_TYPES: tuple[UpscaleTaskType, ...] = ("imageUpscale", "upscale")

TTL_MIN = 60

#: Lower-cased spelling -> canonical value. The tuple order is the order shown in ``allowedValues``.
_OUTPUT_TYPES: dict[str, OutputType] = {"url": "URL", "base64data": "base64Data", "datauri": "dataURI"}
_DELIVERY_METHODS: dict[str, DeliveryMethod] = {"sync": "sync", "async": "async"}

#: The output field each ``outputType`` fills in a result item.
OUTPUT_FIELDS: dict[OutputType, str] = {
    "URL": "imageURL",
    "base64Data": "imageBase64Data",
    "dataURI": "imageDataURI",
}

#: Strings echoed by :func:`task_identity` are capped: an identity is a UUID or a short name, and an
#: error reply must not repeat a megabyte the client sent in the wrong field.
_MAX_ECHO = 128


def is_http_url(value: str) -> bool:
    """True for an absolute ``http``/``https`` URL with a host (what webhooks and inputs may use)."""
    try:
        parts = urlsplit(value)
    except ValueError:  # e.g. an invalid IPv6 literal
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname) and not any(c.isspace() for c in value)


# --------------------------------------------------------------------------- task models
# Frozen dataclasses with Python names; only :func:`parse_task` builds them from the wire, after
# every field has been checked.


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthenticationTask:
    """``authentication``: the key, and the session to resume when the client names a known one."""

    task_type: Literal["authentication"] = "authentication"
    api_key: str = field(repr=False)
    connection_session_uuid: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PingTask:
    """``ping`` keep-alive; the CLI also sends a ``taskUUID`` over REST."""

    task_type: Literal["ping"] = "ping"
    ping: bool = True
    task_uuid: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageUploadTask:
    """``imageUpload``: ``image`` is still the raw wire string (UUID, URL, data URI or base64)."""

    task_type: Literal["imageUpload"] = "imageUpload"
    task_uuid: str
    image: str = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class GetResponseTask:
    """``getResponse``: poll the task with this UUID."""

    task_type: Literal["getResponse"] = "getResponse"
    task_uuid: str


@dataclass(frozen=True, slots=True, kw_only=True)
class UpscaleTask:
    """``imageUpscale`` or ``upscale`` (one model: the SDKs mix names and image fields freely).

    ``image`` is the raw wire string and ``image_parameter`` the field it came from, so later errors
    about the image (not found, not decodable) name the parameter the client actually used.
    """

    task_type: UpscaleTaskType
    task_uuid: str
    image: str = field(repr=False)
    image_parameter: ImageParameter
    model: str | None = None
    #: Exactly one of the two is set: the factor asked for, or the output size in megapixels.
    upscale_factor: int | None = DEFAULT_UPSCALE_FACTOR
    target_megapixels: float | None = None
    output_type: OutputType = "URL"
    output_format: ImageFormat = ImageFormat.JPG
    output_quality: int = OUTPUT_QUALITY.default
    include_cost: bool = False
    delivery_method: DeliveryMethod = "sync"
    webhook_url: str | None = None
    upload_endpoint: str | None = None
    ttl: int | None = None


Task: TypeAlias = AuthenticationTask | PingTask | ImageUploadTask | GetResponseTask | UpscaleTask

#: The wire fields each task type reads; anything else in a task is ignored (and logged at debug).
_KNOWN_FIELDS: dict[str, frozenset[str]] = {
    "authentication": frozenset({"taskType", "apiKey", "connectionSessionUUID"}),
    "ping": frozenset({"taskType", "ping", "taskUUID"}),
    "imageUpload": frozenset({"taskType", "taskUUID", "image"}),
    "getResponse": frozenset({"taskType", "taskUUID"}),
    "upscale": frozenset(
        {
            "taskType",
            "taskUUID",
            "inputImage",
            "inputs",
            "model",
            "upscaleFactor",
            "targetMegapixels",
            "outputType",
            "outputFormat",
            "outputQuality",
            "includeCost",
            "deliveryMethod",
            "webhookURL",
            "uploadEndpoint",
            "ttl",
        }
    ),
}
_KNOWN_FIELDS["imageUpscale"] = _KNOWN_FIELDS["upscale"]


# --------------------------------------------------------------------------- field readers

_T = TypeVar("_T")


def _json_type(value: object) -> str:
    """The JSON name of a Python value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _shown(value: object) -> str:
    """A short rendering of a received value: scalars verbatim (truncated), containers by type."""
    if isinstance(value, str):
        text = json.dumps(value if len(value) <= 40 else value[:40] + "...")
        return f"got {text}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return "got a very large number"  # also: str() of a huge int raises past 4300 digits
    if value is None or isinstance(value, bool | int | float):
        return f"got {json.dumps(value)}"
    return f"got an {_json_type(value)}"


def _invalid(parameter: str, rule: str, value: object) -> str:
    return f"Invalid value for '{parameter}' parameter. It must be {rule}; {_shown(value)}."


def _get(raw: Mapping[str, object], key: str) -> object:
    """The value of ``key``; ``None`` for both an absent key and JSON null."""
    return raw.get(key)


def _uuid_field(raw: Mapping[str, object], key: str, *, required: bool) -> str | None:
    value = _get(raw, key)
    if value is None:
        if required:
            raise MissingParameterError(parameter=key)
        return None
    if not isinstance(value, str) or not is_uuid(value):
        raise InvalidParameterError(
            _invalid(key, "a UUID string such as 'a770f077-f413-47de-9dac-be0b26a35da6'", value),
            parameter=key,
            type="string",
        )
    return value


def _string_field(value: object, parameter: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidParameterError(
            _invalid(parameter, "a non-empty string", value), parameter=parameter, type="string"
        )
    return value


def _integer(value: object) -> int | None:
    """``value`` as an int when it is a JSON integer (``2.0`` included), else None. Booleans are not."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _integer_field(raw: Mapping[str, object], key: str, *, default: _T, min: int, max: int | None = None) -> int | _T:
    value = _get(raw, key)
    if value is None:
        return default
    number = _integer(value)
    if number is None or number < min or (max is not None and number > max):
        rule = f"an integer between {min} and {max}" if max is not None else f"an integer of at least {min}"
        raise InvalidParameterError(_invalid(key, rule, value), parameter=key, min=min, max=max, type="integer")
    return number


def _boolean_field(raw: Mapping[str, object], key: str, *, default: bool) -> bool:
    value = _get(raw, key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidParameterError(_invalid(key, "true or false", value), parameter=key, type="boolean")
    return value


def _choice_field(raw: Mapping[str, object], key: str, table: Mapping[str, _T], *, default: _T) -> _T:
    """A case-insensitive enum: the canonical spelling of ``raw[key]`` per ``table``."""
    value = _get(raw, key)
    if value is None:
        return default
    if isinstance(value, str) and value.strip().lower() in table:
        return table[value.strip().lower()]
    allowed = list(dict.fromkeys(table.values()))
    rule = "one of " + ", ".join(str(choice) for choice in allowed)
    raise InvalidParameterError(_invalid(key, rule, value), parameter=key, allowed_values=allowed, type="string")


def _output_type(raw: Mapping[str, object]) -> OutputType:
    """``outputType`` as a string, or as a one-element array of one (``["URL"]``)."""
    value = _get(raw, "outputType")
    if isinstance(value, list):
        if len(value) != 1:
            allowed = list(_OUTPUT_TYPES.values())
            raise InvalidParameterError(
                _invalid("outputType", "one of " + ", ".join(allowed) + ", or an array holding one of them", value)
                + " An upscale makes one image, in one output type.",
                parameter="outputType",
                allowed_values=allowed,
                type="string",
            )
        value = value[0]
    return _choice_field({"outputType": value}, "outputType", _OUTPUT_TYPES, default="URL")


def _output_format(raw: Mapping[str, object]) -> ImageFormat:
    """``outputFormat``: ``JPG``, ``PNG`` or ``WEBP`` in any case, ``JPEG`` meaning ``JPG``."""
    value = _get(raw, "outputFormat")
    if value is None:
        return ImageFormat.JPG
    found = ImageFormat.from_wire(value) if isinstance(value, str) else None
    if found is None:
        allowed = [fmt.value for fmt in ImageFormat]
        raise InvalidParameterError(
            _invalid("outputFormat", "one of " + ", ".join(allowed), value),
            parameter="outputFormat",
            allowed_values=allowed,
            type="string",
        )
    return found


def _url_field(raw: Mapping[str, object], key: str) -> str | None:
    value = _get(raw, key)
    if value is None:
        return None
    if not isinstance(value, str) or not is_http_url(value):
        raise InvalidParameterError(_invalid(key, "an http or https URL", value), parameter=key, type="string")
    return value


# --------------------------------------------------------------------------- parsing


def task_identity(raw: object) -> tuple[str | None, str | None]:
    """``(taskType, taskUUID)`` of a raw task, best effort, so an error can echo them even when the
    task does not parse. Only short strings are echoed. An authentication task has no taskUUID on the
    wire (SDK-JS matches auth replies by ``taskType`` only), so none is returned for it.
    """
    if not isinstance(raw, dict):
        return None, None
    task_type = raw.get("taskType")
    task_uuid = raw.get("taskUUID")
    echo_type = task_type if isinstance(task_type, str) and len(task_type) <= _MAX_ECHO else None
    echo_uuid = task_uuid if isinstance(task_uuid, str) and len(task_uuid) <= _MAX_ECHO else None
    if echo_type == "authentication":
        echo_uuid = None
    return echo_type, echo_uuid


def parse_request_body(body: bytes | bytearray | str, *, max_tasks: int | None = None) -> list[object]:
    """The task list of a REST body or WebSocket frame; elements are checked by :func:`parse_task`.

    Runware requires an array ("You must always POST an array of task objects"), and so does this
    server: an app that sent a lone object here would work, then fail against Runware. Malformed JSON
    (NaN and Infinity included), any other top-level value, and an empty array raise
    ``InvalidRequestError``.
    Elements are not checked here, so that one bad task fails alone and the others still run.
    """
    try:
        parsed: object = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8 and huge ints are ValueErrors
        raise InvalidRequestError("The request body is not valid JSON: send an array of task objects.") from exc
    if isinstance(parsed, dict):
        raise InvalidRequestError(
            "The request body must be a JSON array of task objects, not a lone object: wrap the task in [ ]."
        )
    if not isinstance(parsed, list):
        raise InvalidRequestError(f"The request body must be a JSON array of task objects, not {_json_type(parsed)}.")
    if not parsed:
        raise InvalidRequestError("The request body is an empty array: send at least one task object.")
    if max_tasks is not None and len(parsed) > max_tasks:
        raise TooManyTasksError(
            f"The request holds {len(parsed)} tasks; at most {max_tasks} are accepted in one request.",
            max=max_tasks,
        )
    return parsed


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def parse_task(raw: object) -> Task:
    """One task of a request, validated. Raises an :class:`UpscaleError` subclass for any violation.

    The first violation found is reported (``taskType``, then ``taskUUID``, then the fields in the
    order of the Runware docs); a non-object raises ``InvalidRequestError``, an unknown ``taskType``
    ``UnknownTaskTypeError``.
    """
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"Each task must be a JSON object, not {_json_type(raw)}.")
    task_type = raw.get("taskType")
    if task_type is None:
        raise MissingParameterError(parameter="taskType")
    if isinstance(task_type, str) and task_type in _KNOWN_FIELDS:
        _log_unknown_fields(raw, _KNOWN_FIELDS[task_type])
    if task_type == "authentication":
        return _parse_authentication(raw)
    if task_type == "ping":
        return PingTask(
            ping=_boolean_field(raw, "ping", default=True),
            task_uuid=_uuid_field(raw, "taskUUID", required=False),
        )
    if task_type == "imageUpload":
        task_uuid = _require_uuid(raw)
        image = _get(raw, "image")
        if image is None:
            raise MissingParameterError(parameter="image")
        return ImageUploadTask(task_uuid=task_uuid, image=_string_field(image, "image"))
    if task_type == "getResponse":
        return GetResponseTask(task_uuid=_require_uuid(raw))
    if task_type in UPSCALE_TASK_TYPES:
        return _parse_upscale(raw, task_type)
    raise UnknownTaskTypeError(
        _invalid("taskType", "one of " + ", ".join(TASK_TYPES), task_type),
        allowed_values=TASK_TYPES,
        type="string",
    )


def _log_unknown_fields(raw: Mapping[str, object], known: frozenset[str]) -> None:
    """Name the fields this server ignores, so a typo (``outputFromat``) shows up in a debug log."""
    if log.isEnabledFor(logging.DEBUG):
        unknown = sorted(key[:_MAX_ECHO] for key in raw if key not in known)
        if unknown:
            _, task_uuid = task_identity(raw)
            log.debug("task %s: ignoring unknown fields %s", task_uuid or "-", ", ".join(unknown))


def _require_uuid(raw: Mapping[str, object]) -> str:
    task_uuid = _uuid_field(raw, "taskUUID", required=True)
    assert task_uuid is not None  # required=True raises instead of returning None
    return task_uuid


def _parse_authentication(raw: Mapping[str, object]) -> AuthenticationTask:
    """An empty key is missing; a non-string key is invalid (401 either way, as Runware answers).

    A ``connectionSessionUUID`` that is not a UUID string cannot name a session this server issued,
    so it is dropped rather than refused: the client gets a fresh session instead of a failed login.
    """
    api_key = raw.get("apiKey")
    if api_key is None or (isinstance(api_key, str) and not api_key.strip()):
        raise MissingApiKeyError()
    if not isinstance(api_key, str):
        raise InvalidApiKeyError()
    session = raw.get("connectionSessionUUID")
    return AuthenticationTask(
        api_key=api_key,
        connection_session_uuid=session if isinstance(session, str) and is_uuid(session) else None,
    )


def _parse_upscale(raw: Mapping[str, object], task_type: UpscaleTaskType) -> UpscaleTask:
    task_uuid = _require_uuid(raw)
    image, image_parameter = _upscale_image(raw)
    model = _get(raw, "model")
    upscale_factor, target_megapixels = _output_size(raw, task_type)
    return UpscaleTask(
        task_type=task_type,
        task_uuid=task_uuid,
        image=image,
        image_parameter=image_parameter,
        model=None if model is None else _string_field(model, "model"),
        upscale_factor=upscale_factor,
        target_megapixels=target_megapixels,
        output_type=_output_type(raw),
        output_format=_output_format(raw),
        output_quality=_integer_field(
            raw,
            "outputQuality",
            default=OUTPUT_QUALITY.default,
            min=OUTPUT_QUALITY.min,
            max=OUTPUT_QUALITY.max,
        ),
        include_cost=_boolean_field(raw, "includeCost", default=False),
        delivery_method=_choice_field(raw, "deliveryMethod", _DELIVERY_METHODS, default="sync"),
        webhook_url=_url_field(raw, "webhookURL"),
        upload_endpoint=_url_field(raw, "uploadEndpoint"),
        ttl=_integer_field(raw, "ttl", default=None, min=TTL_MIN),
    )


def _output_size(raw: Mapping[str, object], task_type: UpscaleTaskType) -> tuple[int | None, float | None]:
    """``(upscaleFactor, targetMegapixels)``, exactly one of them set.

    Only the form is checked here; whether the model takes the factor, and whether the target is
    within reach for the input image, is checked by the upscale task with both in hand.
    """
    factor = _get(raw, "upscaleFactor")
    target = _get(raw, "targetMegapixels")
    if factor is not None and target is not None:
        raise InvalidParameterError(
            "Send either 'upscaleFactor' or 'targetMegapixels', not both: they ask for two output sizes.",
            parameter="targetMegapixels",
            code="incompatibleParameters",
        )
    if target is not None:
        megapixels = _positive_number(target)
        if megapixels is None:
            raise InvalidParameterError(
                _invalid("targetMegapixels", "a positive number of megapixels (output width x height / 1e6)", target),
                parameter="targetMegapixels",
                type="number",
            )
        return None, megapixels
    if factor is None:
        if task_type == "imageUpscale":
            raise MissingParameterError(
                "Missing required parameter 'upscaleFactor' (2, 3 or 4), or 'targetMegapixels' for an output "
                "of that many megapixels.",
                parameter="upscaleFactor",
                allowed_values=UPSCALE_FACTORS,
            )
        return DEFAULT_UPSCALE_FACTOR, None
    upscale_factor = _integer(factor)
    if upscale_factor is None or upscale_factor not in UPSCALE_FACTORS:
        raise InvalidUpscaleFactorError(_invalid("upscaleFactor", "an integer: 2, 3 or 4", factor))
    return upscale_factor, None


def _positive_number(value: object) -> float | None:
    """``value`` as a finite float above 0 when it is a JSON number, else None (booleans are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # a huge JSON integer
        return None
    return number if 0 < number < math.inf else None


def _upscale_image(raw: Mapping[str, object]) -> tuple[str, ImageParameter]:
    """The image string and the field it came from: ``inputImage`` or ``inputs.image``, exactly one."""
    inputs = _get(raw, "inputs")
    nested: object = None
    if inputs is not None:
        if not isinstance(inputs, dict):
            raise InvalidParameterError(
                _invalid("inputs", 'an object such as {"image": "..."}', inputs),
                parameter="inputs",
                type="object",
            )
        nested = inputs.get("image")
    top = _get(raw, "inputImage")
    if top is not None and nested is not None:
        raise InvalidParameterError(
            "Send the image in either 'inputImage' or 'inputs.image', not both.",
            parameter="inputImage",
            code="incompatibleParameters",
        )
    if top is not None:
        return _string_field(top, "inputImage"), "inputImage"
    if nested is not None:
        return _string_field(nested, "inputs.image"), "inputs.image"
    raise MissingParameterError(
        "Missing required parameter 'inputImage' (or 'inputs.image'): the image to upscale, as an uploaded "
        "image UUID, a URL, a data URI or base64.",
        parameter="inputs.image" if inputs is not None else "inputImage",
    )


# --------------------------------------------------------------------------- replies

WireItem: TypeAlias = dict[str, object]


def envelope(data: Iterable[WireItem] = (), errors: Iterable[WireItem] = ()) -> dict[str, list[WireItem]]:
    """A reply or a frame: each key only when it has items (runware-sdk fails on any ``errors`` key,
    even ``[]``), and ``{"data": []}`` when both are empty (an in-body auth task alone answers that).
    A WebSocket frame never carries both: runware-sdk ignores ``data`` beside ``errors``."""
    data_items, error_items = list(data), list(errors)
    reply: dict[str, list[WireItem]] = {}
    if data_items or not error_items:
        reply["data"] = data_items
    if error_items:
        reply["errors"] = error_items
    return reply


def ack_item(task_type: str, task_uuid: str) -> WireItem:
    """The immediate answer to an async task: echo only, nothing an SDK could take for a result."""
    return {"taskType": task_type, "taskUUID": task_uuid}


def dry_run_item(task_type: str, task_uuid: str, cost: float | None = None) -> WireItem:
    """The answer to a task in a dry run: the echo a real run would answer with, and ``cost`` when
    ``includeCost`` was set (what the run would cost), but no image field and no UUID of an image: none
    was made. Like an async ACK it carries nothing an SDK could take for a finished result."""
    item: WireItem = {"taskType": task_type, "taskUUID": task_uuid}
    if cost is not None:
        item["cost"] = cost
    return item


def auth_item(session_uuid: str) -> WireItem:
    """Successful authentication. No ``taskUUID``: SDK-JS matches ``taskUUID || taskType``."""
    return {"taskType": "authentication", "connectionSessionUUID": session_uuid}


def pong_item() -> WireItem:
    """Answer to ``ping``. Like the authentication reply it carries no ``taskUUID``, even when the ping
    had one: that is the frame every SDK's keep-alive waits for."""
    return {"taskType": "ping", "pong": True}


def upload_item(task_uuid: str, image_uuid: str, image_url: str) -> WireItem:
    """``imageUpload`` result. ``imageURL`` is required: the ``runware`` SDK indexes it directly."""
    return {"taskType": "imageUpload", "taskUUID": task_uuid, "imageUUID": image_uuid, "imageURL": image_url}


def image_output(output_type: OutputType, value: str) -> WireItem:
    """The one output field for ``output_type``: ``{"imageURL": ...}``, ``{"imageBase64Data": ...}``
    (raw base64, no prefix) or ``{"imageDataURI": ...}``."""
    return {OUTPUT_FIELDS[output_type]: value}


def upscale_item(  # noqa: PLR0917 (positional like the other builders; callers pass all six)
    task_type: str,
    task_uuid: str,
    image_uuid: str,
    input_image_uuid: str | None,
    output: Mapping[str, object],
    cost: float | None,
) -> WireItem:
    """An upscale result, keys in the order of the Runware docs' example.

    ``output`` must hold exactly one of ``imageURL``/``imageBase64Data``/``imageDataURI`` (see
    :func:`image_output`); ``cost`` is sent only when not None (i.e. when ``includeCost`` was set).
    """
    if len(output) != 1 or not set(output) <= set(OUTPUT_FIELDS.values()):
        raise ValueError(f"output must hold exactly one of {sorted(OUTPUT_FIELDS.values())}, got {sorted(output)}")
    item: WireItem = {"taskType": task_type, "taskUUID": task_uuid, "imageUUID": image_uuid}
    if input_image_uuid is not None:
        item["inputImageUUID"] = input_image_uuid
    item.update(output)
    if cost is not None:
        item["cost"] = cost
    return item


def processing_item(task_type: str, task_uuid: str) -> WireItem:
    """``getResponse`` answer for a task still running. It must carry no key ending in ``URL``,
    ``Base64Data`` or ``DataURI``: runware-sdk would take it for a finished result."""
    return {"taskType": task_type, "taskUUID": task_uuid, "status": "processing"}


def with_status(item: Mapping[str, object], status: TaskStatus) -> WireItem:
    """A copy of ``item`` with ``status`` (``success`` result or ``error`` item from ``getResponse``)."""
    return {**item, "status": status}


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one task produced: a data item, or an error item with the HTTP status it maps to.

    REST gathers the outcomes of a request into one reply; the WebSocket sends each as its own frame.
    """

    item: WireItem | None = None
    error: WireItem | None = None
    status: int = 200

    def envelope(self) -> dict[str, list[WireItem]]:
        """The outcome alone as a reply: a WebSocket frame, a webhook body."""
        if self.error is not None:
            return envelope(errors=[self.error])
        return envelope(data=[] if self.item is None else [self.item])

    @classmethod
    def failed(cls, exc: BaseException, task_type: str | None, task_uuid: str | None) -> Outcome:
        """The outcome of a failed task, logged: unexpected exceptions with their traceback (by
        ``error_item``), every task error with its code, message and taskUUID, at INFO for the client's
        mistakes (4xx) and WARNING for the server's (5xx), both seen at the default level."""
        item = error_item(exc, task_type=task_type, task_uuid=task_uuid)
        status = http_status_of(exc)
        log.log(
            logging.WARNING if status >= 500 else logging.INFO,
            "task %s %s failed: %s: %s",
            task_type or "-",
            task_uuid or "-",
            item["code"],
            item["message"],
        )
        return cls(error=item, status=status)
