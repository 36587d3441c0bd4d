"""Image decoding, encoding and pixel-format rules: bytes in, one float form inside, bytes out.

Everything the pipeline sees is a :class:`Picture`: float32 ``H x W x C`` in ``[0, 1]`` with straight
(not premultiplied) alpha, C = 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA). Gray stays gray and alpha stays
alpha so the pipeline can decide how to treat them (other upscalers silently drop alpha or turn gray
into RGB). What is deliberately *not* carried: EXIF (orientation is applied to the pixels, so
keeping the tag would rotate twice), text chunks, gamma chunks (Pillow ignores ``gAMA`` too, so both
decoders agree) and animation (first frame only).

Untrusted bytes only ever produce :class:`InvalidImageError` or :class:`ImageTooLargeError`; the pixel
budget and the JPEG scan count are checked on the header before anything is decoded (decompression
bombs, files that cost seconds per kilobyte).

No torch and no FastAPI here: the module is shared by the CLI, the server and the tests.
"""

from __future__ import annotations

import functools
import io
import itertools
import logging
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt
from imagecodecs import png_decode  # libpng: 16-bit RGB/RGBA/LA PNGs with all bits (Pillow keeps the high byte)
from PIL import Image, ImageCms, UnidentifiedImageError

from upscale_server.errors import ImageTooLargeError, InvalidImageError, UpscaleError
from upscale_server.vocabulary import ImageFormat, usable_cores

logger = logging.getLogger(__name__)

T = TypeVar("T")

FloatArray = npt.NDArray[np.float32]

# TIFF is left out on purpose: Runware accepts jpeg/png/webp/bmp/gif only; TIFF is by
# far the largest parser surface in Pillow (libtiff, a dozen codecs, BigTIFF, multi-page, LAB/float
# modes); and Pillow truncates 16-bit RGB TIFFs to 8 bits anyway, so allowing it would buy no fidelity.
ALLOWED_INPUT_FORMATS: Final[tuple[str, ...]] = ("JPEG", "PNG", "WEBP", "BMP", "GIF")

DEFAULT_MAX_PIXELS: Final = 64 * 2**20

# A progressive JPEG is decoded scan by scan, each a pass over the whole image's coefficients: about
# 1 ms per scan and megapixel here, so a 40 KB file with 1,000 scans of 4 MP costs 4 s and one of
# 5,000 scans half a minute. Encoders write about 10 scans (libjpeg's default script), rarely more
# than 20; this bound keeps the worst file at the largest allowed size to seconds.
MAX_JPEG_SCANS: Final = 64

# PNGs are written here, not by Pillow: every row gets the Average filter (computed in numpy) and
# zlib level 1. Pillow tries several filters per row and keeps the best, which costs more than the
# deflate itself: on a 1024x1024 RGB network output this writer takes ~50 ms on one thread against
# Pillow's ~100 ms at level 1 (and ~350 ms at its default 6), for files of about the same size (within a
# few %; upscaled outputs come out smaller). Given an executor, horizontal stripes are deflated in
# parallel (as pigz does). For big outputs the encode, not the network, limits throughput.
_PNG_COMPRESS_LEVEL: Final = 1
_ZLIB_HEADER: Final = b"\x78\x01"  # deflate, 32 KiB window, "fastest" (what zlib writes for level 1)
# A stripe restarts the compressor's 32 KiB history, so stripes below this many raw bytes cost size
# for little speed.
_PNG_STRIPE_MIN_BYTES: Final = 1 << 20
# Encoding works through blocks of rows of about this many samples: cache-sized, and no full-size
# temporary (a float copy, a whole filtered image) is ever allocated.
_BLOCK_SAMPLES: Final = 1 << 19
_PNG_COLOUR_TYPES: Final[dict[int, int]] = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type
_PNG_FILTER_AVERAGE: Final = 3
_ADLER_MOD: Final = 65521

# Hard per-side limits of the output codecs; checked up front so the caller gets a clear error
# instead of an opaque "encoder error -2" from Pillow.
_MAX_SIDE: Final[dict[ImageFormat, int]] = {
    ImageFormat.PNG: 2**31 - 1,
    ImageFormat.JPG: 65_535,
    ImageFormat.WEBP: 16_383,
}

# Pixels whose alpha is below this are treated as invisible by bleed_transparent_colors: 8-bit alpha
# values 0 and 1 carry colours that encoders and editors leave as junk (often black).
_BLEED_MIN_ALPHA: Final = 1.5 / 255.0

# Below this resampled alpha, un-premultiplying is numerically meaningless (ringing / tiny alpha), so
# resize_pixels takes the colour from a straight resample there instead.
_UNPREMULTIPLY_MIN_ALPHA: Final = 1.0 / 1024.0

_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION_TAG: Final = 0x0112

_MODES: Final[dict[int, str]] = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}

