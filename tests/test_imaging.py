"""Tests for upscale_server.imaging: decoding rules, limits, encoding fidelity and the pixel helpers."""

from __future__ import annotations

import contextlib
import io
import itertools
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import png
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms, ImageFile, ImageOps, JpegImagePlugin

from upscale_server import imaging
from upscale_server.errors import ImageTooLargeError, InvalidImageError
from upscale_server.imaging import (
    ALLOWED_INPUT_FORMATS,
    Picture,
    bleed_transparent_colors,
    decode_image,
    encode_image,
    flatten_alpha,
    read_header,
    read_image_file,
    resize_pixels,
)
from upscale_server.vocabulary import ImageFormat

RNG = np.random.default_rng(1234)
SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


# -------------------------------------------------------------------------------------------------
# helpers


def pil_bytes(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def png16_bytes(values: np.ndarray, **params: object) -> bytes:
    """A 16-bit PNG written by pypng from a uint16 H x W x C array (C = 1..4)."""
    h, w, c = values.shape
    writer = png.Writer(w, h, greyscale=c <= 2, alpha=c in (2, 4), bitdepth=16, **params)
    out = io.BytesIO()
    writer.write(out, values.reshape(h, w * c).tolist())
    return out.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def crafted_png(width: int, height: int, *, depth: int = 8, colour: int = 0, idat: bytes = b"") -> bytes:
    """A PNG whose header declares any size, with whatever IDAT payload we like (a bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat or zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def insert_after_ihdr(data: bytes, chunk: bytes) -> bytes:
    return data[:33] + chunk + data[33:]


def exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def rgb8(h: int, w: int, c: int = 3) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, c), dtype=np.uint8)


def cmyk_profile_ignoring_cyan() -> bytes:
    """A minimal ICC v2 CMYK profile (lut8 A2B0 to Lab) in which cyan ink changes nothing.

    Pillow's naive CMYK conversion turns pure cyan into (0, 255, 255); through this profile it is
    white, so the result tells which path was taken.
    """
    clut = bytearray()
    for _cyan, m, y, k in itertools.product((0, 1), repeat=4):  # first channel varies slowest
        lightness = 0 if k else 255 - 60 * m - 30 * y
        clut += bytes([lightness, 128 + 50 * m, 128 + 70 * y])
    identity = bytes(range(256))
    matrix = b"".join(struct.pack(">i", 65536 if i % 4 == 0 else 0) for i in range(9))
    lut = b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + matrix + identity * 4 + bytes(clut) + identity * 3
    d50 = struct.pack(">iii", round(0.9642 * 65536), 65536, round(0.8249 * 65536))
    wtpt = b"XYZ " + bytes(4) + d50
    tags = [(b"A2B0", lut), (b"wtpt", wtpt)]
    offset = 128 + 4 + 12 * len(tags)
    table, body = struct.pack(">I", len(tags)), b""
    for sig, payload in tags:
        table += sig + struct.pack(">II", offset + len(body), len(payload))
        body += payload + bytes(-len(payload) % 4)
    size = offset + len(body)
    header = (
        struct.pack(">I", size)
        + bytes(4)
        + struct.pack(">I", 0x02100000)
        + b"prtrCMYKLab "
        + bytes(12)
        + b"acsp"
        + bytes(24)
        + struct.pack(">I", 0)
        + d50
        + bytes(128 - 80)
    )
    assert len(header) == 128
    return header + table + body


# -------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b"hello, world: definitely not an image", "Not a recognised image"),
        (b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "PDF"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10"/>', "SVG"),
        (b'  <svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>', "SVG"),
        (b"\x00\x00\x00\x1cftypheic\x00\x00\x00\x00", "HEIF"),
    ],
)
def test_unreadable_bytes_give_a_one_line_invalid_image_error(data: bytes, fragment: str) -> None:
    with pytest.raises(InvalidImageError) as info:
        decode_image(data)
    assert fragment in info.value.message
    assert "\n" not in info.value.message


def test_tiff_is_refused_by_name() -> None:
    assert "TIFF" not in ALLOWED_INPUT_FORMATS
    tiff = pil_bytes(Image.new("RGB", (8, 8), "red"), "TIFF")
    with pytest.raises(InvalidImageError, match=r"Unsupported image format \(TIFF\)"):
        decode_image(tiff)


@pytest.mark.parametrize("which", ["photo", "clipart"])
def test_truncated_files_are_invalid(which: str, photo_path: Path, clipart_path: Path) -> None:
    data = (photo_path if which == "photo" else clipart_path).read_bytes()
    with pytest.raises(InvalidImageError) as info:
        decode_image(data[: len(data) // 2])
    assert "\n" not in info.value.message


def test_header_ok_but_pixel_data_corrupt_is_invalid() -> None:
    data = crafted_png(16, 16, idat=b"this is not zlib data at all")
    with pytest.raises(ImageTooLargeError, match="16x16"):
        decode_image(data, max_pixels=16 * 16 - 1)  # Pillow reads its header fine ...
    with pytest.raises(InvalidImageError, match=r"corrupt|truncated"):
        decode_image(data)  # ... and fails while loading


def test_corrupt_16bit_png_is_invalid() -> None:
    data = crafted_png(16, 16, depth=16, colour=2, idat=b"garbage")
    with pytest.raises(InvalidImageError):
        decode_image(data)
    good = png16_bytes(RNG.integers(0, 65536, (8, 8, 3), dtype=np.uint16))
    with pytest.raises(InvalidImageError):
        decode_image(good[:-30])


@pytest.mark.parametrize(
    ("width", "height", "depth", "colour"),
    [
        (30_000, 30_000, 8, 0),  # beyond Pillow's own bomb limit: DecompressionBombError
        (9_000, 9_000, 8, 6),  # under Pillow's limit, over our 64 Mpx default
        (9_000, 9_000, 16, 2),  # a 16-bit RGB bomb must not reach pypng
    ],
)
def test_decompression_bomb_is_refused_from_the_header(width: int, height: int, depth: int, colour: int) -> None:
    # A real bomb: rows of zeros compress ~1000:1, so the file is small and the promise is huge.
    row = b"\x00" * (1 + width * (depth // 8) * {0: 1, 2: 3, 6: 4}[colour])
    idat = zlib.compress(row * 64, 9)  # the first rows only; the refusal must come before they matter
    data = crafted_png(width, height, depth=depth, colour=colour, idat=idat)
    assert len(data) < 100_000
    with no_pixel_decoding(), pytest.raises(ImageTooLargeError) as info:
        decode_image(data)
    assert "\n" not in info.value.message


@contextlib.contextmanager
def no_pixel_decoding() -> Iterator[None]:
    """Fail the test if any decoder touches pixel data inside the block (header reads are fine)."""

    def refuse(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError("pixel data was decoded")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", refuse)
        patch.setattr(imaging, "_read_png16", refuse)
        yield


def many_scan_jpeg(repeats: int, size: int = 256) -> bytes:
    """A progressive JPEG whose smallest scan is repeated ``repeats`` times: a few KB that libjpeg
    decodes scan by scan over the whole image (it warns about the bogus progression, and carries on)."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (120, 130, 140)).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    first, end = data.index(b"\xff\xda"), data.rindex(b"\xff\xd9")
    starts = [first, *(i for i in range(first + 2, end) if data[i : i + 2] == b"\xff\xda")]
    smallest = min((data[a:b] for a, b in zip(starts, [*starts[1:], end], strict=True)), key=len)
    return data[:end] + smallest * repeats + data[end:]


def test_ordinary_progressive_jpegs_decode() -> None:
    data = many_scan_jpeg(0)
    assert 5 <= imaging.jpeg_scan_count(data) <= imaging.MAX_JPEG_SCANS
    assert decode_image(data).width == 256


def test_a_jpeg_with_thousands_of_scans_is_refused_from_its_markers() -> None:
    """Thousands of scans in a few KB would each be a pass over the whole image; the count is read first."""
    data = many_scan_jpeg(5_000)
    assert len(data) < 256 * 1024
    assert imaging.jpeg_scan_count(data) > 5_000
    with no_pixel_decoding():
        for check in (decode_image, read_header):
            with pytest.raises(InvalidImageError, match=r"5,0\d\d progressive scans"):
                check(data)


def test_read_header_reports_what_decoding_will_produce(photo_path: Path) -> None:
    header = read_header(photo_path.read_bytes())
    picture = decode_image(photo_path.read_bytes())
    assert (header.pixels, header.channels, header.bit_depth) == (
        picture.width * picture.height,
        picture.channels,
        picture.bit_depth,
    )
    rgba16 = io.BytesIO()
    png.Writer(3, 2, greyscale=False, alpha=True, bitdepth=16).write(rgba16, [[0, 1, 2, 65535] * 3] * 2)
    assert (read_header(rgba16.getvalue()).channels, read_header(rgba16.getvalue()).bit_depth) == (4, 16)
    gray = encode_image(Picture(np.zeros((2, 3, 1), np.float32)), ImageFormat.PNG)
    assert read_header(gray).channels == 1


def test_max_pixels_is_the_callers_budget(photo_path: Path) -> None:
    data = photo_path.read_bytes()
    with pytest.raises(ImageTooLargeError, match="512x600"):
        decode_image(data, max_pixels=512 * 600 - 1)
    assert decode_image(data, max_pixels=512 * 600).width == 512


def test_the_pixel_budget_is_checked_on_the_header_only() -> None:
    # 5000 x 4000 declared, pixel data garbage: only a header reader can answer.
    with pytest.raises(ImageTooLargeError, match="5000x4000"):
        decode_image(crafted_png(5000, 4000, idat=b"junk"), max_pixels=5000 * 4000 - 1)


def test_read_image_file_errors_name_the_file(tmp_path: Path, clipart_path: Path) -> None:
    missing = tmp_path / "missing.png"
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for path, fragment in [
        (missing, "no such file"),
        (empty, "empty"),
        (tmp_path, "directory"),
        (text, "Not"),
    ]:
        with pytest.raises(InvalidImageError) as info:
            read_image_file(path)
        assert str(path) in info.value.message
        assert fragment in info.value.message
    with pytest.raises(ImageTooLargeError, match=str(clipart_path.name)):
        read_image_file(clipart_path, max_pixels=100)
    assert read_image_file(clipart_path).mode == "RGBA"


_SEEDS = {
    "png": pil_bytes(Image.fromarray(rgb8(12, 10, 4))),
    "jpeg": pil_bytes(Image.fromarray(rgb8(12, 10)), "JPEG"),
    "gif": pil_bytes(Image.fromarray(rgb8(12, 10)).convert("P"), "GIF"),
    "webp": pil_bytes(Image.fromarray(rgb8(12, 10)), "WEBP"),
    "bmp": pil_bytes(Image.fromarray(rgb8(12, 10)), "BMP"),
    "png16": png16_bytes(RNG.integers(0, 65536, (12, 10, 4), dtype=np.uint16)),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(sorted(_SEEDS)),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 10_000),
)
def test_mangled_images_only_raise_our_errors(seed: str, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(_SEEDS[seed])
    for pos, value in edits:
        data[pos % len(data)] = value
    data = data[: max(1, len(data) - cut % len(data))]
    try:
        picture = decode_image(bytes(data), max_pixels=1_000_000)
    except (InvalidImageError, ImageTooLargeError) as exc:
        assert "\n" not in exc.message
    else:
        assert picture.pixels.dtype == np.float32
        assert 0.0 <= picture.pixels.min() <= picture.pixels.max() <= 1.0


# -------------------------------------------------------------------------------------------------
# EXIF orientation


def test_jpeg_orientation_6_is_applied() -> None:
    image = Image.new("RGB", (64, 32), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 16, 16))  # red top-left corner as stored
    data = pil_bytes(image, "JPEG", quality=95, exif=exif_with_orientation(6))
    picture = decode_image(data)
    assert (picture.width, picture.height) == (32, 64)
    # Orientation 6 = rotate 90 degrees clockwise for display: the stored top-left is now top-right.
    np.testing.assert_allclose(picture.pixels[2, -3], [1.0, 0.0, 0.0], atol=0.03)
    np.testing.assert_allclose(picture.pixels[2, 2], [0.0, 0.0, 1.0], atol=0.03)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pillow_exif_transpose(orientation: int) -> None:
    data = pil_bytes(Image.fromarray(rgb8(5, 7)), exif=exif_with_orientation(orientation))
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    picture = decode_image(data)
    np.testing.assert_array_equal(encode_roundtrip_u8(picture), expected)


