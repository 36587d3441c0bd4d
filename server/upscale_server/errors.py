"""The error hierarchy. Every failure the project reports is one of these, each with a Runware ``code``.

The CLI prints ``message``; the API turns the same objects into Runware error items with
:func:`error_item`, and picks a REST status with :func:`http_status_for`, so a rule about what went
wrong, and how it is reported, lives here once.

Codes follow Runware's pattern where one is known (``invalidApiKey``, ``missingApiKey``,
``conflictTaskUUID``, ``invalid<Param>``, ``missing<Param>``, ``internalServerError``); the others are
named so that the official SDK (runware-sdk 1.8, ``errors.py``) files them in the right category
(``*NotFound`` -> not found, ``rateLimitExceeded`` -> rate limit, ``downloadFailed`` -> provider).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from upscale_server.vocabulary import UPSCALE_FACTORS

logger = logging.getLogger(__name__)

#: Sent instead of the text of an exception we did not anticipate: that text may name files,
#: addresses or internals, so it goes to the log (with the traceback) and never to the client.
INTERNAL_ERROR_MESSAGE = "Internal server error. The failure was logged on the server; retry later."

Number = int | float

#: Characters of a client's value an error message repeats (:func:`shown`).
ECHO_CHARS = 100
#: The longest message an error item carries: a backstop for values echoed without :func:`shown`.
MAX_MESSAGE_CHARS = 1000
ELLIPSIS = "..."


def shown(value: str, limit: int = ECHO_CHARS) -> str:
    """``value`` as an error message repeats it: at most ``limit`` characters, then an ellipsis. A
    client's string can be megabytes, and a message is sent, logged and kept with the task's record."""
    return value if len(value) <= limit else value[:limit] + ELLIPSIS


class UpscaleError(Exception):
    """Base class: a failure with a Runware-style code, a human message and the parameter at fault.

    ``min``, ``max``, ``allowed_values`` and ``type`` (the JSON type expected: ``"integer"``,
    ``"string"``, ...) are the extra fields Runware puts in validation errors so that a client can
    show the rule without parsing the message; they are only sent when set. ``task_type`` is set by
    errors that belong to one task type whatever the request was (authentication errors).

    Subclasses set ``default_message``/``default_parameter`` where the failure always reads the same,
    so ``ConflictTaskUUIDError()`` is complete; a message or parameter given explicitly wins.
    """

    code: str = "internalServerError"
    http_status: int = 500
    #: The task type this kind of error is always reported under (see :func:`error_item`).
    task_type: str | None = None
    default_message: str = "The request failed."
    default_parameter: str | None = None

    def __init__(
        self,
        message: str | None = None,
        *,
        parameter: str | None = None,
        min: Number | None = None,
        max: Number | None = None,
        allowed_values: Sequence[object] | None = None,
        type: str | None = None,
    ) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)
        self.parameter = parameter if parameter is not None else self.default_parameter
        self.min = min
        self.max = max
        self.allowed_values = list(allowed_values) if allowed_values is not None else None
        self.type = type


# --------------------------------------------------------------------------- request and parameters


def _wire_suffix(parameter: str) -> str:
    """``upscaleFactor`` -> ``UpscaleFactor``; ``inputs.image`` -> ``Image`` (the field itself).

    A nested field is named after its last segment, so ``inputs.image`` gives ``invalidImage``, the
    same code as an image that does not decode: to the client both mean "this image is unusable".
    """
    leaf = parameter.rsplit(".", 1)[-1]
    return leaf[:1].upper() + leaf[1:]


class InvalidParameterError(UpscaleError):
    """A request parameter has the wrong type or value: ``invalid<Param>`` unless a code is given."""

    code = "invalidParameter"
    http_status = 400

    def __init__(
        self,
        message: str,
        *,
        parameter: str,
        code: str | None = None,
        min: Number | None = None,
        max: Number | None = None,
        allowed_values: Sequence[object] | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message, parameter=parameter, min=min, max=max, allowed_values=allowed_values, type=type)
        self.code = code or f"invalid{_wire_suffix(parameter)}"


class MissingParameterError(UpscaleError):
    """A required parameter is absent (or null): ``missing<Param>``."""

    code = "missingParameter"
    http_status = 400

    def __init__(
        self, message: str | None = None, *, parameter: str, allowed_values: Sequence[object] | None = None
    ) -> None:
        super().__init__(
            message or f"Missing required parameter '{parameter}'.", parameter=parameter, allowed_values=allowed_values
        )
        self.code = f"missing{_wire_suffix(parameter)}"


class UnknownTaskTypeError(UpscaleError):
    """The ``taskType`` is not one this server runs; ``allowed_values`` lists the ones it does."""

    code = "invalidTaskType"
    http_status = 400
    default_message = "Invalid value for 'taskType' parameter."
    default_parameter = "taskType"


class InvalidRequestError(UpscaleError):
    """The body is not a task list: malformed JSON, not an array, empty, or an element not an object."""

    code = "invalidRequest"
    http_status = 400
    default_message = "The request body must be a JSON array of task objects."


class PayloadTooLargeError(UpscaleError):
    """The request body or WebSocket frame is larger than the server accepts."""

    code = "payloadTooLarge"
    http_status = 413
    default_message = "The request is larger than this server accepts."


class TooManyTasksError(UpscaleError):
    """More tasks in one request than ``UPSCALE_MAX_TASKS`` allows."""

    code = "tooManyTasks"
    http_status = 413


class RequestTimeoutError(UpscaleError):
    """A request that did not arrive in time: a body too slow before its key was accepted."""

    code = "requestTimeout"
    http_status = 408


class InvalidUpscaleFactorError(InvalidParameterError):
    """The factor is not one the pipeline produces exactly (2, 3 or 4)."""

    code = "invalidUpscaleFactor"
    http_status = 400

    def __init__(
        self,
        message: str,
        *,
        parameter: str = "upscaleFactor",
        min: Number | None = UPSCALE_FACTORS[0],
        max: Number | None = UPSCALE_FACTORS[-1],
        allowed_values: Sequence[object] | None = UPSCALE_FACTORS,
        type: str | None = "integer",
    ) -> None:
        super().__init__(
            message,
            parameter=parameter,
            code=self.__class__.code,
            min=min,
            max=max,
            allowed_values=allowed_values,
            type=type,
        )


# --------------------------------------------------------------------------- authentication


class InvalidApiKeyError(UpscaleError):
    """The API key is not accepted. SDK-JS stops reconnecting on this exact code, so keep it."""

    code = "invalidApiKey"
    http_status = 401
    task_type = "authentication"
    default_message = "Invalid API key. Use one of the keys configured on this server."
    default_parameter = "apiKey"


class MissingApiKeyError(UpscaleError):
    """No API key: a REST call without ``Authorization``, or a WebSocket task before authentication."""

    code = "missingApiKey"
    http_status = 401
    task_type = "authentication"
    default_message = "Missing API key. Send an authentication task first, or an 'Authorization: Bearer <key>' header."
    default_parameter = "apiKey"


class OriginNotAllowedError(UpscaleError):
    """A browser sent the request from a page of another origin (api/origins.py)."""

    code = "originNotAllowed"
    http_status = 403


class HostNotAllowedError(UpscaleError):
    """The ``Host`` header names the server under a name it does not answer to (DNS rebinding)."""

    code = "hostNotAllowed"
    http_status = 403


# --------------------------------------------------------------------------- state


class ConflictTaskUUIDError(UpscaleError):
    """The ``taskUUID`` was already used. runware-sdk turns this into an ACK for a resent async task."""

    code = "conflictTaskUUID"
    http_status = 409
    default_message = "A task with this taskUUID already exists; send each task with a new UUID."
    default_parameter = "taskUUID"

    @classmethod
    def for_task(cls, task_uuid: str) -> ConflictTaskUUIDError:
        return cls(
            f"taskUUID {task_uuid} was already used; send each task with a new UUID "
            "(getResponse returns the earlier task's result to the key that sent it)"
        )


class ImageNotFoundError(UpscaleError):
    """An image UUID given as input (or an image URL path) is not stored here: never uploaded, or expired."""

    code = "imageNotFound"
    http_status = 404
    default_message = "No stored image with this UUID (never uploaded, or expired)."
    default_parameter = "inputImage"


class TaskNotFoundError(UpscaleError):
    """``getResponse`` for a taskUUID this server never saw, or whose result has expired."""

    code = "taskNotFound"
    http_status = 404
    default_message = "No task with this taskUUID (never sent, or its result expired)."
    default_parameter = "taskUUID"


class QueueFullError(UpscaleError):
    """The upscale queue is at capacity. The code is the one Runware's SDKs treat as retryable."""

    code = "rateLimitExceeded"
    http_status = 429
    default_message = "The server's upscale queue is full; retry with backoff."


