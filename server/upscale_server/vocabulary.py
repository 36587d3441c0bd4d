"""The project's one vocabulary: image formats, factors, the quality range, UUIDs, cores, atomic writes.

Each of these used to be spelled out in several modules (the wire parser, the stores, the encoders,
the CLI); a change to one of them now happens here and nowhere else.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

# --------------------------------------------------------------------------- image formats


class ImageFormat(enum.StrEnum):
    """An output (and stored) image format. Its value is the wire name, so it compares and serialises
    as the string Runware uses (``ImageFormat.JPG == "JPG"``)."""

    JPG = "JPG"
    PNG = "PNG"
    WEBP = "WEBP"

    @property
    def pillow(self) -> str:
        """Pillow's format name (also what the decoder reports for such a file)."""
        return _TRAITS[self][0]

    @property
    def extension(self) -> str:
        """File extension, without the dot."""
        return _TRAITS[self][1]

    @property
    def media_type(self) -> str:
        return _TRAITS[self][2]

    @property
    def alpha(self) -> bool:
        """Whether the format can hold an alpha channel."""
        return _TRAITS[self][3]

    @classmethod
    def from_wire(cls, text: str) -> ImageFormat | None:
        """``outputFormat`` as clients spell it (any case; ``JPEG`` means ``JPG``), or None."""
        return _BY_SPELLING.get(text.strip().lower())

    @classmethod
    def from_extension(cls, extension: str) -> ImageFormat | None:
        return _BY_SPELLING.get(extension.lower().lstrip("."))

    @classmethod
    def from_pillow(cls, name: str) -> ImageFormat | None:
        """The format Pillow decoded a file as, when it is one we also write (JPEG, PNG, WEBP)."""
        return next((fmt for fmt in cls if fmt.pillow == name), None)


#: Pillow name, extension, media type, alpha.
_TRAITS: Final[dict[ImageFormat, tuple[str, str, str, bool]]] = {
    ImageFormat.JPG: ("JPEG", "jpg", "image/jpeg", False),
    ImageFormat.PNG: ("PNG", "png", "image/png", True),
    ImageFormat.WEBP: ("WEBP", "webp", "image/webp", True),
}
#: Every accepted spelling (wire names and extensions, lower-cased) -> format.
_BY_SPELLING: Final = {fmt.value.lower(): fmt for fmt in ImageFormat} | {"jpeg": ImageFormat.JPG}


# --------------------------------------------------------------------------- upscaling


#: The factors the pipeline produces exactly (a native model, or x4 then a Lanczos downscale).
UPSCALE_FACTORS: Final[tuple[int, ...]] = (2, 3, 4)
DEFAULT_UPSCALE_FACTOR: Final = 4


@dataclass(frozen=True)
class QualityRange:
    """JPG/WEBP quality: the range Runware accepts and its default."""

    min: int
    max: int
    default: int

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.min <= value <= self.max


OUTPUT_QUALITY: Final = QualityRange(min=20, max=99, default=95)

# --------------------------------------------------------------------------- identifiers

_UUID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)


def is_uuid(value: object) -> bool:
    """True for a hyphenated 8-4-4-4-12 hex UUID of any version or case.

    Braces, URNs and bare hex are refused on purpose: a bare 32-hex string might as well be base64.
    """
    return isinstance(value, str) and _UUID.fullmatch(value) is not None


def canonical_uuid(value: object) -> str | None:
    """The lower-case form of a UUID string (what the stores issue and key by), or None."""
    return value.lower() if isinstance(value, str) and is_uuid(value) else None


# --------------------------------------------------------------------------- the machine


def usable_cores() -> int:
    """CPU cores this process may run on (``sched_getaffinity`` respects container CPU sets)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def usable_memory() -> int | None:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit when lower (a
    container's memory limit). None when neither can be read (not on Linux)."""
    limits: list[int] = []
    with contextlib.suppress(AttributeError, ValueError, OSError):
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # cgroup v2, v1
        with contextlib.suppress(OSError, ValueError):
            limits.append(int(Path(path).read_text().strip()))  # "max" (no limit) is a ValueError
    return min(limits) if limits else None


# --------------------------------------------------------------------------- files


@contextlib.contextmanager
def staged_writer(path: Path, *, suffix: str = ".partial", mode: int | None = 0o644) -> Iterator[BinaryIO]:
    """A file to write ``path``'s new content into: a hidden temp file beside it, fsynced and renamed
    into place when the ``with`` block ends normally, deleted (``path`` untouched) when it raises.

    Readers never see half a file: the rename is atomic on one file system, and it comes after the
    fsync, so a power cut cannot leave an empty file under the final name. Whatever else the block
    does happens before the rename (the image store commits its row there; a download checks its
    digest there). ``suffix`` lets a sweeper or a ``.gitignore`` recognise leftovers of a crash.
    ``mode``: the file's permissions (None keeps the owner-only 0600 of a fresh temp file, for data
    that is nobody else's business).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    temp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            temp.chmod(mode)  # mkstemp creates 0600
        temp.replace(path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes, *, suffix: str = ".partial") -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    with staged_writer(path, suffix=suffix) as handle:
        handle.write(data)
