"""The memory budget: admission refuses what does not fit, accepted work waits its turn, every path gives back."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest

from upscale_server.budget import WORKING_FACTOR, MemoryBudget, pixel_cost
from upscale_server.config import DEFAULT_MEMORY_BUDGET, Settings
from upscale_server.errors import ImageTooLargeError, QueueFullError
from upscale_server.imaging import ImageHeader
from upscale_server.tasks.images import TaskImages

T = TypeVar("T")


def run(make: Callable[[], Awaitable[T]]) -> T:
    async def go() -> T:
        return await make()

    return asyncio.run(go())


def test_pixel_cost_counts_input_output_and_encoded_bytes() -> None:
    header = ImageHeader(100, 50, 3, 8, "PNG")
    picture = 100 * 50 * 3 * 4
    assert pixel_cost(header) == int(WORKING_FACTOR * picture)
    assert pixel_cost(header, encoded_bytes=1000) == int(WORKING_FACTOR * picture) + 3000
    assert pixel_cost(header, outputs=[(200, 100)]) == int(WORKING_FACTOR * picture * 5)
    assert pixel_cost(header, outputs=[(200, 100), (400, 200)]) == int(WORKING_FACTOR * picture * 21)
    gray = ImageHeader(100, 50, 1, 16, "PNG")  # the network sees it in colour
    assert pixel_cost(gray, outputs=[(200, 100)]) == int(WORKING_FACTOR * (picture / 3 + 4 * picture))


def test_admission_refuses_with_429_naming_the_setting_and_gives_back_on_release() -> None:
    async def go() -> None:
        budget = MemoryBudget(100)
        first = budget.reserve(60, what="an image", parameter="image")
        with pytest.raises(QueueFullError) as full:
            budget.reserve(50, what="the 9x9 image", parameter="image")
        assert (full.value.code, full.value.http_status, full.value.parameter) == ("rateLimitExceeded", 429, "image")
        assert "UPSCALE_MEMORY_BUDGET_BYTES" in full.value.message and "9x9" in full.value.message
        assert budget.used == 60
        first.release()
        first.release()  # idempotent: every path may give back
        assert budget.used == 0
        with budget.reserve(100, what="an image"):
            assert budget.used == 100
        assert budget.used == 0

    run(go)


def test_a_cost_beyond_the_whole_budget_is_413_not_a_retry() -> None:
    async def go() -> None:
        budget = MemoryBudget(100)
        with pytest.raises(ImageTooLargeError) as never:
            budget.reserve(101, what="the 8192x8192 image", parameter="inputImage")
        assert (never.value.code, never.value.parameter) == ("imageTooLarge", "inputImage")
        with pytest.raises(ImageTooLargeError):
            async with budget.hold(None, 101, what="an image"):
                pass
        assert budget.used == 0

    run(go)


def test_accepted_work_waits_in_line_and_admission_does_not_jump_it() -> None:
    async def go() -> list[str]:
        budget = MemoryBudget(100)
        order: list[str] = []
        first = budget.reserve(80, what="a")

        async def job(name: str, nbytes: int) -> None:
            async with budget.hold(None, nbytes, what=name):
                order.append(name)
                await asyncio.sleep(0)

        big = asyncio.create_task(job("big", 90))
        small = asyncio.create_task(job("small", 10))
        await asyncio.sleep(0.01)
        assert budget.waiting == 2 and order == []
        with pytest.raises(QueueFullError):  # 10 bytes are free, but accepted work waits already
            budget.reserve(10, what="late")
        first.release()
        await asyncio.gather(big, small)
        assert budget.used == 0 and budget.waiting == 0
        return order

    assert run(go) == ["big", "small"]


def test_a_cancelled_wait_leaves_nothing_behind_and_lets_the_next_in() -> None:
    async def go() -> None:
        budget = MemoryBudget(100)
        first = budget.reserve(100, what="a")
        entered = asyncio.Event()

        async def wait(nbytes: int) -> None:
            async with budget.hold(None, nbytes, what="b"):
                entered.set()
                await asyncio.sleep(3600)

        waiting = asyncio.create_task(wait(100))
        behind = asyncio.create_task(wait(10))
        await asyncio.sleep(0.01)
        waiting.cancel()
        first.release()
        await asyncio.wait_for(entered.wait(), 5)
        assert budget.used == 10
        behind.cancel()  # cancelled while holding: given back too
        await asyncio.gather(waiting, behind, return_exceptions=True)
        assert budget.used == 0 and budget.waiting == 0

    run(go)


def test_hold_takes_the_reservation_admitted_under_its_key() -> None:
    async def go() -> None:
        budget = MemoryBudget(100)
        admitted = budget.reserve(70, what="a job", key="job-1")
        async with budget.hold("job-1", 70, what="a job") as held:
            assert held is admitted and budget.used == 70  # not counted twice
        assert budget.used == 0
        admitted.release()  # the queue's own give-back after the runner's: nothing more
        assert budget.used == 0
        with pytest.raises(RuntimeError):
            async with budget.hold("job-2", 30, what="a job"):  # nothing admitted: reserved now
                assert budget.used == 30
                raise RuntimeError("the run failed")
        assert budget.used == 0

    run(go)


def test_the_default_budget_is_half_the_usable_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(memory_budget_bytes=12345).resolved_memory_budget() == 12345
    monkeypatch.setattr("upscale_server.config.usable_memory", lambda: 16 * 2**30)
    assert Settings().resolved_memory_budget() == 8 * 2**30
    monkeypatch.setattr("upscale_server.config.usable_memory", lambda: None)
    assert Settings().resolved_memory_budget() == DEFAULT_MEMORY_BUDGET


def test_a_cancelled_task_keeps_its_reservation_while_its_codec_work_still_runs() -> None:
    """A thread cannot be stopped: the pixels it holds stay counted until it returns."""

    async def go() -> None:
        budget = MemoryBudget(100)
        started, release = threading.Event(), threading.Event()
        with ThreadPoolExecutor(1) as pool:
            images = TaskImages(
                None,  # type: ignore[arg-type]  # no storage or network here
                None,  # type: ignore[arg-type]
                pool,
                budget=budget,
                max_fetch_bytes=1,
                max_input_pixels=1,
                upload_max_side=16,
            )

            async def task() -> None:
                with budget.reserve(60, what="an image"):
                    await images.in_codecs(lambda: started.set() or release.wait(10))

            running = asyncio.create_task(task())
            assert await asyncio.to_thread(started.wait, 10)
            running.cancel()
            await asyncio.sleep(0.05)
            assert not running.done() and budget.used == 60
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await running
            assert budget.used == 0

    run(go)
