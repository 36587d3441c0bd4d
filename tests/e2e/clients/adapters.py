"""One adapter per official SDK and transport: how the shared scenario table is said in that SDK, and what
its user gets back.

``tests/e2e/test_sdks.py`` holds the scenarios (upload, every sync input/output form, async, errors,
a wrong key) once; an adapter turns each into steps of its client program's plan (``_plan.py``) and
turns what the SDK handed back into terms the scenarios check. Everything one SDK does differently
from the others is written down here, on purpose, rather than hidden in the scenarios:

* the ``taskType`` it sends (``imageUpscale`` or ``upscale``) and whether it must name a model;
* the class names of its results (PyPI ``runware``: ``UploadImageType``, ``IImage``, ``IAsyncTaskResponse``);
* its error shape: which exception, whether the server's raw code reaches the user or only a category
  (``runware-sdk``), where the ``parameter`` and ``taskType`` are, whether the HTTP status is exposed;
* its async behaviour: which SDK polls ``getResponse`` itself, which hands back the ACK;
* what a wrong API key looks like to its user;
* the calls only it has (a local file path, a generic ``run()`` that passes any task through).

Adapters: ``runware`` (PyPI ``runware`` 0.5.24, WebSocket), ``runware-sdk-ws`` and ``runware-sdk-rest``
(PyPI ``runware-sdk`` 1.8.0 over WebSocket and over REST), ``sdk-js`` (npm ``@runware/sdk-js`` 1.3.2,
``RunwareServer`` in Node, WebSocket).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from tests.e2e.clients.harness import (
    DEFAULT_MODEL,
    FAST_MODEL,
    SourceImage,
    check_upscaled,
    js_command,
    runware_command,
    runware_sdk_command,
    single,
    step_error,
    step_result,
)
from upscale_server.testing import UpscaleTestServer

Step = dict[str, Any]
#: A check an SDK-specific scenario runs on the report (and the server, and the source image).
ExtraCheck = Callable[[dict[str, Any], UpscaleTestServer, SourceImage], None]


@dataclass(frozen=True)
class UserError:
    """A failed call, in the terms every SDK can be compared in."""

    kind: str  # the exception (or rejection) type the user catches
    code: str  # the code the SDK exposes: the server's raw code, or the SDK's own category
    parameter: str | None
    task_type: str | None
    message: str
    status_code: int | None  # the HTTP status, where the SDK exposes one (None: it does not, or WebSocket)


@dataclass(frozen=True)
class AsyncFlow:
    """The steps of an async scenario in one SDK: the ACK step (if the SDK returns it), a wait step (if
    the SDK polls too slowly to be waited for), and the step whose result is the finished image."""

    steps: list[Step]
    result: str
    ack: str | None = None
    wait: str | None = None
    again: str | None = None  # a getResponse by hand after the SDK delivered the result itself
    task_uuid: str | None = None  # when the caller chose it


@dataclass(frozen=True)
class Extra:
    """A scenario only this SDK can express (its steps run in the same plan) and its check."""

    name: str
    steps: list[Step]
    check: ExtraCheck


class Adapter:
    """Base: one SDK over one transport. Subclasses fill in every difference."""

    id: str  # pytest id
    sdk: str  # the "sdk" field of its reports
    version: str
    task_type: str  # the taskType this SDK sends for an upscale
    error_kind: str  # the exception type of a server error
    polls_async_itself: bool  # deliveryMethod "async": the SDK polls getResponse and returns the image
    returns_async_ack: bool  # ... or it can return the ACK and leave the polling to its user
    extra_names: tuple[str, ...] = ()  # the scenarios only this SDK has (see extras)

    def command(self, server: UpscaleTestServer, api_key: str) -> list[str]:
        raise NotImplementedError

    # ------------------------------------------------------------------ requests

    def upload_step(self, source: SourceImage) -> Step:
        raise NotImplementedError

    def upscale_step(self, name: str, fields: dict[str, Any], image: str, *, inputs_form: bool = False) -> Step:
        """An upscale of ``image`` with ``fields`` (factor, model, output..., deliveryMethod) as this SDK calls it.

        ``inputs_form``: send the image as ``inputs.image`` instead of ``inputImage`` (where the SDK offers both).
        """
        raise NotImplementedError

    def own_async_flow(self, name: str, fields: dict[str, Any], image: str) -> AsyncFlow:
        """``deliveryMethod: "async"`` where the SDK polls itself; then ``getResponse`` by hand."""
        raise NotImplementedError(f"{self.id} does not poll async tasks itself")

    def ack_async_flow(self, name: str, fields: dict[str, Any], image: str, server: UpscaleTestServer) -> AsyncFlow:
        """``deliveryMethod: "async"`` answered by the ACK; then the user gets the result with ``getResponse``."""
        raise NotImplementedError(f"{self.id} does not hand back the async ACK")

    def extras(self, source: SourceImage) -> list[Extra]:
        """Scenarios only this SDK has."""
        return []

    # ------------------------------------------------------------------ results

    def uploaded(self, report: dict[str, Any]) -> dict[str, Any]:
        """The item of the plan's ``upload`` step."""
        return single(step_result(report, "upload"))

    def check_upload_item(self, item: dict[str, Any]) -> None:
        raise NotImplementedError

    def check_result_item(self, item: dict[str, Any]) -> None:
        """What this SDK adds to (or how it wraps) an image result; nothing by default."""

    def ack_shape(self, task_uuid: str) -> dict[str, Any]:
        """The async ACK exactly as this SDK hands it back."""
        raise NotImplementedError

    def user_error(self, error: dict[str, Any]) -> UserError:
        raise NotImplementedError

    def expected_code(self, server_code: str) -> str:
        """The code the user sees for the server's ``server_code`` (the raw code unless the SDK maps it)."""
        return server_code

    def expected_parameter(self, parameter: str) -> str:
        """The ``parameter`` the server names for a field this SDK sent (it names the field as sent)."""
        return parameter

    def expected_status(self, http_status: int) -> int | None:
        """The HTTP status the user sees for a REST answer with ``http_status`` (None: not exposed)."""
        return None

    def check_wrong_key(self, report: dict[str, Any]) -> str:
        """Assert how a wrong API key shows up in this SDK; return the message its user reads."""
        raise NotImplementedError