# Signatures of formats people commonly send by mistake, only to make the error message useful.
# Pillow itself is never asked to parse them (``formats=`` keeps its other plugins out of reach).
_KNOWN_SIGNATURES: Final[tuple[tuple[bytes, str], ...]] = (
    (b"%PDF", "PDF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"PK\x03\x04", "ZIP"),
    (b"\x1f\x8b", "gzip"),
)


@dataclass(frozen=True, eq=False)
class Picture:
    """A decoded image in the one internal form the pipeline works with.

    ``pixels`` is float32, ``H x W x C``, C-contiguous, values in ``[0, 1]``, alpha straight (not
    premultiplied). ``bit_depth`` (8 or 16) is the precision of the source, kept for the output where
    the format allows. ``icc_profile`` is carried to the output unchanged; it is None when the source
    had none, when it did not match the pixels' colour space, or when a CMYK source was converted to
    sRGB. ``source_format`` is Pillow's name for the input format ("PNG", "JPEG", ...).

    Construction coerces ``pixels`` to float32 C-contiguous (a no-op for conforming arrays) and rejects
    shapes the rest of the code cannot handle, so a bad array fails here and not deep in an encoder.
    """

    pixels: FloatArray
    bit_depth: int = 8
    icc_profile: bytes | None = None
    source_format: str = "PNG"

    def __post_init__(self) -> None:
        pixels = np.ascontiguousarray(self.pixels, dtype=np.float32)
        if pixels.ndim != 3 or pixels.shape[2] not in _MODES or 0 in pixels.shape[:2]:
            raise ValueError(f"pixels must be H x W x C with C in 1..4 and H, W > 0; got {pixels.shape}")
        if self.bit_depth not in (8, 16):
            raise ValueError(f"bit_depth must be 8 or 16, got {self.bit_depth}")
        object.__setattr__(self, "pixels", pixels)

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[2])

    @property
    def has_alpha(self) -> bool:
        return self.channels in (2, 4)

    @property
    def is_gray(self) -> bool:
        return self.channels in (1, 2)

    @property
    def mode(self) -> str:
        """The Pillow mode name of the channel layout: "L", "LA", "RGB" or "RGBA"."""
        return _MODES[self.channels]


