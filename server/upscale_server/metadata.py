"""Metadata removed from image files the server keeps as they were sent, without touching their pixels.

An upscale's inline input is stored as sent (so its ``inputImageUUID`` gives back the same image),
and phone photos carry EXIF with the GPS position, the camera's serial number and the time, XMP and
IPTC blocks, and text chunks. The container is rewritten without them: JPEG segments, PNG chunks and
WEBP chunks are dropped, the compressed pixel data is copied byte for byte. What decoding depends on
stays: the ICC profile, JFIF and Adobe segments (colour transform), and the orientation, written back
as a one-tag EXIF block when it is not the default. Other formats are not stored as sent.
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

from PIL import Image

from upscale_server.vocabulary import ImageFormat

_EXIF_ORIENTATION_TAG: Final = 0x0112
_EXIF_HEADER: Final = b"Exif\x00\x00"

# JPEG segments kept before the first scan: tables, frame headers, restart interval, and the APPn
# blocks decoding needs. JFIF (APP0), ICC_PROFILE (APP2) and Adobe (APP14) are kept by content below.
_JPEG_APP0: Final = 0xE0
_JPEG_APP2: Final = 0xE2
_JPEG_APP14: Final = 0xEE
_JPEG_SOS: Final = 0xDA

# PNG chunks that carry metadata and nothing the pixels need.
_PNG_METADATA: Final = frozenset({b"eXIf", b"tEXt", b"zTXt", b"iTXt", b"tIME"})
_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"

# WEBP: the metadata chunks, and their flags in the VP8X header.
_WEBP_METADATA: Final = frozenset({b"EXIF", b"XMP "})
_VP8X_EXIF: Final = 0x08
_VP8X_XMP: Final = 0x04


def strip_metadata(data: bytes, fmt: ImageFormat, *, orientation: int = 1) -> bytes | None:
    """``data`` without its metadata (see the module docstring), ``orientation`` (1..8) kept; None when the
    container does not parse the way this module expects (the caller then stores a re-encoding)."""
    try:
        if fmt is ImageFormat.JPG:
            return _strip_jpeg(data, orientation)
        if fmt is ImageFormat.PNG:
            return _strip_png(data, orientation)
        return _strip_webp(data, orientation)
    except (ValueError, struct.error):
        return None


def _orientation_exif(orientation: int) -> bytes | None:
    """A TIFF-structured EXIF block holding only the orientation; None for the default (1)."""
    if orientation == 1:
        return None
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION_TAG] = orientation
    tiff = exif.tobytes()
    return tiff[len(_EXIF_HEADER) :] if tiff.startswith(_EXIF_HEADER) else tiff


def _strip_jpeg(data: bytes, orientation: int) -> bytes:
    if not data.startswith(b"\xff\xd8"):
        raise ValueError("not a JPEG")
    kept: list[bytes] = []
    pos = 2
    while True:
        if pos + 4 > len(data) or data[pos] != 0xFF:
            raise ValueError("truncated JPEG header")
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == _JPEG_SOS:
            break
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        segment = data[pos : pos + 2 + length]
        if len(segment) < 2 + length:
            raise ValueError("truncated JPEG segment")
        if _keep_jpeg_segment(marker, segment[4:]):
            kept.append(segment)
        pos += 2 + length
    exif = _orientation_exif(orientation)
    if exif is not None:  # after a leading JFIF segment, which must come first
        kept.insert(1 if kept and kept[0][1] == _JPEG_APP0 else 0, _jpeg_app1(_EXIF_HEADER + exif))
    # The scans follow, kept up to this picture's end: an MPO's further pictures carry their own EXIF,
    # and decoding reads the first one only.
    return b"\xff\xd8" + b"".join(kept) + data[pos : _jpeg_end(data, pos)]


def _jpeg_end(data: bytes, pos: int) -> int:
    """Where the picture whose first scan starts at ``pos`` ends (after its EOI marker). Segments between
    scans are skipped by their lengths; in entropy-coded data every 0xFF is followed by 0x00 or a restart
    marker, so the next other 0xFF xx is the next marker."""
    while True:
        if pos + 2 > len(data) or data[pos] != 0xFF:
            raise ValueError("truncated JPEG")
        marker = data[pos + 1]
        if marker == 0xD9:
            return pos + 2
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if pos + 4 > len(data):
            raise ValueError("truncated JPEG")
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if marker != _JPEG_SOS:
            continue
        while True:  # entropy-coded data
            pos = data.find(b"\xff", pos)
            if pos < 0 or pos + 1 >= len(data):
                raise ValueError("truncated JPEG scan")
            following = data[pos + 1]
            if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
                pos += 1 if following == 0xFF else 2
                continue
            break


def _jpeg_app1(payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, 0xE1, len(payload) + 2) + payload


def _keep_jpeg_segment(marker: int, payload: bytes) -> bool:
    if marker == 0xFE:  # COM
        return False
    if 0xE0 <= marker <= 0xEF:  # APPn: only what decoding reads
        return (
            (marker == _JPEG_APP0 and payload.startswith((b"JFIF\x00", b"JFXX\x00")))
            or (marker == _JPEG_APP2 and payload.startswith(b"ICC_PROFILE\x00"))
            or (marker == _JPEG_APP14 and payload.startswith(b"Adobe"))
        )
    return True


def _strip_png(data: bytes, orientation: int) -> bytes:
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError("not a PNG")
    parts = [_PNG_SIGNATURE]
    pos = len(_PNG_SIGNATURE)
    exif = _orientation_exif(orientation)
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos : pos + 12 + length]
        if len(chunk) < 12 + length:
            raise ValueError("truncated PNG chunk")
        if kind not in _PNG_METADATA:
            parts.append(chunk)
        if kind == b"IHDR" and exif is not None:
            parts.append(_png_chunk(b"eXIf", exif))
        pos += 12 + length
        if kind == b"IEND":
            return b"".join(parts)
    raise ValueError("PNG without IEND")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(kind)) & 0xFFFFFFFF
    return struct.pack(">I4s", len(payload), kind) + payload + struct.pack(">I", crc)


def _strip_webp(data: bytes, orientation: int) -> bytes:
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise ValueError("not a WEBP")
    chunks: list[bytes] = []
    pos = 12
    while pos + 8 <= len(data):
        kind, length = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        chunk = data[pos : pos + 8 + length + (length & 1)]  # chunks are padded to an even length
        if len(chunk) < 8 + length:
            raise ValueError("truncated WEBP chunk")
        if kind not in _WEBP_METADATA:
            chunks.append(chunk)
        pos += 8 + length + (length & 1)
    exif = _orientation_exif(orientation)
    if chunks and chunks[0][:4] == b"VP8X":
        flags = chunks[0][8] & ~(_VP8X_EXIF | _VP8X_XMP)
        if exif is not None:
            flags |= _VP8X_EXIF
        chunks[0] = chunks[0][:8] + bytes([flags]) + chunks[0][9:]
        if exif is not None:
            chunks.append(b"EXIF" + struct.pack("<I", len(exif)) + exif + b"\0" * (len(exif) & 1))
    elif exif is not None:
        raise ValueError("a simple WEBP has no place for EXIF")  # never: EXIF needs VP8X; keep as sent
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body
