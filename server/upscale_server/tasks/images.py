"""Images in and out of tasks: inputs fetched and decoded, pictures encoded and stored.

Shared by ``imageUpload`` and the upscale tasks, so both accept the same input forms and store images
the same way. Decoding, encoding and storing run in the codec pool (never on the event loop, never on
the inference worker, whose device would then wait for a PNG); downloads go through the one
policy-enforcing outbound client.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import ParamSpec, TypeVar

from upscale_server.budget import MemoryBudget
from upscale_server.errors import ImageNotFoundError, ImageTooLargeError, InvalidImageError
from upscale_server.imaging import (
    ImageHeader,
    Picture,
    decode_image,
    encode_image,
    exif_orientation,
    read_header,
    resize_pixels,
)
from upscale_server.metadata import strip_metadata
from upscale_server.outbound import OutboundClient
from upscale_server.storage import ImageStorage, StoredImage
from upscale_server.tasks.inputs import Base64Ref, DataUriRef, ImageRef, UrlRef, UuidRef, classify_image_input
from upscale_server.vocabulary import OUTPUT_QUALITY, ImageFormat, is_uuid

P = ParamSpec("P")
T = TypeVar("T")

#: Inline inputs (base64, data URIs) longer than this many characters are decoded in a thread.
LARGE_INPUT = 1 << 16

#: Stored uploads keep a lossless format unless the source was lossy.
_UPLOAD_FORMAT_FOR_SOURCE = {ImageFormat.JPG.pillow: ImageFormat.JPG, ImageFormat.WEBP.pillow: ImageFormat.WEBP}


@dataclass(frozen=True)
class StoredOutput:
    """An upscale result as stored, with its encoded bytes (kept for the reply and the upload)."""

    image: StoredImage
    data: bytes


class TaskImages:
    """What tasks do with images, each step in the right place (network, codec pool, store)."""

    def __init__(
        self,
        storage: ImageStorage,
        outbound: OutboundClient,
        codecs: Executor,
        *,
        budget: MemoryBudget,
        max_fetch_bytes: int,
        max_input_pixels: int,
        upload_max_side: int,
        keep_metadata: bool = False,
    ) -> None:
        self.storage = storage
        self.outbound = outbound
        self.codecs = codecs
        self.budget = budget
        self.max_fetch_bytes = max_fetch_bytes
        self.max_input_pixels = max_input_pixels
        self.upload_max_side = upload_max_side
        self.keep_metadata = keep_metadata

    async def input_bytes(self, value: str, parameter: str) -> tuple[bytes, str | None]:
        """The raw bytes of an image input, and its stored UUID when it names one."""
        return await self._bytes_of(await self._classify(value, parameter), parameter)

    async def _classify(self, value: str, parameter: str) -> ImageRef:
        if len(value) > LARGE_INPUT:  # base64 decoding is a pass over every byte: not on the event loop
            return await asyncio.to_thread(classify_image_input, value, parameter=parameter)
        return classify_image_input(value, parameter=parameter)

    async def _bytes_of(self, ref: ImageRef, parameter: str) -> tuple[bytes, str | None]:
        if isinstance(ref, UuidRef):
            data, stored = await asyncio.to_thread(load_stored, self.storage, ref.uuid, parameter=parameter)
            return data, stored.uuid
        if isinstance(ref, UrlRef):
            return await self.outbound.get_bytes(ref.url, max_bytes=self.max_fetch_bytes, parameter=parameter), None
        assert isinstance(ref, DataUriRef | Base64Ref)
        return ref.data, None

    async def check_input(self, value: str, parameter: str) -> None:
        """Refuse an image input now if it can already be seen to fail, without fetching or decoding it:
        a malformed value, a stored UUID that does not exist, a URL the outbound policy refuses. An
        async task calls this before its acknowledgement; only what needs the image itself fails later."""
        if is_uuid(value.strip()):  # a reference: no payload to decode
            ref: ImageRef = classify_image_input(value, parameter=parameter)
        else:  # inline base64 can be megabytes: validated in the codec pool, off the event loop
            ref = await self.in_codecs(classify_image_input, value, parameter=parameter)
        if isinstance(ref, UuidRef):
            stored = await asyncio.to_thread(self.storage.get, ref.uuid, touch=False)
            if stored is None:
                raise ImageNotFoundError(
                    f"no stored image with UUID {ref.uuid} (never uploaded, or expired)", parameter=parameter
                )
        elif isinstance(ref, UrlRef):
            await self.outbound.check_url(ref.url, parameter=parameter)

    async def held_bytes(self, value: str, parameter: str) -> bytes | None:
        """The bytes of an inline or stored input, which the server holds before a task is accepted (its
        header can be read then); None for a URL, downloaded only when the task runs."""
        ref = await self._classify(value, parameter)  # decoded once: the bytes come from this ref
        if isinstance(ref, UrlRef):
            return None
        return (await self._bytes_of(ref, parameter))[0]

    async def header(self, data: bytes, parameter: str) -> ImageHeader:
        """What decoding ``data`` will cost, from its header; refuses what decoding would refuse, without
        decoding (off the event loop when the data is big: the JPEG scan count reads every byte)."""
        if len(data) > LARGE_INPUT:
            return await asyncio.to_thread(
                read_input_header, data, max_pixels=self.max_input_pixels, parameter=parameter
            )
        return read_input_header(data, max_pixels=self.max_input_pixels, parameter=parameter)

    async def decode(self, data: bytes, parameter: str) -> Picture:
        return await self.in_codecs(decode_input, data, max_pixels=self.max_input_pixels, parameter=parameter)

    async def store_upload(self, picture: Picture) -> StoredImage:
        return await self.in_codecs(
            store_upload, self.storage, picture, max_side=self.upload_max_side, executor=self.codecs
        )

    async def store_input(self, data: bytes, picture: Picture, image_uuid: str) -> StoredImage:
        return await self.in_codecs(
            store_input, self.storage, data, picture, image_uuid, keep_metadata=self.keep_metadata
        )

    async def in_codecs(self, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``func(*args, **kwargs)`` in the codec pool, in the caller's context (its taskUUID reaches the
        log lines), as ``asyncio.to_thread`` does for the default executor.

        Cancelled, it returns only once the work is dropped (still queued) or has ended (running: a
        thread cannot be stopped), so a task's memory reservation outlives the pixels its work holds."""
        call = functools.partial(contextvars.copy_context().run, func, *args, **kwargs)
        work = self.codecs.submit(call)
        try:
            return await asyncio.wrap_future(work)
        except asyncio.CancelledError:
            if not work.cancel():
                await asyncio.wait([asyncio.wrap_future(work)])
            raise