# --------------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What an image's header says it will cost, read without decoding any pixel.

    ``width`` x ``height`` as stored (before EXIF orientation, which does not change the cost);
    ``channels`` and ``bit_depth`` those of the :class:`Picture` it decodes to.
    """

    width: int
    height: int
    channels: int
    bit_depth: int
    source_format: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """The header of untrusted bytes, with every check :func:`decode_image` makes before decoding
    (pixel count, JPEG scan count, format), so a file refused here is refused without any pixel work."""
    webp = webp_canvas(data)
    if webp is not None:  # Pillow's WebP reader allocates two canvases when it opens the file
        width, height, alpha = webp
        _check_pixels(width, height, max_pixels)
        return ImageHeader(width, height, 4 if alpha else 3, 8, "WEBP")
    with _open(data) as image:
        _check_cost(image, data, max_pixels)
        ihdr = _png_ihdr(data) if image.format == "PNG" else None
        bit_depth = 16 if (ihdr is not None and ihdr[2] == 16) or image.mode.startswith("I") else 8
        if image.mode.startswith("I"):  # 16-bit gray, with an alpha channel for a tRNS value
            channels = 2 if "transparency" in image.info else 1
        else:
            channels = len(_target_mode(image) or "RGBA")
        source_format = "JPEG" if image.format == "MPO" else str(image.format)
        return ImageHeader(image.width, image.height, channels, bit_depth, source_format)


def _check_cost(image: Image.Image, data: bytes, max_pixels: int) -> None:
    """Refuse from the header what would cost too much to decode: too many pixels, too many JPEG scans."""
    _check_pixels(*image.size, max_pixels)
    if image.format in ("JPEG", "MPO"):
        scans = jpeg_scan_count(data)
        if scans > MAX_JPEG_SCANS:
            raise InvalidImageError(
                f"The JPEG has {scans:,} progressive scans; this server decodes at most {MAX_JPEG_SCANS} "
                "(ordinary encoders write about 10). Re-save it as a baseline or ordinary progressive JPEG."
            )


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"Image is {width}x{height} ({width * height:,} pixels); the limit is {max_pixels:,} pixels."
        )


def webp_canvas(data: bytes) -> tuple[int, int, bool] | None:
    """(width, height, has alpha) from a WebP file's first chunk, or None when ``data`` is not one we can
    read so. Pillow opens a WebP through libwebp's animation decoder, which allocates (and, with the
    allocator tuned for tensors, touches) two RGBA canvases of the full size: 0.5 GB for a 34-byte file
    claiming 8192 x 8192, before any size check could run."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk, payload = data[12:16], data[20:30]
    if chunk == b"VP8X":  # extended: 24-bit canvas size minus one, alpha flag
        width = int.from_bytes(payload[4:7], "little") + 1
        height = int.from_bytes(payload[7:10], "little") + 1
        return width, height, bool(payload[0] & 0x10)
    if chunk == b"VP8L" and payload[0] == 0x2F:  # lossless: 14-bit sizes minus one, alpha hint
        bits = int.from_bytes(payload[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, bool(bits >> 28 & 1)
    if chunk == b"VP8 " and payload[3:6] == b"\x9d\x01\x2a":  # lossy key frame: 14-bit sizes, no alpha
        width = int.from_bytes(payload[6:8], "little") & 0x3FFF
        height = int.from_bytes(payload[8:10], "little") & 0x3FFF
        return width, height, False
    return None


def jpeg_scan_count(data: bytes) -> int:
    """Start-of-scan markers in a JPEG. Segments are walked by their lengths up to the first scan; after
    it, entropy-coded data escapes every 0xFF byte (0xFF 0x00, or a restart marker), so any 0xFF 0xDA
    there is a real marker. Counts the scans of every frame in the file (an MPO's too)."""
    pos = 2  # after SOI
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return 0  # not a marker where one must be: the decoder will say what is wrong
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:
            return 1 + data.count(b"\xff\xda", pos + 2)
        if marker in (0x01, *range(0xD0, 0xD8)):  # no length field
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return 0


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1..8) decoding applies to ``data``: 1 when it has none."""
    with _open(data) as image:
        return _png_orientation(data) if image.format == "PNG" else _orientation(image)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Picture:
    """Decode untrusted bytes into a :class:`Picture` (first frame, EXIF orientation applied).

    Raises :class:`ImageTooLargeError` when the header declares more than ``max_pixels`` pixels,
    before any pixel data is decoded, :class:`InvalidImageError` for anything unreadable and for a
    JPEG with more than :data:`MAX_JPEG_SCANS` scans (seconds of work per few KB).
    """
    webp = webp_canvas(data)
    if webp is not None:  # before Pillow opens it: its reader allocates the canvas at once
        _check_pixels(webp[0], webp[1], max_pixels)
    with _open(data) as image:
        _check_cost(image, data, max_pixels)
        source_format = "JPEG" if image.format == "MPO" else str(image.format)
        try:
            ihdr = _png_ihdr(data) if image.format == "PNG" else None
            if ihdr is not None and ihdr[2] == 16 and ihdr[3] in (2, 4, 6):
                # Pillow keeps only the high byte of 16-bit colour PNGs; libpng keeps all 16 bits.
                values, bit_depth = _read_png16(data), 16
                orientation = _png_orientation(data)
                icc = image.info.get("icc_profile")
            else:
                image.load()
                orientation = _orientation(image)
                values, bit_depth, icc = _to_array(image)
            icc = _matching_icc(icc, gray=values.shape[2] <= 2)
        except UpscaleError:
            raise
        except Exception as exc:  # untrusted input: any parser failure means "bad image", not a crash
            raise _invalid(exc) from exc
    scale = np.float32(1.0 / (2**bit_depth - 1))
    pixels = np.multiply(_orient(values, orientation), scale, dtype=np.float32)
    return Picture(pixels, bit_depth=bit_depth, icc_profile=icc, source_format=source_format)


def read_image_file(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Picture:
    """Read and decode an image file; every failure names the file in a one-line message."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise InvalidImageError(f"{path}: no such file.") from exc
    except IsADirectoryError as exc:
        raise InvalidImageError(f"{path}: is a directory, not an image file.") from exc
    except OSError as exc:
        raise InvalidImageError(f"{path}: cannot be read ({exc.strerror or exc}).") from exc
    try:
        return decode_image(data, max_pixels=max_pixels)
    except UpscaleError as exc:
        raise type(exc)(f"{path}: {exc.message}", parameter=exc.parameter) from exc


class _OpenImage:
    """Context manager around ``Image.open`` that turns every failure into our error types."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._image: Image.Image | None = None

    def __enter__(self) -> Image.Image:
        data = self._data
        if not data:
            raise InvalidImageError("The image is empty (0 bytes).")
        try:
            # formats= keeps every other Pillow plugin (and its parser bugs) out of reach.
            self._image = Image.open(io.BytesIO(data), formats=ALLOWED_INPUT_FORMATS)
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(f"Image refused by the decoder's size limit: {exc}") from exc
        except UnidentifiedImageError as exc:
            raise InvalidImageError(_unsupported_message(data)) from exc
        except Exception as exc:  # a header that matches a plugin but is corrupt
            raise _invalid(exc) from exc
        return self._image

    def __exit__(self, *exc_info: object) -> None:
        if self._image is not None:
            self._image.close()


def _open(data: bytes) -> _OpenImage:
    return _OpenImage(data)


def _unsupported_message(data: bytes) -> str:
    accepted = ", ".join(ALLOWED_INPUT_FORMATS)
    head = data[:512].lstrip()
    name = next((name for sig, name in _KNOWN_SIGNATURES if data.startswith(sig)), None)
    if name is None and data[4:8] == b"ftyp":
        name = "HEIF/AVIF" if data[8:12] in (b"heic", b"heix", b"mif1", b"avif", b"msf1") else "MP4/ISO media"
    if name is None and (head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head)):
        name = "SVG"
    if name is not None:
        return f"Unsupported image format ({name}); accepted formats are {accepted}."
    return f"Not a recognised image (accepted formats are {accepted})."


def _invalid(exc: BaseException) -> InvalidImageError:
    """One-line message for a decoder failure; the original exception stays chained for the logs."""
    if isinstance(exc, MemoryError):
        return InvalidImageError("The image could not be decoded: out of memory.")
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if "truncated" in detail.lower() or isinstance(exc, EOFError):
        return InvalidImageError(f"The image file is truncated or incomplete ({detail[:200]}).")
    return InvalidImageError(f"The image is corrupt or cannot be decoded ({detail[:200]}).")


def _orientation(image: Image.Image) -> int:
    """EXIF orientation 1..8; a broken EXIF block means "no rotation", never a failed decode."""
    try:
        value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF is common in the wild and does not make the pixels bad
        logger.debug("ignoring unreadable EXIF", exc_info=True)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _orient(values: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to an H x W x C array, matching ``ImageOps.exif_transpose``.

    Done in numpy rather than with Pillow so the 16-bit PNG path (decoded by libpng) and the Pillow
    path share one table; the tests check it against ``exif_transpose`` for all eight values.
    """
    if orientation == 2:
        values = values[:, ::-1]
    elif orientation == 3:
        values = values[::-1, ::-1]
    elif orientation == 4:
        values = values[::-1]
    elif orientation == 5:
        values = values.transpose(1, 0, 2)
    elif orientation == 6:
        values = np.rot90(values, -1)
    elif orientation == 7:
        values = values[::-1, ::-1].transpose(1, 0, 2)
    elif orientation == 8:
        values = np.rot90(values, 1)
    return values


def _to_array(image: Image.Image) -> tuple[np.ndarray, int, object]:
    """Convert a loaded Pillow image to an integer H x W x C array, its bit depth and its ICC profile.

    A CMYK image is converted to sRGB (through its profile when it has one), so it comes back with
    no profile.
    """
    icc = image.info.get("icc_profile")
    mode = image.mode
    transparent = "transparency" in image.info
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit gray PNG. "I" (32-bit) only arises from older decoders; values are 16-bit there too.
        gray = np.asarray(image)
        values = np.clip(gray, 0, 65535).astype(np.uint16) if mode == "I" else gray.astype(np.uint16)
        if transparent and isinstance(image.info["transparency"], int):
            alpha = np.where(values == image.info["transparency"], 0, 65535).astype(np.uint16)
            return np.stack([values, alpha], axis=-1), 16, icc
        return values[..., None], 16, icc
    if mode == "CMYK":
        return np.asarray(_cmyk_to_rgb(image)), 8, None
    target = _target_mode(image)
    if target is None:
        raise InvalidImageError(f"Unsupported pixel format {mode!r} in a {image.format} image.")
    converted = image if target == mode else image.convert(target)
    values = np.asarray(converted)
    if values.ndim == 2:
        values = values[..., None]
    return values, 8, icc


def _target_mode(image: Image.Image) -> str | None:
    """The 8-bit mode an image is converted to for its :class:`Picture` (None: unsupported)."""
    transparent = "transparency" in image.info
    return {
        "1": "LA" if transparent else "L",
        "L": "LA" if transparent else "L",
        "LA": "LA",
        "La": "LA",
        "P": "RGBA" if transparent or image.palette is None or image.palette.mode == "RGBA" else "RGB",
        "PA": "RGBA",
        "RGB": "RGBA" if transparent else "RGB",
        "RGBX": "RGB",
        "RGBA": "RGBA",
        "RGBa": "RGBA",
        "YCbCr": "RGB",
        "CMYK": "RGB",
    }.get(image.mode)


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """CMYK -> sRGB through the embedded profile when there is one, else Pillow's naive formula.

    Relative colorimetric with black-point compensation is what print tools use by default for
    CMYK -> screen; a broken profile falls back to the naive conversion rather than failing.
    """
    icc = image.info.get("icc_profile")
    if icc:
        try:
            converted = ImageCms.profileToProfile(
                image,
                ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                ImageCms.createProfile("sRGB"),
                renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
                outputMode="RGB",
                flags=ImageCms.Flags.BLACKPOINTCOMPENSATION,
            )
            if converted is not None:
                return converted
        except (ImageCms.PyCMSError, OSError, ValueError):
            logger.debug("CMYK profile unusable, falling back to naive conversion", exc_info=True)
    return image.convert("RGB")


def _matching_icc(icc: object, *, gray: bool) -> bytes | None:
    """The profile if it describes the decoded pixels, else None.

    A profile for another colour space (an RGB profile on a gray PNG, a CMYK one left on RGB data)
    cannot be honoured, and PNG decoders reject such files outright, so it is dropped.
    """
    if not isinstance(icc, bytes) or len(icc) < 128:
        return None
    expected = b"GRAY" if gray else b"RGB "
    return icc if icc[16:20] == expected else None


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield ``(type, payload)`` for each chunk of a PNG, stopping quietly at a truncated one."""
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        payload = data[pos + 8 : pos + 8 + length]
        if len(payload) < length:
            return
        yield kind, payload
        if kind == b"IEND":
            return
        pos += 12 + length


def _png_ihdr(data: bytes) -> tuple[int, int, int, int] | None:
    """``(width, height, bit_depth, colour_type)`` from a PNG's IHDR, or None if there is none."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    for kind, payload in _png_chunks(data):
        if kind == b"IHDR" and len(payload) == 13:
            width, height, depth, colour = struct.unpack(">IIBB", payload[:10])
            return width, height, depth, colour
        return None
    return None


def _png_orientation(data: bytes) -> int:
    """EXIF orientation from a PNG's ``eXIf`` chunk, wherever it is in the file."""
    for kind, payload in _png_chunks(data):
        if kind == b"eXIf":
            exif = Image.Exif()
            try:
                exif.load(payload)
            except Exception:  # malformed EXIF does not make the pixels bad
                return 1
            value = exif.get(_EXIF_ORIENTATION_TAG, 1)
            return value if isinstance(value, int) and 1 <= value <= 8 else 1
    return 1


def _read_png16(data: bytes) -> np.ndarray:
    """Decode a 16-bit RGB/RGBA/LA PNG with libpng (through ``imagecodecs``) into a uint16 H x W x C array.

    Compiled, unlike pypng (pure Python, about 2 s per megapixel to un-filter rows), and the samples
    are the same bit for bit (the tests compare the two). Gamma (``gAMA``) is not applied, as before.
    A ``tRNS`` colour (RGB only) becomes an alpha channel (0 where the colour matches, else 65535), as
    Pillow does for 8-bit files; libpng does that expansion itself.
    """
    values = np.asarray(png_decode(data))
    if values.ndim == 2:
        values = values[..., None]
    if values.dtype != np.uint16 or values.ndim != 3 or values.shape[2] not in (2, 3, 4):
        raise InvalidImageError(f"The image is corrupt or cannot be decoded (unexpected {values.dtype} samples).")
    return np.ascontiguousarray(values)


# --------------------------------------------------------------------------------------------------
# Encoding


def encode_image(
    picture: Picture,
    fmt: ImageFormat,
    *,
    quality: int = 95,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    executor: Executor | None = None,
) -> bytes:
    """Encode a picture as PNG, JPEG or WEBP, carrying its ICC profile.

    PNG keeps the channel layout and, for ``bit_depth == 16``, all 16 bits. JPEG has no alpha, so
    alpha is composited onto ``background`` (gray pictures stay single-channel JPEGs). WEBP keeps
    alpha but has no gray or 16-bit form, so gray is widened to RGB and values are 8-bit. ``quality``
    (1..100) applies to JPEG and WEBP. With ``executor`` a big PNG is compressed in stripes on the
    executor's idle threads; the calling thread may be one of them (see :func:`_run_helped`).
    """
    fmt = ImageFormat(fmt)  # ValueError for anything but JPG, PNG and WEBP
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    limit = _MAX_SIDE[fmt]
    if picture.width > limit or picture.height > limit:
        raise ImageTooLargeError(
            f"{fmt.value} cannot hold a {picture.width}x{picture.height} image (at most {limit} pixels per side).",
            parameter="outputFormat",
        )
    icc = picture.icc_profile
    if fmt is ImageFormat.PNG:
        return _write_png(picture.pixels, picture.bit_depth, icc, executor)
    out = io.BytesIO()
    pixels = picture.pixels if fmt.alpha else flatten_alpha(picture.pixels, background)  # JPG: onto the background
    if fmt is ImageFormat.JPG:
        values = _quantize(pixels, 8)
        image = Image.fromarray(values[..., 0] if values.shape[2] == 1 else values)
        # Chroma subsampling smears colour edges, which is exactly what an upscaler just sharpened;
        # at high quality the 4:4:4 size cost is worth it, below 90 the caller asked for small files.
        subsampling = 0 if quality >= 90 else 2
        image.save(out, format=fmt.pillow, quality=quality, subsampling=subsampling, icc_profile=icc)
    else:
        if picture.is_gray:
            # WEBP has no gray mode; a GRAY profile cannot describe the widened RGB data.
            pixels = pixels[..., [0, 0, 0, 1] if picture.has_alpha else [0, 0, 0]]
            icc = None
        image = Image.fromarray(_quantize(pixels, 8))
        image.save(out, format=fmt.pillow, quality=quality, icc_profile=icc)
    return out.getvalue()


def _quantize(pixels: np.ndarray, bits: int) -> np.ndarray:
    """Float [0, 1] -> uint8/uint16, rounding half up; NaN becomes 0 rather than garbage.

    Works through row blocks so the float temporary stays small (a whole-image one is 4 bytes per
    sample, several times the result) and in cache.
    """
    top = np.float32(2**bits - 1)
    values = np.empty(pixels.shape, dtype=np.uint8 if bits == 8 else np.uint16)
    rows = _block_rows(pixels)
    scratch = np.empty((min(rows, pixels.shape[0]), *pixels.shape[1:]), dtype=np.float32)
    for start in range(0, pixels.shape[0], rows):
        block = pixels[start : start + rows]
        scaled = scratch[: block.shape[0]]
        np.multiply(block, top, out=scaled)
        scaled += np.float32(0.5)
        # fmax/fmin (unlike clip) replace NaN with the bound instead of propagating it.
        np.fmax(scaled, np.float32(0.0), out=scaled)
        np.fmin(scaled, top, out=scaled)
        values[start : start + block.shape[0]] = scaled  # truncation: the + 0.5 made it round half up
    return values


def _block_rows(pixels: np.ndarray) -> int:
    """Rows per block so that one block holds about ``_BLOCK_SAMPLES`` samples."""
    return max(1, _BLOCK_SAMPLES // max(1, int(pixels.shape[1]) * int(pixels.shape[2])))


def _write_png(pixels: np.ndarray, bit_depth: int, icc: bytes | None, executor: Executor | None = None) -> bytes:
    """Encode float H x W x C pixels as an 8- or 16-bit PNG (colour type from C), with iCCP if given.

    The rows are cut into stripes, one per usable core when there is an executor and enough data; each
    stripe is quantised, filtered and deflated block by block into a raw deflate stream of its own, so
    memory beyond the result stays small. Streams that end in a sync flush concatenate into one valid
    stream, behind one zlib header and in front of the combined Adler-32: the file is an ordinary PNG,
    and its pixels are the same however it was cut.
    """
    height, width, channels = pixels.shape
    bpp = channels * bit_depth // 8  # bytes per pixel: the filter's "left" distance
    count = 1
    if executor is not None:
        count = max(1, min(height, usable_cores(), height * width * bpp // _PNG_STRIPE_MIN_BYTES))
    bounds = [height * i // count for i in range(count + 1)]
    jobs = [
        functools.partial(_deflate_stripe, pixels, start, stop, bit_depth, bpp, final=stop == height)
        for start, stop in itertools.pairwise(bounds)
    ]
    header = struct.pack(">IIBBBBB", width, height, bit_depth, _PNG_COLOUR_TYPES[channels], 0, 0, 0)
    parts = [_PNG_SIGNATURE, _png_chunk(b"IHDR", header)]
    if icc is not None:
        parts.append(_png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc)))
    parts.append(_png_chunk(b"IDAT", _ZLIB_HEADER))
    adler = 1
    for pieces, stripe_adler, length in _run_helped(jobs, executor):
        parts.extend(_png_chunk(b"IDAT", piece) for piece in pieces if piece)
        adler = _adler32_combine(adler, stripe_adler, length)
    parts.append(_png_chunk(b"IDAT", struct.pack(">I", adler)))
    parts.append(_png_chunk(b"IEND", b""))
    return b"".join(parts)


def _deflate_stripe(
    pixels: np.ndarray, start: int, stop: int, bit_depth: int, bpp: int, *, final: bool
) -> tuple[list[bytes], int, int]:
    """Rows ``start:stop`` as filtered PNG scanlines in a raw deflate stream: its pieces, the Adler-32
    and the length of the uncompressed scanlines. A stream that is not ``final`` ends byte-aligned
    without a last-block mark, so the next stripe's stream can follow it."""
    compressor = zlib.compressobj(_PNG_COMPRESS_LEVEL, zlib.DEFLATED, -15)  # raw: no header, no checksum
    width = pixels.shape[1]
    # The filter looks at the row above: the last row of the previous stripe, zeros above the image.
    previous = _png_rows(pixels[start - 1 : start], bit_depth)[0] if start else np.zeros(width * bpp, np.uint8)
    pieces: list[bytes] = []
    adler, length = 1, 0
    rows = _block_rows(pixels)
    for block in range(start, stop, rows):
        raw = _png_rows(pixels[block : min(block + rows, stop)], bit_depth)
        filtered = _average_filter(raw, previous, bpp).data
        adler = zlib.adler32(filtered, adler)
        length += filtered.nbytes
        pieces.append(compressor.compress(filtered))
        previous = raw[-1]
    pieces.append(compressor.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH))
    return pieces, adler, length


def _png_rows(pixels: np.ndarray, bit_depth: int) -> np.ndarray:
    """Float rows -> PNG sample bytes, one row of ``W x C x bytes`` per image row (16-bit: big-endian)."""
    values = _quantize(pixels, bit_depth)
    if bit_depth == 16:
        values = values.astype(">u2")
    return values.reshape(values.shape[0], -1).view(np.uint8)


def _adler32_combine(first: int, second: int, second_length: int) -> int:
    """The Adler-32 of A + B from those of A and B and the length of B (zlib's adler32_combine)."""
    rem = second_length % _ADLER_MOD
    low = first & 0xFFFF
    high = (rem * low) % _ADLER_MOD
    low = (low + (second & 0xFFFF) + _ADLER_MOD - 1) % _ADLER_MOD
    high = (high + (first >> 16) + (second >> 16) + _ADLER_MOD - rem) % _ADLER_MOD
    return (high << 16) | low


def _run_helped(jobs: Sequence[Callable[[], T]], executor: Executor | None) -> list[T]:
    """Results of ``jobs`` in order: the first runs here, the others on ``executor`` where a thread is
    free. A job still queued when this thread comes to it is taken back and run here, so a busy pool
    (or the very pool this thread belongs to) slows the work down but can never deadlock it."""
    futures = []
    if executor is not None and len(jobs) > 1:
        try:
            futures = [executor.submit(job) for job in jobs[1:]]
        except RuntimeError:  # the pool is shutting down: do it all here
            futures = []
    try:
        results = [jobs[0]()]
        for index, job in enumerate(jobs[1:]):
            if index < len(futures) and not futures[index].cancel():
                results.append(futures[index].result())
            else:
                results.append(job())
        return results
    finally:
        for future in futures:  # after a failure: drop what has not started
            future.cancel()


def _average_filter(raw: np.ndarray, previous: np.ndarray, bpp: int) -> np.ndarray:
    """PNG filter type 3 on rows of bytes, each prefixed with its filter byte.

    ``out = raw - floor((left + up) / 2)`` modulo 256, where left is ``bpp`` bytes back (0 at the row
    start) and up is the row above (``previous`` for the first row of the block). One cheap fixed
    filter instead of a per-row search: on smooth upscaled images it compresses about as well as the
    best of the five, and it is a few numpy passes.
    """
    count, row_bytes = raw.shape
    out = np.empty((count, row_bytes + 1), dtype=np.uint8)
    out[:, 0] = _PNG_FILTER_AVERAGE
    mean = out[:, 1:]
    up = np.empty_like(raw)
    up[0] = previous
    up[1:] = raw[:-1]
    # floor((a + b) / 2) within uint8: (a >> 1) + (b >> 1) + (a & b & 1).
    np.right_shift(up, 1, out=mean)
    left = raw[:, :-bpp]
    mean[:, bpp:] += left >> 1
    left_up = up[:, bpp:]
    left_up &= left
    left_up &= 1
    mean[:, bpp:] += left_up
    np.subtract(raw, mean, out=mean)
    return out


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(kind)) & 0xFFFFFFFF
    return struct.pack(">I4s", len(payload), kind) + payload + struct.pack(">I", crc)


# --------------------------------------------------------------------------------------------------
# Pixel operations


def flatten_alpha(pixels: np.ndarray, background: tuple[float, float, float]) -> FloatArray:
    """Composite RGBA/LA onto an opaque ``background`` colour, giving RGB/L; other inputs pass through.

    For LA the background is reduced to its luma (ITU-R 601 weights, as Pillow's "L" conversion), so
    a gray picture stays gray.
    """
    channels = pixels.shape[2]
    if channels not in (2, 4):
        return np.asarray(pixels, dtype=np.float32)
    bg = np.asarray(background, dtype=np.float32)
    if channels == 2:
        bg = np.asarray([bg @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)], dtype=np.float32)
    color = pixels[..., :-1].astype(np.float32, copy=False)
    alpha = pixels[..., -1:].astype(np.float32, copy=False)
    # bg + (c - bg) * a: one fused expression, same as c*a + bg*(1-a).
    return np.ascontiguousarray((color - bg) * alpha + bg, dtype=np.float32)