def test_16bit_png_orientation_from_exif_chunk() -> None:
    values = RNG.integers(0, 65536, (4, 6, 3), dtype=np.uint16)
    data = insert_after_ihdr(png16_bytes(values), png_chunk(b"eXIf", exif_with_orientation(6)))
    picture = decode_image(data)
    np.testing.assert_array_equal(to_u16(picture.pixels), np.rot90(values, -1))


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_does_not_break_decoding() -> None:
    data = pil_bytes(Image.new("RGB", (8, 4), "red"), "JPEG", exif=b"Exif\x00\x00MM\x00*garbage")
    assert decode_image(data).width == 8


def encode_roundtrip_u8(picture: Picture) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encode_image(picture, ImageFormat.PNG))))


def to_u16(pixels: np.ndarray) -> np.ndarray:
    return np.round(pixels.astype(np.float64) * 65535).astype(np.uint16)


def to_u8(pixels: np.ndarray) -> np.ndarray:
    return np.round(pixels.astype(np.float64) * 255).astype(np.uint8)


# -------------------------------------------------------------------------------------------------
# modes


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("LA", 2), ("RGB", 3), ("RGBA", 4)])
def test_8bit_png_modes_round_trip_exactly(mode: str, channels: int) -> None:
    values = rgb8(9, 11, channels)
    image = Image.fromarray(values[..., 0] if channels == 1 else values)
    picture = decode_image(pil_bytes(image))
    assert (picture.mode, picture.channels, picture.bit_depth) == (mode, channels, 8)
    assert picture.is_gray == (channels <= 2)
    assert picture.has_alpha == (channels in (2, 4))
    assert picture.pixels.flags.c_contiguous
    np.testing.assert_array_equal(to_u8(picture.pixels), values)
    out = Image.open(io.BytesIO(encode_image(picture, ImageFormat.PNG)))
    assert out.mode == mode
    np.testing.assert_array_equal(np.asarray(out).reshape(values.shape), values)