# --------------------------------------------------------------------------- the blocking steps


def load_stored(images: ImageStorage, image_uuid: str, *, parameter: str) -> tuple[bytes, StoredImage]:
    """Bytes of a stored upload or output (refreshing its last use); ImageNotFoundError if gone."""
    stored = images.get(image_uuid)
    if stored is None:
        raise ImageNotFoundError(
            f"no stored image with UUID {image_uuid} (never uploaded, or expired)", parameter=parameter
        )
    return images.read_bytes(stored), stored


@contextlib.contextmanager
def _blaming(parameter: str) -> Iterator[None]:
    """Name the request field at fault in an image error raised inside, unless it names one already."""
    try:
        yield
    except (InvalidImageError, ImageTooLargeError) as exc:
        exc.parameter = exc.parameter or parameter
        raise


def read_input_header(data: bytes, *, max_pixels: int, parameter: str) -> ImageHeader:
    """An input's header, naming the request field at fault when it is not one we can read."""
    with _blaming(parameter):
        return read_header(data, max_pixels=max_pixels)


def decode_input(data: bytes, *, max_pixels: int, parameter: str) -> Picture:
    """Decode an input image, naming the request field at fault when it is not one we can read."""
    with _blaming(parameter):
        return decode_image(data, max_pixels=max_pixels)


def store_upload(
    images: ImageStorage, picture: Picture, *, max_side: int, executor: Executor | None = None
) -> StoredImage:
    """Store an uploaded image as Runware does: at most ``max_side`` on the long side (EXIF already applied).

    ``executor``: idle threads that may share a big PNG encode (see :func:`~upscale_server.imaging.encode_image`)."""
    longest = max(picture.width, picture.height)
    if longest > max_side:
        ratio = max_side / longest
        size = (max(1, round(picture.width * ratio)), max(1, round(picture.height * ratio)))
        picture = replace(picture, pixels=resize_pixels(picture.pixels, *size))
    fmt = _UPLOAD_FORMAT_FOR_SOURCE.get(picture.source_format, ImageFormat.PNG)
    encoded = encode_image(picture, fmt, quality=OUTPUT_QUALITY.default, executor=executor)
    return images.put(encoded, format=fmt, kind="upload")


def store_output(
    images: ImageStorage,
    picture: Picture,
    *,
    output_format: ImageFormat,
    quality: int,
    ttl_seconds: float | None,
    image_uuid: str | None = None,
    executor: Executor | None = None,
) -> StoredOutput:
    """Encode once and store; the bytes are kept for the reply (base64, upload) so nothing is re-encoded.

    ``executor``: idle threads that may share a big PNG encode (see :func:`~upscale_server.imaging.encode_image`)."""
    data = encode_image(picture, output_format, quality=quality, executor=executor)
    stored = images.put(data, format=output_format, kind="output", ttl_seconds=ttl_seconds, image_uuid=image_uuid)
    return StoredOutput(stored, data)


def store_input(
    images: ImageStorage, data: bytes, picture: Picture, image_uuid: str | None = None, *, keep_metadata: bool = False
) -> StoredImage:
    """Keep an inline upscale input so its ``inputImageUUID`` can be reused: the bytes as sent when possible,
    without their metadata (GPS position and the like) unless ``keep_metadata``."""
    fmt = ImageFormat.from_pillow(picture.source_format)
    if fmt is not None and not keep_metadata:
        stripped = strip_metadata(data, fmt, orientation=exif_orientation(data))
        if stripped is None:  # a container this server reads but cannot rewrite: re-encoded below
            fmt = None
        else:
            data = stripped
    if fmt is None:  # BMP, GIF...: stored as PNG, the format every client can read back
        data, fmt = encode_image(picture, ImageFormat.PNG), ImageFormat.PNG
    return images.put(data, format=fmt, kind="upload", image_uuid=image_uuid)