# --------------------------------------------------------------------------- images


class ImageFetchError(UpscaleError):
    """An input URL could not be downloaded (network error, non-2xx status, timeout, empty body)."""

    code = "downloadFailed"
    http_status = 400


class BlockedAddressError(UpscaleError):
    """A URL the policy refuses: not http(s), unparsable, or a host that resolves to a non-public address.

    The message names the host and the reason and tells the operator which setting allows it; it
    never includes the address the name resolved to (that would map the internal network for the
    caller: the log has it). ``unsupported*`` puts it in the SDKs' validation category, so they do
    not retry it; a resend could not succeed either.
    """

    code = "unsupportedAddress"
    http_status = 400


class UploadFailedError(UpscaleError):
    """The result could not be PUT to ``uploadEndpoint``: a non-2xx answer, or no answer at all.

    400, like ``downloadFailed``: the endpoint is the client's (typically an expired or mis-signed
    presigned URL). A 5xx would make the SDKs resend the same task, which can only meet
    ``conflictTaskUUID``. ``uploadFailed`` is the code runware-sdk files under provider errors.
    """

    code = "uploadFailed"
    http_status = 400
    default_parameter = "uploadEndpoint"


class InvalidImageError(UpscaleError):
    """The bytes are not an image we can read: empty, corrupt, truncated, or an unsupported format."""

    code = "invalidImage"
    http_status = 400


