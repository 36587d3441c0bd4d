"""Image inputs: classifying the four wire forms, decoding base64, and fetching URLs from a real server."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from upscale_server.errors import InvalidParameterError, error_item
from upscale_server.tasks import inputs
from upscale_server.tasks.inputs import (
    Base64Ref,
    DataUriRef,
    UrlRef,
    UuidRef,
    classify_image_input,
)

PNG_1PX_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
PNG_1PX = base64.b64decode(PNG_1PX_B64)
LIMIT = 64 * 1024


# --------------------------------------------------------------------------- classification


def test_uuids_are_references_in_any_case() -> None:
    assert classify_image_input("fd613011-3872-4f37-b4aa-0d343c051a27") == UuidRef(
        "fd613011-3872-4f37-b4aa-0d343c051a27"
    )
    assert classify_image_input(" 019C42A0-C3FF-7138-BE83-EE257ABC5331\n") == UuidRef(
        "019c42a0-c3ff-7138-be83-ee257abc5331"
    )


def test_urls() -> None:
    assert classify_image_input("https://example.com/cat.png") == UrlRef("https://example.com/cat.png")
    assert classify_image_input("HTTP://127.0.0.1:8000/image/a.png?x=1") == UrlRef(
        "HTTP://127.0.0.1:8000/image/a.png?x=1"
    )


@pytest.mark.parametrize(
    "value",
    [
        "ftp://example.com/cat.png",
        "file:///etc/passwd",
        "C:/Users/me/cat.png",
        "https://",
        "javascript:alert(1)",
    ],
)
def test_other_schemes_are_refused(value: str) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        classify_image_input(value, parameter="inputs.image")
    assert caught.value.parameter == "inputs.image" and caught.value.code == "invalidImage"


def test_data_uri_of_a_real_png_round_trips(clipart_path: Path) -> None:
    png = clipart_path.read_bytes()
    ref = classify_image_input("data:image/png;base64," + base64.b64encode(png).decode())
    assert ref == DataUriRef("image/png", png)


def test_data_uri_details() -> None:
    assert classify_image_input(f"DATA:Image/PNG;base64,{PNG_1PX_B64}") == DataUriRef("image/png", PNG_1PX)
    # The media type is advisory (the decoder sniffs the bytes): odd or empty ones are accepted.
    assert classify_image_input(f"data:;base64,{PNG_1PX_B64}") == DataUriRef("", PNG_1PX)
    assert classify_image_input(f"data:image/png;name=a.png;base64,{PNG_1PX_B64}") == DataUriRef("image/png", PNG_1PX)
    assert "bytes>" in repr(classify_image_input(f"data:image/png;base64,{PNG_1PX_B64}"))  # no payload in logs


def test_raw_base64_tolerates_wrapping_and_missing_padding() -> None:
    assert classify_image_input(PNG_1PX_B64) == Base64Ref(PNG_1PX)
    wrapped = "\n".join(PNG_1PX_B64[i : i + 16] for i in range(0, len(PNG_1PX_B64), 16))
    assert classify_image_input(wrapped) == Base64Ref(PNG_1PX)
    assert classify_image_input(PNG_1PX_B64.rstrip("=")) == Base64Ref(PNG_1PX)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("data:image/png;base64,", "empty"),
        ("data:image/png,rawbytes", "base64-encoded"),
        ("data:image/png;base64", "no ','"),
        ("data:image/png;base64,iVBOR!!", "alphabet"),
        ("iVBORw0KGgo=AAAA", "alphabet"),  # padding in the middle
        ("iVBORw0KGgo===", "alphabet"),  # too much padding
        ("iVBORw0KG", "truncated"),  # 9 characters: no base64 string has this length
        ("iVBORw0KGgo-_", "alphabet"),  # URL-safe alphabet is not accepted
        ("cat.png", "alphabet"),  # a local path: must be uploaded first
    ],
)
def test_bad_inputs_are_refused_with_a_clear_reason(value: str, reason: str) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        classify_image_input(value, parameter="image")
    assert reason in caught.value.message
    item = error_item(caught.value, task_type="imageUpload", task_uuid=None)
    assert (item["code"], item["parameter"]) == ("invalidImage", "image")


def test_parameter_defaults_to_input_image() -> None:
    with pytest.raises(InvalidParameterError) as caught:
        classify_image_input("")
    assert caught.value.code == "invalidInputImage"


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 50, 51, 52, 53])
def test_base64_is_decoded_alike_whatever_the_piece_boundaries(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    """Big base64 is worked through in pieces (the GIL changes hands between them); where the pieces
    are cut, and whitespace or padding at the cuts, changes nothing."""
    data = np.random.default_rng(size).integers(0, 256, size + 1, dtype=np.uint8).tobytes()
    text = base64.b64encode(data).decode()
    wrapped = "\n".join(text[i : i + 5] for i in range(0, len(text), 5)) + " \n"
    for piece in (1, 3, 4, 7, 1 << 20):
        monkeypatch.setattr(inputs, "_PIECE", piece)
        for value in (text, wrapped, text.rstrip("=")):
            ref = classify_image_input(value)
            assert isinstance(ref, Base64Ref) and ref.data == data, (piece, value)
    monkeypatch.setattr(inputs, "_PIECE", 3)
    with pytest.raises(InvalidParameterError, match="outside the base64 alphabet"):
        classify_image_input(text[:4] + "=" + text[4:] if len(text) > 4 else "A=AA")