def resize_pixels(pixels: np.ndarray, width: int, height: int) -> FloatArray:
    """Lanczos-resample a float32 H x W x C array to ``width`` x ``height``, result clipped to [0, 1].

    Each channel is resampled in float (Pillow mode "F"), so there is no 8-bit rounding in between.
    With alpha (C = 2 or 4) colour is resampled premultiplied: a straight resample would pull the
    colour of invisible pixels (often black) into visible edges. Where the resampled alpha is
    (nearly) zero the colour is taken from a straight resample instead, so it stays defined.
    """
    if width < 1 or height < 1:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    src = np.asarray(pixels, dtype=np.float32)
    if src.ndim != 3:
        raise ValueError(f"pixels must be H x W x C, got shape {src.shape}")
    if (src.shape[1], src.shape[0]) == (width, height):
        return np.array(src, dtype=np.float32, order="C")
    # Work planar (C x H x W): every resample reads and writes contiguous planes, and the one
    # interleaving copy happens at the end.
    planar = np.ascontiguousarray(src.transpose(2, 0, 1))
    channels = planar.shape[0]
    out = np.empty((channels, height, width), dtype=np.float32)
    if channels in (2, 4):
        alpha = out[-1]
        alpha[...] = _resize_plane(planar[-1], width, height)
        np.clip(alpha, 0.0, 1.0, out=alpha)
        hidden = alpha < _UNPREMULTIPLY_MIN_ALPHA
        any_hidden = bool(hidden.any())
        inverse = np.float32(1.0) / np.where(hidden, np.float32(1.0), alpha)
        for c in range(channels - 1):
            plane = out[c]
            plane[...] = _resize_plane(planar[c] * planar[-1], width, height)
            plane *= inverse
            if any_hidden:
                np.copyto(plane, _resize_plane(planar[c], width, height), where=hidden)
    else:
        for c in range(channels):
            out[c] = _resize_plane(planar[c], width, height)
    np.clip(out, 0.0, 1.0, out=out)
    return np.ascontiguousarray(out.transpose(1, 2, 0))


