"""What an image string on the wire is, and turning it into bytes.

Runware accepts four forms wherever an image goes (``inputImage``, ``inputs.image``, ``image``): the
UUID of a stored image, an http(s) URL, a data URI, or bare base64. The official SDKs pass the
caller's string through unchanged and users hit every form (sdk-python #14, #52, #53, #62, #63), so
the server classifies them itself, in this order:

1. a UUID (8-4-4-4-12 hex) is a reference, never base64 (base64 has no ``-``);
2. ``data:`` starts a data URI (must be ``;base64``; the media type is advisory: the decoder sniffs
   the bytes, and the ``runware`` SDK builds the prefix from ``mimetypes``, which misses some types);
3. anything else with a ``:`` is a URL, and only http/https with a host are accepted (base64 never
   contains ``:``, so a Windows path or ``file:`` URL gets a clear "only http/https" error);
4. the rest must be standard-alphabet base64. Whitespace and newlines (MIME line wrapping) are
   ignored and missing ``=`` padding is restored; any other character is an error.

Errors name the wire field the value came from (``parameter``), which the caller passes in.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from typing import TypeAlias

from upscale_server.errors import InvalidParameterError
from upscale_server.protocol import is_http_url
from upscale_server.vocabulary import is_uuid


@dataclass(frozen=True, slots=True)
class UuidRef:
    """A stored image, by UUID (lower-cased: the store issues lower-case UUIDs)."""

    uuid: str


@dataclass(frozen=True, slots=True)
class UrlRef:
    """An http(s) URL still to be fetched, through the policy-enforcing :mod:`upscale_server.outbound` client."""

    url: str


@dataclass(frozen=True, slots=True, repr=False)
class DataUriRef:
    """The decoded payload of a ``data:<media type>;base64,`` URI; ``media_type`` may be empty."""

    media_type: str
    data: bytes

    def __repr__(self) -> str:  # the payload can be megabytes: keep it out of logs and tracebacks
        return f"DataUriRef(media_type={self.media_type!r}, data=<{len(self.data)} bytes>)"


@dataclass(frozen=True, slots=True, repr=False)
class Base64Ref:
    """The decoded payload of bare base64."""

    data: bytes

    def __repr__(self) -> str:
        return f"Base64Ref(data=<{len(self.data)} bytes>)"


ImageRef: TypeAlias = UuidRef | UrlRef | DataUriRef | Base64Ref

_BASE64_BODY = re.compile(r"[A-Za-z0-9+/]*")
_FORMS = "an uploaded image UUID, an http(s) URL, a data URI (data:image/png;base64,...) or base64"
#: Characters of base64 handled per step (see :func:`_decode_base64`): a few milliseconds each.
_PIECE = 1 << 20
#: A data URI header longer than this is not a media type: refuse it before scanning further.
_MAX_DATA_URI_HEADER = 256


def classify_image_input(value: str, *, parameter: str = "inputImage") -> ImageRef:
    """Which of the four forms ``value`` is, with base64 already decoded.

    Raises ``InvalidParameterError`` (code ``invalid<Param>``) for an empty string, a non-http(s)
    URL, a data URI that is not base64, or invalid base64. Whether the bytes are an image is the
    decoder's business (``InvalidImageError``), and whether a UUID exists is the store's.
    """
    text = value.strip()
    if not text:
        raise _invalid(parameter, "it is empty")
    if is_uuid(text):
        return UuidRef(text.lower())
    if text[:5].lower() == "data:":
        return _data_uri(text, parameter)
    if ":" in text:
        if not is_http_url(text):
            raise _invalid(parameter, "only http and https URLs are accepted")
        return UrlRef(text)
    return Base64Ref(_decode_base64(text, parameter, what="base64"))


def _invalid(parameter: str, reason: str) -> InvalidParameterError:
    return InvalidParameterError(
        f"Invalid value for '{parameter}' parameter: {reason}. Send {_FORMS}.",
        parameter=parameter,
        type="string",
    )


def _data_uri(text: str, parameter: str) -> DataUriRef:
    header, comma, payload = text.partition(",")
    if not comma or len(header) > _MAX_DATA_URI_HEADER:
        raise _invalid(parameter, "the data URI has no ',' after its media type")
    media_type, *params = header[5:].split(";")
    if "base64" not in (param.strip().lower() for param in params):
        raise _invalid(parameter, "the data URI must be base64-encoded (data:image/png;base64,...)")
    return DataUriRef(media_type.strip().lower(), _decode_base64(payload, parameter, what="the data URI's base64"))


def _decode_base64(text: str, parameter: str, *, what: str) -> bytes:
    """Strict-alphabet base64, ignoring whitespace, tolerating missing (but not misplaced) padding.

    Works through pieces of :data:`_PIECE` characters: every step is a C call that holds the GIL, so
    on a 70 MB string a single call would stall the event loop's thread for hundreds of milliseconds
    even from a worker thread; between pieces the GIL can change hands.
    """
    pieces = [p for p in ("".join(text[i : i + _PIECE].split()) for i in range(0, len(text), _PIECE)) if p]
    padding = 0
    while pieces:  # the trailing '=' may span pieces
        last = pieces[-1].rstrip("=")
        padding += len(pieces[-1]) - len(last)
        if last:
            pieces[-1] = last
            break
        pieces.pop()
    if padding > 2 or not all(_BASE64_BODY.fullmatch(piece) for piece in pieces):
        raise _invalid(parameter, f"{what} contains characters outside the base64 alphabet")
    length = sum(map(len, pieces))
    if length % 4 == 1:
        raise _invalid(parameter, f"{what} is truncated (its length is not possible for base64)")
    if not length:
        raise _invalid(parameter, f"{what} is empty")
    out: list[bytes] = []
    carry = ""
    try:
        for piece in pieces:
            whole = carry + piece
            cut = len(whole) - len(whole) % 4
            out.append(binascii.a2b_base64(whole[:cut], strict_mode=True))
            carry = whole[cut:]
        if carry:
            out.append(binascii.a2b_base64(carry + "=" * (-len(carry) % 4), strict_mode=True))
    except binascii.Error as exc:  # unreachable after the checks above; kept so no raw error escapes
        raise _invalid(parameter, f"{what} is not valid base64") from exc
    return b"".join(out)