class ImageTooLargeError(UpscaleError):
    """The image is over a budget: pixels declared in its header, or bytes downloaded from a URL."""

    code = "imageTooLarge"
    http_status = 413


# --------------------------------------------------------------------------- models and inference


class InvalidModelError(UpscaleError):
    """The requested model id is not in the manifest."""

    code = "invalidModel"
    http_status = 400


class ModelLoadError(UpscaleError):
    """A weight file exists but cannot be used: not a known architecture, wrong keys, unreadable."""

    code = "modelLoadFailed"
    http_status = 500


class ModelUnavailableError(UpscaleError):
    """No source could provide the weights (nothing dropped in, no ncnn package, download not allowed)."""

    code = "modelUnavailable"
    http_status = 503


class InferenceError(UpscaleError):
    """The network failed on this input even after the fallbacks (smaller tiles, fp32)."""

    code = "inferenceError"
    http_status = 500


class ServiceUnavailableError(UpscaleError):
    """The server is shutting down (or its worker stopped) and takes no new work; retry elsewhere or later."""

    code = "serviceUnavailable"
    http_status = 503


class TaskCrashedWorkersError(UpscaleError):
    """A cluster task whose workers died every time they ran it (a poison input): it is not tried again
    and is kept aside for the operator."""

    code = "taskCrashedWorkers"
    http_status = 500
    default_message = (
        "the workers running this task stopped unexpectedly every time it was tried; it was set aside "
        "and will not be retried (check the input, or send it again with a new taskUUID)"
    )


