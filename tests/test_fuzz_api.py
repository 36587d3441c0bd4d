"""Property-based fuzzing of both transports (REST ``POST /v1`` and WebSocket ``/v1``) through the real app.

Hypothesis builds hundreds of malformed requests: arbitrary JSON values, raw bytes, arrays of task
objects whose fields mix valid values with wrong types, out-of-range numbers, empty and huge strings,
unknown task types, missing fields and nested junk, strings holding lone surrogates, and image strings
that are garbage base64, truncated or bit-flipped PNG/JPEG bytes, non-image data URIs or UUIDs that
were never uploaded.

Whatever arrives, the server must answer in the Runware envelope:

* REST: never a 5xx (nor an ``internalServerError`` item inside a 200); the body is an object with only
  ``data`` and/or ``errors`` (never an empty ``errors``); each error has a string ``code`` and
  ``message`` (of bounded length: echoed values are cut short); request-level refusals (bad JSON, too
  many tasks, body too large, bad key) are one error; otherwise every task gets exactly one answer and
  a task with a string ``taskUUID`` gets it under that UUID.
* WebSocket: each frame is an object with exactly one of ``data``/``errors``, encodable as UTF-8; the
  connection survives every frame (a ping afterwards still gets its pong), and every task of a frame
  gets its answer.

The app runs the resize engine (the protocol is under test, not the pixels): valid upscales that the
fuzzer happens to build take milliseconds; ``max_input_pixels`` is tiny so a mutated header cannot ask
for a big decode. Input URLs point only at a closed loopback port.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from starlette.testclient import WebSocketTestSession

from tests.api_helpers import api_client, b64, data_uri, encode, photo_crop, resize_settings
from upscale_server.app import create_app
from upscale_server.errors import ELLIPSIS, MAX_MESSAGE_CHARS

KEY = "fuzz-key"
SMALL_MODEL = "local:realesr-animevideov3@1"
MAX_TASKS = 8
MAX_BODY = 256 * 1024
#: The fuzz app's decode budget: a mutated header cannot make the server decode or upscale a big image.
MAX_INPUT_PIXELS = 64 * 64
#: Replaced in the serialized request by the UUID of an image the fixture uploaded / a task it ran.
UPLOADED = "@@uploaded-image@@"
FINISHED_TASK = "@@finished-task@@"
FAILED_TASK = "@@failed-task@@"
#: A loopback port nothing listens on: an http input URL fails fast without leaving the machine.
CLOSED_URL = "http://127.0.0.1:1/image.png"
REQUEST_LEVEL_CODES = {"invalidRequest", "tooManyTasks", "payloadTooLarge", "missingApiKey", "invalidApiKey"}
FRAME_TIMEOUT = 30.0

PNG = encode(photo_crop(16, 16))
JPEG = encode(photo_crop(16, 16), "JPEG")
FUZZ_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """One app for the whole module, with an uploaded image, a finished task and a failed task to refer to."""
    app_settings = resize_settings(
        tmp_path_factory.mktemp("fuzz"),
        api_keys=[KEY],
        max_tasks=MAX_TASKS,
        max_body_bytes=MAX_BODY,
        max_unauthenticated_bytes=64 * MAX_BODY,  # the prefix rule has its own tests (test_api_admission)
        max_input_pixels=MAX_INPUT_PIXELS,
    )
    with api_client(app_settings) as client:
        auth = {"Authorization": f"Bearer {KEY}"}
        upload = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": data_uri(PNG)}
        finished = {
            "taskType": "imageUpscale",
            "taskUUID": str(uuid.uuid4()),
            "inputImage": b64(PNG),
            "model": SMALL_MODEL,
            "upscaleFactor": 2,
        }
        failed = {**finished, "taskUUID": str(uuid.uuid4()), "inputImage": str(uuid.uuid4())}
        reply = client.post("/v1", json=[upload, finished, failed], headers=auth)
        assert reply.status_code == 200, reply.text
        assert len(reply.json()["data"]) == 2 and len(reply.json()["errors"]) == 1
        uploaded = next(item for item in reply.json()["data"] if item["taskType"] == "imageUpload")
        names = {
            UPLOADED: uploaded["imageUUID"],
            FINISHED_TASK: finished["taskUUID"],
            FAILED_TASK: failed["taskUUID"],
        }
        yield client, names


# --------------------------------------------------------------------------- strategies

#: Free text without "/": no generated string can be an http URL with a host (nothing is ever fetched).
safe_text = st.text(max_size=30).map(lambda text: text.replace("/", "\\"))
big_numbers = st.sampled_from([10**50, -(10**50), 2**63, 2**64 + 1, -(2**63) - 1, 10**400, 1e308, -0.0, 5e-324])
finite = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.none() | st.booleans() | st.integers() | big_numbers | finite | safe_text
#: NaN and Infinity are not JSON; json.dumps writes them anyway, as careless clients do.
non_json = st.sampled_from([float("nan"), [float("inf")], {"taskType": "ping", "ping": float("-inf")}])
junk = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(safe_text, children, max_size=4),
    max_leaves=8,
)
huge_strings = st.sampled_from(["", " ", "\n\t", "A" * 100_000, "A" * 300_000, "é" * 40_000, "x" * 129])
#: JSON admits lone surrogates, which no URL or UTF-8 text can hold: every string field must refuse them.
lone_surrogates = st.sampled_from(["\ud800", "\udfff" * 3, CLOSED_URL + "\udc00", "data:image/png;base64,\ud800"])


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` truncated, with bytes overwritten, or with junk spliced in."""
    data = bytearray(base)
    kind = draw(st.sampled_from(["truncate", "overwrite", "splice"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "overwrite":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    at = draw(st.integers(0, len(data)))
    return bytes(data[:at]) + draw(st.binary(min_size=1, max_size=64)) + bytes(data[at:])


def as_wire(data: st.SearchStrategy[bytes]) -> st.SearchStrategy[str]:
    """Bytes as an image string: bare base64, a data URI, or a data URI with a wrong media type."""
    return data.flatmap(
        lambda raw: st.sampled_from(
            [b64(raw), data_uri(raw), data_uri(raw, "image/jpeg"), data_uri(raw, "text/plain"), data_uri(raw, "")]
        )
    )


images = st.one_of(
    st.just(data_uri(PNG)),
    st.just(b64(PNG)),
    st.just(data_uri(JPEG, "image/jpeg")),
    st.just(UPLOADED),
    st.uuids().map(str),  # never uploaded
    st.uuids().map(lambda value: str(value).upper()),
    as_wire(mutated(PNG)),
    as_wire(mutated(JPEG)),
    as_wire(st.binary(max_size=200)),  # garbage that is valid base64
    as_wire(st.text(max_size=100).map(str.encode)),  # a non-image data URI
    safe_text,  # mostly not base64 at all
    st.sampled_from(
        [
            CLOSED_URL,
            "file:///etc/passwd",
            "ftp://127.0.0.1/x.png",
            "C:\\image.png",
            "data:image/png,notbase64",
            "data:image/png;base64,",
            "data:image/png;base64,!!!!",
            "data:" + "x" * 300 + ";base64,AAAA",
            "data:;base64," + b64(PNG),
            "iVBORw0KGgo",  # base64 of a truncated PNG signature
            "A",  # impossible base64 length
            "AAAA====",
        ]
    ),
    huge_strings,
    lone_surrogates,
    junk,
)
task_uuids = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda value: str(value).upper()),
    st.uuids().map(lambda value: value.hex),  # no hyphens
    st.sampled_from([FINISHED_TASK, FAILED_TASK, "not-a-uuid", "", "x" * 129]),
    huge_strings,
    junk,
)
task_types = st.one_of(
    st.sampled_from(["imageUpscale", "upscale", "imageUpload", "getResponse", "ping", "authentication"]),
    st.sampled_from(["imageupscale", "UPSCALE", "imageInference", "videoInference", " ping", ""]),
    junk,
)
models = st.one_of(
    st.just(SMALL_MODEL),
    st.just(SMALL_MODEL),
    st.just(SMALL_MODEL),
    st.sampled_from(["runware:999@1", "local:nope@1", "", " ", "x" * 5000]),
    lone_surrogates,
    junk.filter(lambda value: value is not None),  # null would select the big default model
)
factors = st.one_of(
    st.sampled_from([2, 3, 4, 2.0, 4.0]),
    st.integers(-5, 10),
    finite,
    st.sampled_from([float("nan"), float("inf")]),
    big_numbers,
    st.sampled_from(["2", "4", True, False, [2], {"x": 2}]),
)


def choice(valid: list[Any]) -> st.SearchStrategy[Any]:
    """A case-insensitive enum field: valid spellings, near misses and junk."""
    return st.one_of(
        st.sampled_from(valid), st.sampled_from(["", "gif", "bmp", "URL ", "sync!"]), lone_surrogates, junk
    )


loopback_urls = st.one_of(
    st.just(CLOSED_URL), st.sampled_from(["", "not a url", "ftp://127.0.0.1/"]), lone_surrogates, junk
)
fields: dict[str, st.SearchStrategy[Any]] = {
    "taskUUID": task_uuids,
    "inputImage": images,
    "image": images,
    "inputs": st.one_of(st.fixed_dictionaries({}, optional={"image": images}), junk),
    "upscaleFactor": factors,
    "outputType": choice(["URL", "base64Data", "dataURI", "url", "BASE64DATA", "datauri"]),
    "outputFormat": choice(["JPG", "PNG", "WEBP", "jpeg", "png", "webp"]),
    "outputQuality": st.one_of(st.integers(-10, 200), finite, junk),
    "includeCost": st.one_of(st.booleans(), junk),
    "deliveryMethod": choice(["sync", "async", "ASYNC", "Sync"]),
    "webhookURL": loopback_urls,
    "uploadEndpoint": loopback_urls,
    "ttl": st.one_of(st.integers(-10, 10**6), big_numbers, junk),
    "ping": st.one_of(st.booleans(), junk),
    "apiKey": st.one_of(st.just(KEY), st.sampled_from(["", " ", "wrong", KEY + " "]), junk),
    "connectionSessionUUID": st.one_of(st.uuids().map(str), junk),
    "numberResults": junk,
    "settings": junk,
}
good_images = st.sampled_from([data_uri(PNG), b64(PNG), data_uri(JPEG, "image/jpeg"), UPLOADED])
valid_upscales = st.fixed_dictionaries(
    {
        "taskType": st.sampled_from(["imageUpscale", "upscale"]),
        "taskUUID": st.uuids().map(str),
        "model": st.just(SMALL_MODEL),
        "upscaleFactor": st.sampled_from([2, 3, 4]),
    },
    optional={
        "outputType": st.sampled_from(["URL", "base64Data", "dataURI"]),
        "outputFormat": st.sampled_from(["JPG", "PNG", "WEBP"]),
        "outputQuality": st.integers(20, 99),
        "includeCost": st.booleans(),
        "deliveryMethod": st.sampled_from(["sync", "async"]),
        "ttl": st.integers(60, 10**6),
    },
).flatmap(
    lambda task: good_images.flatmap(
        lambda image: st.sampled_from([{**task, "inputImage": image}, {**task, "inputs": {"image": image}}])
    )
)
valid_tasks = st.one_of(
    valid_upscales,
    valid_upscales,
    st.fixed_dictionaries({"taskType": st.just("imageUpload"), "taskUUID": st.uuids().map(str), "image": good_images}),
    st.fixed_dictionaries(
        {
            "taskType": st.just("getResponse"),
            "taskUUID": st.one_of(st.sampled_from([FINISHED_TASK, FAILED_TASK]), st.uuids().map(str)),
        }
    ),
    st.just({"taskType": "ping", "ping": True}),
    st.fixed_dictionaries({"taskType": st.just("authentication"), "apiKey": st.just(KEY)}),
)


@st.composite
def broken_tasks(draw: st.DrawFn) -> dict[str, Any]:
    """A valid task with up to three fields set to hostile values, removed, or unknown keys added."""
    task = dict(draw(valid_tasks))
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        action = draw(st.sampled_from(["set", "set", "delete", "add"]))
        if action == "set":
            name = draw(st.sampled_from(["taskType", "model", *fields]))
            task[name] = draw(task_types if name == "taskType" else models if name == "model" else fields[name])
        elif action == "delete" and task:
            task.pop(draw(st.sampled_from(sorted(task))))
        else:
            task[draw(safe_text)] = draw(junk)
    if task.get("model") is None:
        task["model"] = SMALL_MODEL  # absent or null selects the big default model: keep every upscale small
    return task


tasks = st.one_of(
    broken_tasks(),
    broken_tasks(),
    broken_tasks(),
    broken_tasks(),
    st.fixed_dictionaries({"taskType": task_types, "model": models}, optional=fields),
    st.dictionaries(safe_text, junk, max_size=5),
    junk,  # not an object at all
)
auth_tasks = st.fixed_dictionaries({"taskType": st.just("authentication"), "apiKey": fields["apiKey"]})
some_tasks = st.lists(tasks, min_size=1, max_size=MAX_TASKS + 2)
task_lists = st.one_of(some_tasks, some_tasks, some_tasks, some_tasks, st.just([]))


@st.composite
def rest_bodies(draw: st.DrawFn) -> bytes:
    """A REST body: usually a task array (maybe led by an in-body auth task), else any JSON or raw bytes."""
    kind = draw(st.sampled_from(["tasks"] * 6 + ["auth+tasks", "one task", "json", "bytes", "text"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "text":
        return draw(st.text(max_size=300)).encode()
    value: Any
    if kind == "tasks":
        value = draw(task_lists)
    elif kind == "auth+tasks":
        value = [draw(auth_tasks), *draw(task_lists)]
    elif kind == "one task":
        value = draw(tasks)
    else:
        value = draw(junk | non_json)
    return serialize(value)


rest_headers = st.sampled_from(
    [
        *[{"Authorization": f"Bearer {KEY}"}] * 8,
        {"Authorization": f"bearer   {KEY}  "},
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": KEY},
    ]
).flatmap(
    lambda auth: st.sampled_from([{}, {"content-type": "application/json"}, {"content-type": "text/plain"}]).map(
        lambda kind: {**auth, **kind}
    )
)


def serialize(value: Any) -> bytes:
    """JSON as a careless client writes it (NaN and Infinity included), ASCII-escaped."""
    return json.dumps(value).encode()


def substitute(body: bytes, names: dict[str, str]) -> bytes:
    for placeholder, name in names.items():
        body = body.replace(placeholder.encode(), name.encode())
    return body


# --------------------------------------------------------------------------- the oracle


def _reject_constant(name: str) -> object:
    raise ValueError(name)


def parse_like_the_protocol(body: bytes) -> tuple[str | None, list[Any]]:
    """What the body is: a request-level error code, or its task list."""
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return "invalidRequest", []
    if not isinstance(value, list) or not value:  # a lone task object included: Runware takes arrays only
        return "invalidRequest", []
    if len(value) > MAX_TASKS:
        return "tooManyTasks", []
    return None, value


def refusal_codes(refusal: str) -> set[str]:
    """The codes a request-level refusal may carry: the task count is judged before the JSON is parsed
    whole, so a malformed body with too many elements may be refused for its count."""
    return {"invalidRequest", "tooManyTasks"} if refusal == "invalidRequest" else {refusal}


def answered_once(tasks: list[Any]) -> list[Any]:
    """The tasks of a request as the server answers them: repeated polls of one taskUUID once."""
    polled: set[str] = set()
    kept = []
    for task in tasks:
        task_uuid = echoed_uuid(task)
        if task_type_of(task) == "getResponse" and task_uuid is not None:
            if task_uuid in polled:
                continue
            polled.add(task_uuid)
        kept.append(task)
    return kept


def task_type_of(task: Any) -> Any:
    return task.get("taskType") if isinstance(task, dict) else None


def echoed_uuid(task: Any) -> str | None:
    """The taskUUID an answer to ``task`` must carry: a short string sent on a non-auth task."""
    if not isinstance(task, dict) or task_type_of(task) == "authentication":
        return None
    value = task.get("taskUUID")
    return value if isinstance(value, str) and len(value) <= 128 else None


def is_valid_auth(task: Any) -> bool:
    """An authentication task that parses: it is consumed, not answered, inside an authenticated request."""
    key = task.get("apiKey") if isinstance(task, dict) else None
    return task_type_of(task) == "authentication" and isinstance(key, str) and bool(key.strip())


def bearer(headers: dict[str, str]) -> str | None:
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def check_error_item(item: Any) -> None:
    assert isinstance(item, dict), item
    assert isinstance(item.get("code"), str) and item["code"], item
    assert isinstance(item.get("message"), str) and item["message"], item
    assert item["code"] != "internalServerError", item
    assert len(item["message"]) <= MAX_MESSAGE_CHARS + len(ELLIPSIS), item  # echoes are cut short


def check_answers(answered: list[Any], items: list[dict[str, Any]]) -> None:
    """Every task got exactly one answer; one with a string taskUUID (pings aside) got it under that UUID."""
    assert len(items) == len(answered), (answered, items)
    sent = Counter(echoed_uuid(task) for task in answered if echoed_uuid(task) is not None)
    must_echo = Counter(echoed_uuid(task) for task in answered if echoed_uuid(task) and task_type_of(task) != "ping")
    got = Counter(item["taskUUID"] for item in items if "taskUUID" in item)
    for task_uuid, count in must_echo.items():
        assert got[task_uuid] >= count, f"no answer under taskUUID {task_uuid!r}: {items}"
    for task_uuid, count in got.items():
        assert sent[task_uuid] >= count, f"an answer under a taskUUID nobody sent: {task_uuid!r}"


# --------------------------------------------------------------------------- REST


def check_rest(body: bytes, headers: dict[str, str], status: int, reply: Any) -> None:
    assert status < 500, reply
    assert isinstance(reply, dict) and reply, reply
    assert set(reply) <= {"data", "errors"}, reply
    errors = reply.get("errors", [])
    data = reply.get("data", [])
    assert isinstance(data, list) and isinstance(errors, list)
    assert "errors" not in reply or errors, "an empty errors list"
    for item in errors:
        check_error_item(item)
        note_event(f"REST error {item['code']}")
    for item in data:
        note_event(f"REST answer {item.get('taskType')}{' ' + item['status'] if 'status' in item else ''}")
        assert isinstance(item, dict) and isinstance(item.get("taskType"), str), item

    refusal: str | None = "payloadTooLarge" if len(body) > MAX_BODY else None
    answered: list[Any] = []
    if refusal is None:
        refusal, answered = parse_like_the_protocol(body)
    if refusal is None:
        key = bearer(headers)
        if task_type_of(answered[0]) == "authentication":
            in_body = answered[0].get("apiKey")
            key = in_body if isinstance(in_body, str) else key
            answered = answered[1:]
        if key != KEY:
            refusal = "apiKey"
    if refusal is not None:
        assert status in (400, 401, 413) and "data" not in reply and len(errors) == 1, reply
        code = errors[0]["code"]
        assert code in ({"missingApiKey", "invalidApiKey"} if refusal == "apiKey" else refusal_codes(refusal)), reply
        assert "taskUUID" not in errors[0], reply
        return
    check_answers(answered_once([task for task in answered if not is_valid_auth(task)]), data + errors)
    # A polled failure (getResponse of a failed task, ``status: error``) is an answer, not a failed request.
    polled_only = all(item.get("status") == "error" for item in errors)
    assert status == 200 if data or polled_only else 400 <= status < 500, (status, reply)


@settings(FUZZ_SETTINGS, max_examples=350)
@given(body=rest_bodies(), headers=rest_headers)
def test_rest_answers_every_malformed_request_in_the_envelope(
    fuzz_app: tuple[TestClient, dict[str, str]], body: bytes, headers: dict[str, str]
) -> None:
    """Proves REST never fails with a 5xx or an internal error on malformed input, always answers in the
    Runware envelope, refuses bad requests with one clear error, and answers each task of a good
    request exactly once under its own taskUUID."""
    client, names = fuzz_app
    body = substitute(body, names)
    response = client.post("/v1", content=body, headers=headers)
    assert response.headers["content-type"].startswith("application/json")
    check_rest(body, headers, response.status_code, response.json())


# --------------------------------------------------------------------------- WebSocket


def receive_frame(ws: WebSocketTestSession, timeout: float = FRAME_TIMEOUT) -> dict[str, Any]:
    """The next frame, within ``timeout`` (the TestClient's own receive waits forever); fails on close."""

    async def receive() -> Any:
        with anyio.fail_after(timeout):
            return await ws._send_rx.receive()

    message = ws.portal.call(receive)
    assert message["type"] == "websocket.send", f"the server dropped the connection: {message}"
    text = message.get("text")
    if text is None:
        text = message["bytes"].decode("utf-8")
    text.encode("utf-8")  # a real transport must be able to send it: no lone surrogates
    frame = json.loads(text)
    assert isinstance(frame, dict), frame
    if "error" in frame:  # a refused authentication: the same item again, singular, for the newer JS SDK
        singular = frame.pop("error")
        assert singular == frame.get("errors", [None])[0] and singular["taskType"] == "authentication", frame
    assert len(frame) == 1 and set(frame) <= {"data", "errors"}, frame
    items = next(iter(frame.values()))
    assert isinstance(items, list) and items, frame
    for item in frame.get("errors", []):
        check_error_item(item)
        note_event(f"WS error {item['code']}")
    return frame


PONG = {"data": [{"taskType": "ping", "pong": True}]}


def note_event(text: str) -> None:
    """Hypothesis statistics when running under @given; the same helpers serve the plain tests too."""
    if currently_in_test_context():
        event(text)


def expected_ws_answers(body: bytes, authenticated: bool) -> tuple[list[Any], bool]:
    """The tasks of a frame that must be answered (an auth reply or request error counts as one), and
    whether the connection is authenticated afterwards."""
    refusal, frame_tasks = parse_like_the_protocol(body)
    if refusal is not None:
        return [{"request": refusal}], authenticated
    answered: list[Any] = []
    if task_type_of(frame_tasks[0]) == "authentication":
        leading = frame_tasks[0]
        answered.append({"authentication": True})
        if leading.get("apiKey") != KEY:
            return answered, authenticated
        authenticated = True
        frame_tasks = frame_tasks[1:]
    if authenticated:
        return answered + answered_once([task for task in frame_tasks if not is_valid_auth(task)]), True
    return answered + frame_tasks, False


@st.composite
def ws_frames(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A frame's payload (any REST body) and whether it goes as a binary frame (always, if not UTF-8)."""
    body = draw(rest_bodies())
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return body, True
    return body, draw(st.booleans())


@settings(FUZZ_SETTINGS, max_examples=200)
@given(frames=st.lists(ws_frames(), min_size=1, max_size=3), authenticate=st.sampled_from([True, True, True, False]))
def test_websocket_survives_and_answers_every_malformed_frame(
    fuzz_app: tuple[TestClient, dict[str, str]], frames: list[tuple[bytes, bool]], authenticate: bool
) -> None:
    """Proves the WebSocket never drops the connection on malformed frames, sends each answer as an
    object with exactly one of data/errors, answers every task of every frame (under its taskUUID
    where it had one), and still answers a ping after each frame."""
    client, names = fuzz_app
    with client.websocket_connect("/v1") as ws:
        authenticated = False
        if authenticate:
            ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": KEY}]))
            assert "connectionSessionUUID" in receive_frame(ws)["data"][0]
            authenticated = True
        for raw, binary in frames:
            sent = substitute(raw, names)
            if binary:
                ws.send_bytes(sent)
            else:
                ws.send_text(sent.decode("utf-8", errors="replace"))
            payload = sent.decode("utf-8", errors="replace").encode()  # what the server parses
            answered, authenticated = expected_ws_answers(payload, authenticated)
            ws.send_text(json.dumps([{"taskType": "ping", "ping": True}]))
            frames_seen = [receive_frame(ws) for _ in range(len(answered) + 1)]
            pongs = [frame for frame in frames_seen if frame == PONG]
            assert pongs, f"no pong after the frame: {frames_seen}"
            frames_seen.remove(PONG)  # ours; a pong left over answers a ping inside the fuzzed frame
            items = [item for frame in frames_seen for item in next(iter(frame.values()))]
            request_level = [task for task in answered if isinstance(task, dict) and "request" in task]
            if request_level:
                assert len(items) == 1 and items[0]["code"] in refusal_codes(request_level[0]["request"]), items
                assert "taskUUID" not in items[0]
            else:
                check_answers(answered, items)
            ws.send_text(json.dumps([{"taskType": "ping", "ping": True}]))
            assert receive_frame(ws) == PONG, "an answer nobody asked for arrived"


# --------------------------------------------------------------------------- found by the fuzzer, fixed


SURROGATE = "\ud800"  # a lone surrogate: valid in JSON text as an escape, not encodable as UTF-8


@pytest.mark.parametrize(
    "tasks",
    [
        [{"taskType": SURROGATE, "taskUUID": str(uuid.uuid4())}],
        [{"taskType": "ping", "taskUUID": SURROGATE}],
        [{"taskType": "authentication", "apiKey": SURROGATE}, {"taskType": "ping"}],
    ],
    ids=["taskType", "taskUUID", "apiKey"],
)
def test_rest_lone_surrogate_is_a_clear_error(tmp_path: Path, tasks: list[dict[str, Any]]) -> None:
    """``POST /v1`` with ``[{"taskType": "\\ud800", "taskUUID": "<uuid>"}]`` (escaped, so valid JSON) once
    crashed while rendering the echo; now 400 ``invalidTaskType`` (``invalidTaskUUID`` / 401 ``invalidApiKey``)."""
    app_settings = resize_settings(tmp_path, api_keys=[KEY])
    with TestClient(create_app(app_settings), raise_server_exceptions=False) as client:
        headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
        response = client.post("/v1", content=serialize(tasks), headers=headers)
        assert 400 <= response.status_code < 500, response.status_code
        check_error_item(response.json()["errors"][0])


def test_websocket_lone_surrogate_api_key_is_refused_not_fatal(tmp_path: Path) -> None:
    """WS frame ``[{"taskType":"authentication","apiKey":"\\ud800"}]`` once closed the connection; now an
    ``invalidApiKey`` error frame, and the connection still answers pings."""
    app_settings = resize_settings(tmp_path, api_keys=[KEY])
    with api_client(app_settings) as client, client.websocket_connect("/v1") as ws:
        ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": SURROGATE}]))
        assert receive_frame(ws, timeout=5)["errors"][0]["code"] == "invalidApiKey"
        ws.send_text(json.dumps([{"taskType": "ping", "ping": True}]))
        assert receive_frame(ws, timeout=5) == PONG