def test_palette_without_and_with_trns() -> None:
    palette_image = Image.new("P", (4, 2))
    palette_image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette_image.putdata([0, 1, 0, 1, 1, 0, 1, 0])
    plain = decode_image(pil_bytes(palette_image))
    assert plain.mode == "RGB"
    np.testing.assert_array_equal(to_u8(plain.pixels[0, :2]), [[255, 0, 0], [0, 255, 0]])
    transparent = decode_image(pil_bytes(palette_image, transparency=1))  # written as a tRNS chunk
    assert transparent.mode == "RGBA"
    np.testing.assert_array_equal(to_u8(transparent.pixels[0, :2, 3]), [255, 0])


def test_gray_and_rgb_with_trns_and_1bit() -> None:
    gray = Image.fromarray(np.array([[0, 10], [200, 0]], dtype=np.uint8))
    la = decode_image(pil_bytes(gray, transparency=0))
    assert la.mode == "LA"
    np.testing.assert_array_equal(to_u8(la.pixels[..., 1]), [[0, 255], [255, 0]])
    rgb = Image.new("RGB", (2, 1), (1, 2, 3))
    rgb.putpixel((1, 0), (9, 9, 9))
    rgba = decode_image(pil_bytes(rgb, transparency=(1, 2, 3)))
    np.testing.assert_array_equal(to_u8(rgba.pixels[0, :, 3]), [0, 255])
    bilevel = decode_image(pil_bytes(Image.new("1", (3, 3), 1)))
    assert bilevel.mode == "L"
    assert bilevel.pixels.min() == 1.0