def _resize_plane(plane: np.ndarray, width: int, height: int) -> FloatArray:
    """Lanczos-resample one float plane with Pillow ("F" mode: float32, no rounding in between)."""
    image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))  # 2-D float32 -> "F"
    resized = image.resize((width, height), Image.Resampling.LANCZOS)
    # frombuffer on tobytes() avoids the extra copy np.asarray(image) makes; read-only, callers copy.
    return np.frombuffer(resized.tobytes(), dtype=np.float32).reshape(height, width)


def bleed_transparent_colors(rgb: np.ndarray, alpha: np.ndarray) -> FloatArray:
    """Replace the colour under (nearly) invisible pixels with colour spread from visible neighbours.

    A super-resolution network looks at a neighbourhood, so the junk colour under transparent pixels
    (usually black) leaks into visible edges as dark halos. Visible pixels
    (alpha >= 1.5/255) are returned unchanged.

    Method: a push-pull pyramid. Going down, alpha-weighted colour and weight are summed over 2x2
    blocks until every cell of a level has some visible weight; going up, each empty cell takes the
    colour of its parent. Cost is about 4/3 of one pass over the image and independent of how wide the
    transparent areas are (repeated dilation would need as many passes as the widest hole).
    """
    rgb = np.asarray(rgb, dtype=np.float32)
    alpha = np.asarray(alpha, dtype=np.float32)
    if rgb.shape[:2] != alpha.shape or rgb.ndim != 3:
        raise ValueError(f"shapes do not match: rgb {rgb.shape}, alpha {alpha.shape}")
    visible = alpha >= _BLEED_MIN_ALPHA
    if visible.all() or not visible.any():
        return np.array(rgb, dtype=np.float32, order="C")  # nothing to fill, or nothing to fill from
    weight = np.where(visible, alpha, np.float32(0.0))
    levels: list[tuple[FloatArray, FloatArray]] = [(rgb * weight[..., None], weight)]
    while not bool((levels[-1][1] > 0).all()):
        color, weight = levels[-1]
        levels.append((_sum_2x2(color), _sum_2x2(weight)))
    color, weight = levels[-1]
    estimate = color / weight[..., None]
    for color, weight in reversed(levels[:-1]):
        h, w = weight.shape
        parent = np.repeat(np.repeat(estimate, 2, axis=0), 2, axis=1)[:h, :w]
        filled = weight > 0
        estimate = np.where(filled[..., None], color / np.where(filled, weight, 1.0)[..., None], parent)
    return np.ascontiguousarray(np.where(visible[..., None], rgb, estimate), dtype=np.float32)


def _sum_2x2(values: FloatArray) -> FloatArray:
    """Sum over 2x2 blocks, padding odd sizes with zeros (zero weight contributes nothing)."""
    h, w = values.shape[:2]
    if h % 2 or w % 2:
        values = np.pad(values, [(0, h % 2), (0, w % 2)] + [(0, 0)] * (values.ndim - 2))
    # Four strided adds are several times faster than reshape(...).sum(axis=(1, 3)).
    return values[0::2, 0::2] + values[1::2, 0::2] + values[0::2, 1::2] + values[1::2, 1::2]