# --------------------------------------------------------------------------- PyPI runware 0.5.24


class RunwarePy(Adapter):
    """PyPI ``runware`` 0.5.24 over WebSocket: ``Runware(api_key=..., url=...)`` in ``clients/runware_client.py``.

    Sends ``taskType: "imageUpscale"``; results are dataclasses, reported with their class name
    (``UploadImageType``, ``IImage``, ``IAsyncTaskResponse``). Server errors raise ``RunwareAPIError`` with
    the raw code and the error object (``error_data``). Uploads only local files (a string is passed
    through unchanged), so the plan uploads the source's path. With ``deliveryMethod: "async"`` it returns
    the ACK and does not poll; its ``getResponse`` waits ~30 s per ``processing`` answer, so the plan
    waits over plain REST until the task is done before calling it. A wrong key: ``connect`` completes,
    the first call raises ``ConnectionError`` with the server's message (the SDK exposes no code).
    """

    id = "runware"
    sdk = "runware"
    version = "0.5.24"
    task_type = "imageUpscale"
    error_kind = "RunwareAPIError"
    polls_async_itself = False
    returns_async_ack = True
    extra_names = ("local-file",)

    def command(self, server: UpscaleTestServer, api_key: str) -> list[str]:
        return [*runware_command(), "--url", server.ws_url, "--api-key", api_key]

    def upload_step(self, source: SourceImage) -> Step:
        return {"name": "upload", "op": "upload", "args": {"image": str(source.path)}}

    def upscale_step(self, name: str, fields: dict[str, Any], image: str, *, inputs_form: bool = False) -> Step:
        image_field = {"inputs": {"image": image}} if inputs_form else {"inputImage": image}
        return {"name": name, "op": "upscale", "args": {**fields, **image_field}}

    def ack_async_flow(self, name: str, fields: dict[str, Any], image: str, server: UpscaleTestServer) -> AsyncFlow:
        ack, wait, result = f"{name}-ack", f"{name}-wait", f"{name}-result"
        task_uuid = f"${{{ack}.taskUUID}}"
        wait_args = {"restURL": server.rest_url, "apiKey": server.api_key, "taskUUID": task_uuid}
        steps = [
            self.upscale_step(ack, {**fields, "deliveryMethod": "async"}, image),
            {"name": wait, "op": "rest_wait", "args": wait_args},
            {"name": result, "op": "get_response", "args": {"taskUUID": task_uuid}},
        ]
        return AsyncFlow(steps, result=result, ack=ack, wait=wait)

    def extras(self, source: SourceImage) -> list[Extra]:
        """The everyday call: a local file path, which the SDK uploads itself before upscaling its UUID."""

        def check(report: dict[str, Any], server: UpscaleTestServer, src: SourceImage) -> None:
            item = single(step_result(report, "local-file"))
            self.check_result_item(item)
            check_upscaled(item, server=server, source=src, factor=2, output_format="PNG", task_type=self.task_type)

        fields = {
            "model": FAST_MODEL,
            "upscaleFactor": 2,
            "outputType": "URL",
            "outputFormat": "PNG",
        }
        return [Extra("local-file", [self.upscale_step("local-file", fields, str(source.path))], check)]

    def uploaded(self, report: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = step_result(report, "upload")  # one object, not a list
        return result

    def check_upload_item(self, item: dict[str, Any]) -> None:
        assert item["_class"] == "UploadImageType"

    def check_result_item(self, item: dict[str, Any]) -> None:
        assert item["_class"] == "IImage"

    def ack_shape(self, task_uuid: str) -> dict[str, Any]:
        return {"_class": "IAsyncTaskResponse", "taskType": self.task_type, "taskUUID": task_uuid}

    def user_error(self, error: dict[str, Any]) -> UserError:
        data = error.get("error_data") or {}
        return UserError(error["type"], error.get("code", ""), data.get("parameter"), data.get("taskType"),
                         data.get("message", ""), None)  # fmt: skip

    def check_wrong_key(self, report: dict[str, Any]) -> str:
        assert report["connect"]["ok"], "this SDK connects without complaint, then refuses the first call"
        error = step_error(report, "upload")
        assert error["type"] == "ConnectionError"  # its only signal for auth failures
        message: str = error["message"]
        return message


# --------------------------------------------------------------------------- PyPI runware-sdk 1.8.0


class RunwareSdk(Adapter):
    """PyPI ``runware-sdk`` 1.8.0 (``tests/e2e/clients/runware_sdk_client.py``), over WebSocket or REST.

    Plans always pass ``taskType`` and AIR model ids with ``validate`` off, so the SDK never asks Runware's
    schema registry; a model must always be named. The task is ``upscale`` with ``inputs.image``; its
    generic ``run()`` passes any task through (``imageUpscale`` included). With ``deliveryMethod: "async"``
    (and by default) it waits for the ACK and polls ``getResponse`` itself. Errors raise ``RunwareError``
    whose ``code`` is the SDK's *category* (``auth``, ``validation``, ``notFound``, ...), derived from the
    raw server code by its ``errors.derive_code`` (it hides the raw code on purpose); ``status_code`` is the
    HTTP status over REST, None over WebSocket. A wrong key: over WebSocket ``connect()`` already fails,
    over REST the first request fails with 401; both ``auth``.
    """

    sdk_name = "runware-sdk"
    version = "1.8.0"
    task_type = "upscale"
    error_kind = "RunwareError"
    polls_async_itself = True
    returns_async_ack = False
    extra_names = ("legacy-imageUpscale",)
    #: The categories this SDK shows for the server's raw codes used here.
    CATEGORY: ClassVar[dict[str, str]] = {
        "invalidUpscaleFactor": "validation",
        "invalidModel": "validation",
        "imageNotFound": "notFound",
    }

    def __init__(self, transport: str) -> None:
        assert transport in ("websocket", "rest")
        self.transport = transport
        self.id = f"runware-sdk-{'ws' if transport == 'websocket' else 'rest'}"
        self.sdk = f"runware-sdk/{transport}"

    def command(self, server: UpscaleTestServer, api_key: str) -> list[str]:
        url = server.ws_url if self.transport == "websocket" else server.rest_url
        return [*runware_sdk_command(), "--transport", self.transport, "--url", url, "--api-key", api_key]

    def upload_step(self, source: SourceImage) -> Step:
        return {"name": "upload", "op": "image_upload", "args": {"image": source.data_uri}}

    def upscale_step(self, name: str, fields: dict[str, Any], image: str, *, inputs_form: bool = False) -> Step:
        """This SDK's own shape: ``upscale`` with ``inputs.image`` (whatever ``inputs_form`` says), a model
        always named, ``deliveryMethod`` as given (left out: the SDK's default, async with polling)."""
        args = {"taskType": self.task_type, **fields, "model": fields.get("model") or DEFAULT_MODEL}
        return {"name": name, "op": "run", "args": {**args, "inputs": {"image": image}}}

    def own_async_flow(self, name: str, fields: dict[str, Any], image: str) -> AsyncFlow:
        task_uuid = str(uuid.uuid4())  # caller-chosen, so the plan can getResponse it afterwards
        again = f"{name}-get-response"
        steps = [
            self.upscale_step(name, {**fields, "taskUUID": task_uuid, "deliveryMethod": "async"}, image),
            {"name": again, "op": "get_response", "args": {"taskUUID": task_uuid}},
        ]
        return AsyncFlow(steps, result=name, again=again, task_uuid=task_uuid)

    def extras(self, source: SourceImage) -> list[Extra]:
        """The legacy task name and image field pass straight through this SDK's ``run()``."""

        def check(report: dict[str, Any], server: UpscaleTestServer, src: SourceImage) -> None:
            item = single(step_result(report, "legacy-imageUpscale"))
            check_upscaled(item, server=server, source=src, factor=2, output_format="PNG", task_type="imageUpscale")

        args = {
            "taskType": "imageUpscale",
            "model": FAST_MODEL,
            "upscaleFactor": 2,
            "deliveryMethod": "sync",
            "inputImage": "${upload.imageURL}",
            "outputFormat": "PNG",
        }
        return [Extra("legacy-imageUpscale", [{"name": "legacy-imageUpscale", "op": "run", "args": args}], check)]

    def check_upload_item(self, item: dict[str, Any]) -> None:
        assert item["taskType"] == "imageUpload"

    def user_error(self, error: dict[str, Any]) -> UserError:
        return UserError(error["type"], error.get("code", ""), error.get("parameter"), error.get("task_type"),
                         error["message"], error.get("status_code"))  # fmt: skip

    def expected_code(self, server_code: str) -> str:
        return self.CATEGORY[server_code]

    def expected_parameter(self, parameter: str) -> str:
        return "inputs.image" if parameter == "inputImage" else parameter  # it sends the image as inputs.image

    def expected_status(self, http_status: int) -> int | None:
        return http_status if self.transport == "rest" else None

    def check_wrong_key(self, report: dict[str, Any]) -> str:
        error = step_error(report, "upload")
        assert error["code"] == "auth"
        if self.transport == "websocket":
            assert not report["connect"]["ok"]
            assert report["connect"]["error"]["code"] == "auth"
        else:
            assert error["status_code"] == 401
        message: str = error["message"]
        return message


# --------------------------------------------------------------------------- npm @runware/sdk-js 1.3.2


class SdkJs(Adapter):
    """npm ``@runware/sdk-js`` 1.3.2, ``RunwareServer`` in Node (``tests/e2e/js/client.mjs``), over WebSocket.

    Sends ``taskType: "upscale"`` and passes string inputs through unchanged; a sync call answers with the
    first data item (not a list). With ``deliveryMethod: "async"`` it polls ``getResponse`` every 2 s
    itself, or returns the ACK (``taskType`` and ``taskUUID`` only) with ``skipResponse: true``. Server
    errors reject with ``{error: {code, message, ...}}``: the raw server code reaches the user. A wrong key:
    ``initialize`` rejects with the server's ``invalidApiKey`` error (and stops reconnecting).
    """

    id = "sdk-js"
    sdk = "@runware/sdk-js"
    version = "1.3.2"
    task_type = "upscale"
    error_kind = "ApiError"
    polls_async_itself = True
    returns_async_ack = True

    def command(self, server: UpscaleTestServer, api_key: str) -> list[str]:
        return [*js_command(), "--url", server.ws_url, "--api-key", api_key]

    def upload_step(self, source: SourceImage) -> Step:
        return {"name": "upload", "op": "imageUpload", "args": {"image": source.data_uri}}

    def upscale_step(self, name: str, fields: dict[str, Any], image: str, *, inputs_form: bool = False) -> Step:
        image_field = {"inputs": {"image": image}} if inputs_form else {"inputImage": image}
        return {"name": name, "op": "upscale", "args": {**fields, **image_field}}

    def own_async_flow(self, name: str, fields: dict[str, Any], image: str) -> AsyncFlow:
        task_uuid = str(uuid.uuid4())
        again = f"{name}-get-response"
        steps = [
            self.upscale_step(name, {**fields, "taskUUID": task_uuid, "deliveryMethod": "async"}, image),
            {"name": again, "op": "getResponse", "args": {"taskUUID": task_uuid}},
        ]
        return AsyncFlow(steps, result=name, again=again, task_uuid=task_uuid)

    def ack_async_flow(self, name: str, fields: dict[str, Any], image: str, server: UpscaleTestServer) -> AsyncFlow:
        ack, result = f"{name}-ack", f"{name}-poll"
        steps = [
            self.upscale_step(ack, {**fields, "deliveryMethod": "async", "skipResponse": True}, image),
            {"name": result, "op": "poll", "args": {"taskUUID": f"${{{ack}.taskUUID}}"}},
        ]
        return AsyncFlow(steps, result=result, ack=ack)

    def check_upload_item(self, item: dict[str, Any]) -> None:
        assert item["taskType"] == "imageUpload"

    def ack_shape(self, task_uuid: str) -> dict[str, Any]:
        return {"taskType": self.task_type, "taskUUID": task_uuid}

    def user_error(self, error: dict[str, Any]) -> UserError:
        data = error.get("error") or {}
        return UserError(error["type"], error.get("code", ""), data.get("parameter"), data.get("taskType"),
                         error["message"], None)  # fmt: skip

    def check_wrong_key(self, report: dict[str, Any]) -> str:
        connect = report["connect"]
        assert not connect["ok"]
        assert connect["error"]["code"] == "invalidApiKey"
        assert connect["error"]["error"]["taskType"] == "authentication"
        message: str = connect["error"]["message"]
        return message


ADAPTERS: list[Adapter] = [RunwarePy(), RunwareSdk("websocket"), RunwareSdk("rest"), SdkJs()]