def test_gif_transparency_and_first_frame_of_animations() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    gif = pil_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    picture = decode_image(gif)
    assert picture.source_format == "GIF"
    np.testing.assert_array_equal(to_u8(picture.pixels[0, 0]), [255, 0, 0])
    webp = pil_bytes(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    picture = decode_image(webp)
    assert picture.source_format == "WEBP"
    np.testing.assert_allclose(picture.pixels[4, 4], [1.0, 0.0, 0.0], atol=0.01)
    p_image = Image.new("P", (2, 2))
    p_image.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    p_image.putpixel((0, 0), 1)
    transparent = decode_image(pil_bytes(p_image, "GIF", transparency=0))
    assert transparent.mode == "RGBA"
    np.testing.assert_array_equal(to_u8(transparent.pixels[..., 3]), [[255, 0], [0, 0]])


def test_multi_picture_jpeg_is_reported_as_jpeg_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((0, 255, 0), (255, 0, 0))]
    data = pil_bytes(frames[0], "MPO", save_all=True, append_images=frames[1:], quality=95)
    assert Image.open(io.BytesIO(data)).format == "MPO"  # what Pillow calls a camera's multi-image JPEG
    picture = decode_image(data)
    assert picture.source_format == "JPEG"
    np.testing.assert_allclose(picture.pixels[4, 4], [0.0, 1.0, 0.0], atol=0.03)


def test_bmp_decodes() -> None:
    values = rgb8(5, 3)
    picture = decode_image(pil_bytes(Image.fromarray(values), "BMP"))
    assert picture.source_format == "BMP"
    np.testing.assert_array_equal(to_u8(picture.pixels), values)


def test_cmyk_jpeg_without_profile_uses_pillow_conversion() -> None:
    image = Image.new("CMYK", (8, 8), (0, 0, 0, 0))
    image.paste((255, 0, 0, 0), (0, 0, 4, 8))  # cyan left half
    picture = decode_image(pil_bytes(image, "JPEG", quality=95))
    assert (picture.mode, picture.icc_profile) == ("RGB", None)
    np.testing.assert_allclose(picture.pixels[4, 1], [0.0, 1.0, 1.0], atol=0.04)
    np.testing.assert_allclose(picture.pixels[4, 6], [1.0, 1.0, 1.0], atol=0.04)


def test_cmyk_jpeg_with_profile_converts_through_the_profile() -> None:
    profile = cmyk_profile_ignoring_cyan()
    image = Image.new("CMYK", (8, 8), (255, 0, 0, 0))  # pure cyan, which this profile ignores
    image.paste((0, 0, 0, 255), (0, 0, 8, 4))  # black top half
    picture = decode_image(pil_bytes(image, "JPEG", quality=95, icc_profile=profile))
    assert (picture.mode, picture.icc_profile) == ("RGB", None)
    assert picture.pixels[6, 4].min() > 0.9  # white, where Pillow's naive conversion gives cyan
    assert picture.pixels[1, 4].max() < 0.1


def test_16bit_gray_png_keeps_16_bits() -> None:
    values = RNG.integers(0, 65536, (6, 5), dtype=np.uint16)
    picture = decode_image(pil_bytes(Image.fromarray(values)))  # Pillow writes "I;16" as 16-bit gray
    assert (picture.mode, picture.bit_depth) == ("L", 16)
    np.testing.assert_array_equal(to_u16(picture.pixels[..., 0]), values)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_png_round_trips_with_identical_values(channels: int) -> None:
    values = RNG.integers(0, 65536, (7, 9, channels), dtype=np.uint16)
    picture = decode_image(png16_bytes(values))
    assert (picture.channels, picture.bit_depth) == (channels, 16)
    np.testing.assert_array_equal(to_u16(picture.pixels), values)
    encoded = encode_image(picture, ImageFormat.PNG)
    width, height, rows, info = png.Reader(bytes=encoded).read()
    assert (info["bitdepth"], info["planes"], width, height) == (16, channels, 9, 7)
    np.testing.assert_array_equal(np.array([list(r) for r in rows]).reshape(values.shape), values)
    np.testing.assert_array_equal(decode_image(encoded).pixels, picture.pixels)


def pypng_samples(data: bytes) -> np.ndarray:
    """What pypng (the pure-Python reference decoder) reads from a 16-bit PNG, as uint16 H x W x C."""
    width, height, rows, info = png.Reader(bytes=data).read()
    return np.vstack([np.frombuffer(row, dtype=np.uint16) for row in rows]).reshape(height, width, info["planes"])