class TaskInterruptedError(UpscaleError):
    """The process running the task stopped before it finished (a crash or a kill); only a new task can
    still produce its result."""

    code = "taskInterrupted"
    http_status = 500
    default_message = "the server restarted while this task was running; send it again with a new taskUUID"


class InternalError(UpscaleError):
    """A failure we did not anticipate; the message is generic on purpose (the log has the details)."""

    code = "internalServerError"
    http_status = 500
    default_message = INTERNAL_ERROR_MESSAGE


# --------------------------------------------------------------------------- the wire form


def log_unexpected(exc: BaseException, *, task_uuid: str | None = None) -> None:
    """Log an exception that is not an :class:`UpscaleError`, with its traceback and the task it hit."""
    logger.error(
        "unexpected %s in task %s",
        exc.__class__.__name__,
        task_uuid or "-",
        exc_info=(type(exc), exc, exc.__traceback__),
    )


def error_item(exc: BaseException, *, task_type: str | None, task_uuid: str | None) -> dict[str, object]:
    """The Runware error item for ``exc``: the one place an exception becomes wire JSON.

    Keys: ``code``, ``message``, then ``parameter``, ``type``, ``min``, ``max``, ``allowedValues``,
    ``taskType``, ``taskUUID``, each only when known (Runware omits them too, and runware-sdk's WS
    transport delivers an error without ``taskUUID`` to every pending task, so callers pass it
    whenever they have one). The caller's ``task_type`` wins; an error with its own (the auth
    errors: SDK-JS routes auth failures by ``taskType == "authentication"``) fills it in otherwise,
    so a task refused for want of a key still answers under its own taskType and taskUUID.

    Anything that is not an :class:`UpscaleError` is a bug or an unanticipated failure: it is logged
    here with its traceback (callers must not log it again) and reported as ``internalServerError``
    with a generic message, so no internal detail reaches the client.
    """
    if not isinstance(exc, UpscaleError):
        log_unexpected(exc, task_uuid=task_uuid)
        exc = InternalError()
    item: dict[str, object] = {"code": exc.code, "message": shown(exc.message, MAX_MESSAGE_CHARS)}
    extras: dict[str, object | None] = {
        "parameter": exc.parameter,
        "type": exc.type,
        "min": exc.min,
        "max": exc.max,
        "allowedValues": exc.allowed_values,
        "taskType": task_type or exc.task_type,
        "taskUUID": task_uuid,
    }
    item.update({key: value for key, value in extras.items() if value is not None})
    return item


def http_status_of(exc: BaseException) -> int:
    """The status one error maps to: its ``http_status``, or 500 for anything unanticipated."""
    return exc.http_status if isinstance(exc, UpscaleError) else InternalError.http_status


def http_status_for(errors: Sequence[BaseException | int]) -> int:
    """The HTTP status of a REST reply in which every task failed with one of ``errors``.

    Each entry is an exception or the status it already mapped to (for errors kept as wire items).

    The rule, in order:

    1. any 401: the credentials are wrong, which is what the client must fix first;
    2. all errors share one status: that status;
    3. any client error (4xx): 400. Resending the same body cannot succeed, so the reply must not
       invite the SDKs' automatic retry (they retry 429 and 5xx);
    4. otherwise (different 5xx): 500.

    A reply in which some task succeeded is a 200 with ``errors`` beside ``data``; this function is not
    for it. An empty list is a caller bug and raises ``ValueError``.
    """
    if not errors:
        raise ValueError("http_status_for needs at least one error")
    statuses = {exc if isinstance(exc, int) else http_status_of(exc) for exc in errors}
    if 401 in statuses:
        return 401
    if len(statuses) == 1:
        return statuses.pop()
    if any(400 <= status < 500 for status in statuses):
        return 400
    return 500
