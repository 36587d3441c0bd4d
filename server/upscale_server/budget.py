"""The memory budget: how many bytes of pixel work this process holds at once, whatever the mix of tasks.

A task count cannot bound memory: a 34-byte WEBP can declare 8192x8192 and cost gigabytes once decoded.
So every task that decodes an image (an upload, an upscale, a dry run of either) first reads the image's
header, estimates what decoding and processing it will hold (:func:`pixel_cost`) and reserves that
much here, before any pixel exists; the reservation ends when its pixels are gone (stored, failed or
cancelled). One :class:`MemoryBudget` serves every transport and connection of the process.

Two ways in. :meth:`MemoryBudget.reserve` is admission: it answers at once, and a task that does not
fit is refused with a 429 (``rateLimitExceeded``, as a full queue is) before it is claimed or
acknowledged. :meth:`MemoryBudget.hold` is for work accepted already (an input URL is downloaded after
the acknowledgement, so its header is read only then): it takes the task's admission reservation when
there is one, else waits in line until the cost fits. Either way a picture is decoded only once its
cost is reserved, so nothing decoded waits for room. An image whose cost exceeds the whole budget can
never run: ``imageTooLarge`` (413).

Everything runs on the event loop: no lock is needed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from upscale_server.errors import ImageTooLargeError, QueueFullError
from upscale_server.imaging import ImageHeader

#: The setting that sizes the budget, named in refusals.
BUDGET_SETTING: Final = "UPSCALE_MEMORY_BUDGET_BYTES"

#: Peak bytes held per byte of a float32 picture while it is decoded and worked on. Measured peaks
#: (resident set, resize engine): decoding 1.7x (gray) to 2.6x (WEBP); an upload resized to 2048 px,
#: 2.5x (RGB) to 3.0x (RGBA); an upscale, input plus 2.7x its output (the resize engine's native x4
#: image counted as one more output). With 3.5, sync upscales over REST peaked at 0.7x the estimate.
WORKING_FACTOR: Final = 3.5

#: Bytes of one float32 sample: the pipeline's one picture form.
_SAMPLE_BYTES: Final = 4


def pixel_cost(header: ImageHeader, *, encoded_bytes: int = 0, outputs: Sequence[tuple[int, int]] = ()) -> int:
    """Bytes a task decoding ``header``'s image holds at its peak: the decoded input and its working
    copies, the encoded input three times (the bytes, the base64 text they came in, 4/3 as long, and
    slack for the request's parse), and for an upscale each full-size image it makes (``outputs``,
    width and height: the output, and any larger canvas the engine resizes it from) with their working
    copies and encoding. Outputs are counted in colour (plus alpha): the network works on RGB, a
    gray picture is widened for it."""
    out_channels = 4 if header.channels in (2, 4) else 3
    output_pixels = sum(width * height for width, height in outputs)
    samples = header.pixels * header.channels + output_pixels * out_channels
    return int(WORKING_FACTOR * samples * _SAMPLE_BYTES) + 3 * encoded_bytes


@dataclass(eq=False)
class Reservation:
    """Bytes held in a budget until :meth:`release` (idempotent: every path may call it)."""

    budget: MemoryBudget
    nbytes: int
    key: str | None = None
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.budget._give_back(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@dataclass(eq=False)
class _Waiter:
    nbytes: int
    granted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class MemoryBudget:
    """``limit`` bytes of pixel work, reserved by the tasks that decode images and given back as they end."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the memory budget must be positive, got {limit}")
        self.limit = limit
        self._used = 0
        self._waiting: collections.deque[_Waiter] = collections.deque()
        self._admitted: dict[str, Reservation] = {}

    @property
    def used(self) -> int:
        """Bytes reserved now."""
        return self._used

    @property
    def waiting(self) -> int:
        """Tasks accepted already that wait for room before they decode."""
        return len(self._waiting)

    def reserve(self, nbytes: int, *, what: str, parameter: str | None = None, key: str | None = None) -> Reservation:
        """Admit ``nbytes`` now or refuse: QueueFullError (429) when the budget is taken, or when accepted
        work waits for room already (it goes first); ImageTooLargeError when ``nbytes`` exceeds the whole
        budget; both name ``parameter``, the image's field. ``key`` (a job's id) lets :meth:`hold` find the
        reservation when the job runs."""
        self._check_fits_at_all(nbytes, what, parameter)
        if self._waiting or self._used + nbytes > self.limit:
            raise QueueFullError(
                f"Not enough memory for {what} now: it needs about {_mib(nbytes)} and {_mib(self._used)} of "
                f"{_mib(self.limit)} ({BUDGET_SETTING}) are in use; retry shortly.",
                parameter=parameter,
            )
        self._used += nbytes
        reservation = Reservation(self, nbytes, key)
        if key is not None:
            self._admitted[key] = reservation
        return reservation

    @contextlib.asynccontextmanager
    async def hold(
        self, key: str | None, nbytes: int, *, what: str, parameter: str | None = None
    ) -> AsyncIterator[Reservation]:
        """Hold ``nbytes`` for the block: the reservation admitted under ``key`` when there is one, else
        once the cost fits (waiting in line behind earlier work). Released when the block ends, however."""
        reservation = self._admitted.get(key) if key is not None else None
        if reservation is None:
            reservation = await self._acquire(nbytes, what, parameter)
        try:
            yield reservation
        finally:
            reservation.release()

    async def _acquire(self, nbytes: int, what: str, parameter: str | None) -> Reservation:
        self._check_fits_at_all(nbytes, what, parameter)
        if not self._waiting and self._used + nbytes <= self.limit:
            self._used += nbytes
            return Reservation(self, nbytes)
        waiter = _Waiter(nbytes)
        self._waiting.append(waiter)
        try:
            await waiter.granted
        except BaseException:
            if waiter.granted.done() and not waiter.granted.cancelled():
                self._used -= nbytes  # granted as the wait was cancelled: hand it on
            else:
                with contextlib.suppress(ValueError):  # _grant drops cancelled waiters itself
                    self._waiting.remove(waiter)
            self._grant()
            raise
        return Reservation(self, nbytes)

    def _check_fits_at_all(self, nbytes: int, what: str, parameter: str | None) -> None:
        if nbytes > self.limit:
            raise ImageTooLargeError(
                f"{what[:1].upper()}{what[1:]} needs about {_mib(nbytes)} of memory to decode and process; this "
                f"server's budget for all tasks together is {_mib(self.limit)} ({BUDGET_SETTING}).",
                parameter=parameter,
            )

    def _give_back(self, reservation: Reservation) -> None:
        self._used -= reservation.nbytes
        if reservation.key is not None and self._admitted.get(reservation.key) is reservation:
            del self._admitted[reservation.key]
        self._grant()

    def _grant(self) -> None:
        """Let waiting work in, first come first served, while it fits."""
        while self._waiting and self._used + self._waiting[0].nbytes <= self.limit:
            waiter = self._waiting.popleft()
            if waiter.granted.cancelled():
                continue
            self._used += waiter.nbytes
            waiter.granted.set_result(None)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.0f} MiB"