def filtered_png16(values: np.ndarray, filter_type: int) -> bytes:
    """A 16-bit PNG whose rows all use ``filter_type`` (0..4), written here so every filter is exercised."""
    h, w, c = values.shape
    bpp = 2 * c
    raw = values.astype(">u2").reshape(h, w * c).view(np.uint8).astype(np.int64)
    rows = []
    previous = np.zeros(w * bpp, dtype=np.int64)
    for row in raw:
        out = np.empty_like(row)
        for i, x in enumerate(row):
            a = int(row[i - bpp]) if i >= bpp else 0
            b = int(previous[i])
            cc = int(previous[i - bpp]) if i >= bpp else 0
            if filter_type == 4:
                p = a + b - cc
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - cc)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else cc
            else:
                pred = (0, a, b, (a + b) // 2)[filter_type]
            out[i] = (x - pred) % 256
        rows.append(bytes([filter_type]) + out.astype(np.uint8).tobytes())
        previous = row
    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    gama = png_chunk(b"gAMA", struct.pack(">I", 100000))  # gamma 1.0 declared: must not change the samples
    idat = png_chunk(b"IDAT", zlib.compress(b"".join(rows)))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + gama + idat + png_chunk(b"IEND", b"")


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("filter_type", [0, 1, 2, 3, 4])
def test_16bit_png_samples_equal_pypngs(channels: int, filter_type: int) -> None:
    """The compiled 16-bit decoder gives pypng's values exactly: gray, gray+alpha, RGB and RGBA, every row
    filter, and a gAMA chunk ignored by both."""
    values = RNG.integers(0, 65536, (6, 7, channels), dtype=np.uint16)
    values[2:4] = values[1:2]  # runs of equal rows and pixels, where the filters predict well
    data = filtered_png16(values, filter_type)
    reference = pypng_samples(data)
    np.testing.assert_array_equal(reference, values)
    picture = decode_image(data)
    assert (picture.channels, picture.bit_depth) == (channels, 16)
    np.testing.assert_array_equal(to_u16(picture.pixels), reference)


def test_16bit_interlaced_and_trns() -> None:
    values = RNG.integers(0, 65536, (9, 10, 3), dtype=np.uint16)
    values[0, 0] = (1, 2, 3)
    interlaced = decode_image(png16_bytes(values, interlace=True))
    np.testing.assert_array_equal(to_u16(interlaced.pixels), values)
    keyed = decode_image(png16_bytes(values, transparent=(1, 2, 3)))
    assert keyed.mode == "RGBA"
    assert keyed.pixels[0, 0, 3] == 0.0
    assert (keyed.pixels[..., 3] == 1.0).sum() == 89


def test_every_16bit_value_survives_float_and_back() -> None:
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256, 1)
    picture = decode_image(pil_bytes(Image.fromarray(values[..., 0])))
    out = Image.open(io.BytesIO(encode_image(picture, ImageFormat.PNG)))
    assert out.mode in ("I;16", "I")
    np.testing.assert_array_equal(np.asarray(out), values[..., 0])


# -------------------------------------------------------------------------------------------------
# real files, ICC, encoding rules


def test_real_clipart_and_photo_round_trip_through_png(photo_path: Path, clipart_path: Path) -> None:
    for path, mode in [(clipart_path, "RGBA"), (photo_path, "RGB")]:
        picture = read_image_file(path)
        assert picture.mode == mode
        reference = np.asarray(Image.open(path).convert(mode))
        np.testing.assert_array_equal(to_u8(picture.pixels), reference)
        again = decode_image(encode_image(picture, ImageFormat.PNG))
        np.testing.assert_array_equal(again.pixels, picture.pixels)


@pytest.mark.parametrize(
    ("fmt", "channels", "bit_depth"),
    [
        ("PNG", 3, 8),
        ("PNG", 4, 16),
        ("PNG", 1, 16),
        ("PNG", 2, 8),
        ("JPG", 3, 8),
        ("JPG", 4, 16),
        ("WEBP", 4, 8),
    ],
)
def test_icc_profile_is_carried(fmt: str, channels: int, bit_depth: int) -> None:
    gray = channels <= 2
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes() if gray else SRGB_ICC
    if gray:  # a GRAY profile: patch the colour-space field of a real profile, enough for carrying
        icc = icc[:16] + b"GRAY" + icc[20:]
    picture = Picture(RNG.random((6, 5, channels), dtype=np.float32), bit_depth, icc, "PNG")
    out = Image.open(io.BytesIO(encode_image(picture, ImageFormat(fmt))))
    assert out.info.get("icc_profile") == icc
    assert decode_image(encode_image(picture, ImageFormat(fmt))).icc_profile == icc


def test_icc_profile_is_read_from_png_and_mismatched_ones_dropped() -> None:
    rgb = decode_image(pil_bytes(Image.new("RGB", (3, 3)), icc_profile=SRGB_ICC))
    assert rgb.icc_profile == SRGB_ICC
    gray = decode_image(pil_bytes(Image.new("L", (3, 3)), icc_profile=SRGB_ICC))
    assert gray.icc_profile is None
    values16 = RNG.integers(0, 65536, (3, 3, 3), dtype=np.uint16)
    iccp = png_chunk(b"iCCP", b"p\x00\x00" + zlib.compress(SRGB_ICC))
    assert decode_image(insert_after_ihdr(png16_bytes(values16), iccp)).icc_profile == SRGB_ICC


def test_jpeg_flattens_alpha_onto_the_background_and_keeps_gray() -> None:
    pixels = np.zeros((16, 16, 4), dtype=np.float32)
    pixels[:, :8] = (1.0, 0.0, 0.0, 1.0)  # opaque red left, fully transparent black right
    picture = Picture(pixels)
    white = np.asarray(Image.open(io.BytesIO(encode_image(picture, ImageFormat.JPG)))) / 255
    np.testing.assert_allclose(white[8, 2], [1, 0, 0], atol=0.03)
    np.testing.assert_allclose(white[8, 13], [1, 1, 1], atol=0.03)
    green = Image.open(io.BytesIO(encode_image(picture, ImageFormat.JPG, background=(0.0, 1.0, 0.0))))
    np.testing.assert_allclose(np.asarray(green)[8, 13] / 255, [0, 1, 0], atol=0.03)
    gray = Picture(np.full((8, 8, 2), 0.5, dtype=np.float32))
    out = Image.open(io.BytesIO(encode_image(gray, ImageFormat.JPG)))
    assert out.mode == "L"
    assert abs(np.asarray(out).mean() - 191) <= 1  # 0.5 over white: 0.75 -> 191


def test_jpeg_subsampling_and_quality() -> None:
    picture = Picture(RNG.random((32, 32, 3), dtype=np.float32))
    high = Image.open(io.BytesIO(encode_image(picture, ImageFormat.JPG, quality=95)))
    low = Image.open(io.BytesIO(encode_image(picture, ImageFormat.JPG, quality=70)))
    assert isinstance(high, JpegImagePlugin.JpegImageFile)
    assert isinstance(low, JpegImagePlugin.JpegImageFile)
    assert JpegImagePlugin.get_sampling(high) == 0  # 4:4:4
    assert JpegImagePlugin.get_sampling(low) == 2  # 4:2:0
    with pytest.raises(ValueError):
        encode_image(picture, ImageFormat.JPG, quality=0)


def test_webp_keeps_alpha_and_widens_gray() -> None:
    pixels = np.zeros((8, 8, 4), dtype=np.float32)
    pixels[..., 3] = 1.0
    pixels[:4, :, 3] = 0.0
    rgba = Image.open(io.BytesIO(encode_image(Picture(pixels), ImageFormat.WEBP)))
    assert rgba.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(rgba)[:, 0, 3], [0] * 4 + [255] * 4)
    gray = decode_image(encode_image(Picture(np.full((8, 8, 1), 0.25, dtype=np.float32)), "WEBP"))
    assert gray.mode == "RGB"
    np.testing.assert_allclose(gray.pixels, 0.25, atol=0.02)


def test_output_size_limits_are_clear_errors() -> None:
    wide = Picture(np.zeros((1, 16_384, 3), dtype=np.float32))
    with pytest.raises(ImageTooLargeError, match="WEBP") as info:
        encode_image(wide, ImageFormat.WEBP)
    assert info.value.parameter == "outputFormat"
    assert len(encode_image(wide, ImageFormat.PNG)) > 0


def test_quantisation_rounds_half_up_clips_and_survives_nan() -> None:
    values = np.array([0.49 / 255, 0.51 / 255, 254.5 / 255, -0.2, 1.7, np.nan], dtype=np.float32)
    picture = Picture(values.reshape(1, 6, 1))
    out = np.asarray(Image.open(io.BytesIO(encode_image(picture, ImageFormat.PNG))))
    np.testing.assert_array_equal(out[0], [0, 1, 255, 0, 255, 0])


def test_picture_validates_its_contract() -> None:
    with pytest.raises(ValueError):
        Picture(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError):
        Picture(np.zeros((4, 4, 5), dtype=np.float32))
    with pytest.raises(ValueError):
        Picture(np.zeros((4, 4, 3), dtype=np.float32), bit_depth=12)
    coerced = Picture(np.zeros((3, 4, 3))[:, ::-1])  # type: ignore[arg-type]  # float64 on purpose
    assert coerced.pixels.dtype == np.float32
    assert coerced.pixels.flags.c_contiguous
    assert (coerced.width, coerced.height, coerced.mode) == (4, 3, "RGB")


# -------------------------------------------------------------------------------------------------
# pixel helpers


def test_flatten_alpha() -> None:
    rgba = np.array([[[1.0, 0.0, 0.0, 0.5], [0.2, 0.4, 0.6, 1.0]]], dtype=np.float32)
    np.testing.assert_allclose(flatten_alpha(rgba, (0.0, 0.0, 1.0)), [[[0.5, 0.0, 0.5], [0.2, 0.4, 0.6]]])
    la = np.array([[[0.0, 0.25]]], dtype=np.float32)
    np.testing.assert_allclose(flatten_alpha(la, (1.0, 1.0, 1.0)), [[[0.75]]], rtol=1e-6)
    rgb = np.ones((2, 2, 3), dtype=np.float32)
    assert flatten_alpha(rgb, (0.0, 0.0, 0.0)).shape == (2, 2, 3)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [(37, 23), (5, 4), (200, 90), (1, 1)])
def test_resize_exact_size_and_constant_preserved(channels: int, size: tuple[int, int]) -> None:
    constant = np.full((40, 30, channels), 0.3, dtype=np.float32)
    if channels in (2, 4):
        constant[..., -1] = 0.0 if size == (5, 4) else 0.6  # fully transparent is still "constant"
    out = resize_pixels(constant, *size)
    assert out.shape == (size[1], size[0], channels)
    assert out.dtype == np.float32
    assert out.flags.c_contiguous
    np.testing.assert_allclose(out, np.broadcast_to(constant[0, 0], out.shape), atol=1e-5)


def test_resize_is_premultiplied_so_hidden_colour_does_not_fringe() -> None:
    pixels = np.zeros((16, 16, 4), dtype=np.float32)
    pixels[:, :8] = (1.0, 1.0, 1.0, 1.0)  # opaque white left; transparent *black* right
    out = resize_pixels(pixels, 6, 6)
    visible = out[..., 3] > 0.05
    assert visible.any()
    np.testing.assert_allclose(out[visible][:, :3], 1.0, atol=1e-4)  # no gray fringe at the edge
    smooth = np.linspace(0, 1, 64, dtype=np.float32)[None, :, None].repeat(8, axis=0)
    np.testing.assert_allclose(resize_pixels(smooth, 32, 4)[..., 0].mean(axis=0), np.linspace(0, 1, 32), atol=0.02)


def test_bleed_fills_transparent_pixels_from_visible_neighbours(clipart_path: Path) -> None:
    picture = read_image_file(clipart_path)
    rgb, alpha = picture.pixels[..., :3], picture.pixels[..., 3]
    hidden = alpha == 0
    assert hidden.any()
    assert (~hidden).any()
    bled = bleed_transparent_colors(rgb, alpha)
    assert bled.shape == rgb.shape
    assert bled.dtype == np.float32
    np.testing.assert_array_equal(bled[alpha >= 2 / 255], rgb[alpha >= 2 / 255])
    # Each hidden pixel touching a visible one should now look like its visible neighbours.
    visible = ~hidden
    padded_vis = np.pad(visible, 1)
    padded_rgb = np.pad(rgb, ((1, 1), (1, 1), (0, 0)))
    sums = np.zeros_like(rgb)
    counts = np.zeros(alpha.shape, dtype=np.float32)
    h, w = alpha.shape
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            vis = padded_vis[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
            sums += padded_rgb[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] * vis[..., None]
            counts += vis
    edge = hidden & (counts > 0)
    assert edge.sum() > 10
    neighbour_mean = sums[edge] / counts[edge][:, None]
    error = np.abs(bled[edge] - neighbour_mean).mean()
    before = np.abs(rgb[edge] - neighbour_mean).mean()
    assert error < 0.1
    assert error < before / 2 or before < 0.1


def test_bleed_synthetic_cases() -> None:
    rgb = np.zeros((9, 13, 3), dtype=np.float32)
    alpha = np.zeros((9, 13), dtype=np.float32)
    rgb[:, :4] = (0.2, 0.6, 0.9)
    alpha[:, :4] = 1.0
    bled = bleed_transparent_colors(rgb, alpha)
    np.testing.assert_allclose(bled, np.broadcast_to([0.2, 0.6, 0.9], rgb.shape), atol=1e-6)
    np.testing.assert_array_equal(bleed_transparent_colors(rgb, np.zeros_like(alpha)), rgb)
    np.testing.assert_array_equal(bleed_transparent_colors(rgb, np.ones_like(alpha)), rgb)


def test_bleed_cost_does_not_grow_with_the_width_of_the_holes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A push-pull pyramid: each level halves the image, so a 1024x1024 image with a 200 px visible patch
    in a sea of transparency takes at most log2(1024) levels (repeated dilation would take ~400 passes)."""
    rgb = RNG.random((1024, 1024, 3), dtype=np.float32)
    alpha = np.zeros((1024, 1024), dtype=np.float32)
    alpha[400:600, 300:500] = 1.0
    halved: list[tuple[int, ...]] = []
    real_sum = imaging._sum_2x2

    def counted(values: np.ndarray) -> np.ndarray:
        halved.append(values.shape[:2])
        return real_sum(values)

    monkeypatch.setattr(imaging, "_sum_2x2", counted)
    bled = bleed_transparent_colors(rgb, alpha)
    assert np.isfinite(bled).all()
    levels = halved[::2]  # colour and weight are halved together
    assert 0 < len(levels) <= 10 and levels[0] == (1024, 1024)
    assert all(b == (a[0] // 2, a[1] // 2) for a, b in itertools.pairwise(levels))


# -------------------------------------------------------------------------------------------------
# the PNG writer: Average filter, blocks, stripes deflated in parallel


def idat_stream(data: bytes) -> bytes:
    """The concatenated IDAT payload of a PNG: one zlib stream (its Adler-32 is checked by decompress)."""
    pos, out = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IDAT":
            out += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return out


def pillow_png_values(picture: Picture) -> np.ndarray:
    """What the former writer (Pillow, 8-bit) stored: the reference the new writer must match exactly."""
    scaled = np.fmin(np.fmax(picture.pixels * np.float32(255) + np.float32(0.5), 0.0), 255.0).astype(np.uint8)
    return np.asarray(
        Image.open(io.BytesIO(pil_bytes(Image.fromarray(scaled[..., 0] if scaled.shape[2] == 1 else scaled))))
    )


def test_adler32_combine_matches_zlib() -> None:
    for first_size, second_size in [(0, 0), (1, 0), (0, 7), (5552, 65521), (100_000, 300_001)]:
        first, second = RNG.bytes(first_size), RNG.bytes(second_size)
        combined = imaging._adler32_combine(zlib.adler32(first), zlib.adler32(second), len(second))
        assert combined == zlib.adler32(first + second)


@pytest.mark.parametrize("bit_depth", [8, 16])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_striped_png_is_one_valid_stream_with_the_same_pixels(
    monkeypatch: pytest.MonkeyPatch, channels: int, bit_depth: int
) -> None:
    monkeypatch.setattr(imaging, "usable_cores", lambda: 5)  # several stripes on any machine
    monkeypatch.setattr(imaging, "_PNG_STRIPE_MIN_BYTES", 64)
    monkeypatch.setattr(imaging, "_BLOCK_SAMPLES", 100)  # several blocks per stripe, too
    pixels = RNG.random((37, 23, channels), dtype=np.float32)
    pixels[0, 0, 0] = np.nan
    picture = Picture(pixels, bit_depth=bit_depth)
    with ThreadPoolExecutor(2) as pool:
        striped = encode_image(picture, ImageFormat.PNG, executor=pool)
    single = encode_image(picture, ImageFormat.PNG)
    assert zlib.decompress(idat_stream(striped)) == zlib.decompress(idat_stream(single))  # same filtered rows
    np.testing.assert_array_equal(decode_image(striped).pixels, decode_image(single).pixels)
    if bit_depth == 8:
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(striped))), pillow_png_values(picture))


def test_png_of_a_real_output_matches_pillow_pixels_and_size(photo_path: Path) -> None:
    photo = read_image_file(photo_path)
    picture = Picture(resize_pixels(photo.pixels[:128, :128], 512, 512))  # smooth, like an upscaled output
    ours = encode_image(picture, ImageFormat.PNG)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(ours))), pillow_png_values(picture))
    values = np.asarray(Image.open(io.BytesIO(ours)))
    pillow_level1 = pil_bytes(Image.fromarray(values), compress_level=1)
    assert len(ours) <= 1.1 * len(pillow_level1)  # a fixed filter, but no worse than Pillow's adaptive choice


def test_striping_inside_the_pool_it_uses_cannot_deadlock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The codec pool encodes on its own threads: stripes that find no idle thread run on the caller."""
    monkeypatch.setattr(imaging, "usable_cores", lambda: 4)
    monkeypatch.setattr(imaging, "_PNG_STRIPE_MIN_BYTES", 64)
    picture = Picture(RNG.random((40, 30, 3), dtype=np.float32))
    expected = decode_image(encode_image(picture, ImageFormat.PNG)).pixels
    with ThreadPoolExecutor(1) as pool:  # its only thread is the one encoding
        data = pool.submit(encode_image, picture, "PNG", executor=pool).result(timeout=30)
    np.testing.assert_array_equal(decode_image(data).pixels, expected)
    pool.shutdown()
    np.testing.assert_array_equal(decode_image(encode_image(picture, ImageFormat.PNG, executor=pool)).pixels, expected)


@pytest.mark.parametrize(
    ("mode", "size", "options"),
    [
        ("RGB", (300, 200), {"lossless": True}),  # VP8L
        ("RGBA", (301, 17), {"lossless": True}),  # VP8L with alpha
        ("RGB", (640, 480), {"quality": 80}),  # VP8
        ("RGBA", (64, 33), {"quality": 80}),  # VP8X with an alpha chunk
    ],
)
def test_webp_headers_are_read_without_opening_the_file_in_pillow(
    mode: str, size: tuple[int, int], options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow opens a WebP through libwebp's animation decoder, which allocates two full-size canvases
    at once: a 34-byte file claiming 8192 x 8192 costs 0.5 GB. The size is read from the first chunk."""
    buffer = io.BytesIO()
    Image.new(mode, size, (10, 20, 30, 128)[: len(mode)]).save(buffer, "WEBP", **options)
    data = buffer.getvalue()
    expected = decode_image(data)

    def refuse(data: bytes) -> None:
        raise AssertionError("the file was opened in Pillow")

    monkeypatch.setattr(imaging, "_open", refuse)
    header = read_header(data)
    assert (header.width, header.height, header.channels, header.source_format) == (
        expected.width,
        expected.height,
        expected.channels,
        "WEBP",
    )
    with pytest.raises(ImageTooLargeError):  # decoding checks the size before Pillow opens the file
        decode_image(data, max_pixels=size[0] * size[1] - 1)
