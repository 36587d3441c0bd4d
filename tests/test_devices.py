"""Device, precision, thread and memory decisions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from upscale_server.inference.runtime import devices
from upscale_server.inference.runtime.devices import (
    configure_threads,
    free_memory_bytes,
    resolve_device,
    resolve_dtype,
    tune_cpu_allocator,
)

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def test_auto_device_follows_cuda_availability(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == CUDA


def test_explicit_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device(" CPU ") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="only 2 CUDA"):
        resolve_device("cuda:2")


def test_cuda_without_cuda_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.parametrize("bad", ["gpu", "tpu", "mps", ""])
def test_unknown_device_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="device"):
        resolve_device(bad)


def test_dtype_rules() -> None:
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("auto", CUDA) == torch.float16
    assert resolve_dtype("fp32", CPU) == torch.float32
    assert resolve_dtype("bf16", CPU) == torch.bfloat16
    assert resolve_dtype("bf16", CUDA) == torch.bfloat16
    assert resolve_dtype("fp16", CUDA) == torch.float16
    with pytest.raises(ValueError, match="fp16 is for CUDA only"):
        resolve_dtype("fp16", CPU)
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_dtype("int8", CPU)


def test_bf16_on_a_cpu_without_native_bf16_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="upscale_server.inference.runtime.devices"):
        assert resolve_dtype("bf16", CPU) == torch.bfloat16
    assert "slower than fp32" in caplog.text
    caplog.clear()
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: True)
    with caplog.at_level("WARNING", logger="upscale_server.inference.runtime.devices"):
        resolve_dtype("bf16", CPU)
        resolve_dtype("bf16", CUDA)
    assert caplog.text == ""


def test_configure_threads() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1
        assert torch.get_num_threads() == 1
        all_cores = configure_threads(0)
        assert all_cores == len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == all_cores
        with pytest.raises(ValueError):
            configure_threads(-1)
    finally:
        torch.set_num_threads(before)


def test_cpu_free_memory_reads_meminfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = free_memory_bytes(CPU)
    assert 0 < real < 1 << 50
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:  100 kB\nMemFree:  10 kB\nMemAvailable:  50 kB\n")
    assert devices._meminfo_available(fake) == 50 * 1024
    assert devices._meminfo_available(tmp_path / "missing") is None
    # Without /proc/meminfo the sysconf fallback still gives a positive number.
    monkeypatch.setattr(devices, "_meminfo_available", lambda: None)
    assert free_memory_bytes(CPU) > 0


def test_cpu_free_memory_counts_what_malloc_keeps_for_reuse(monkeypatch: pytest.MonkeyPatch) -> None:
    # With the tuned allocator a freed buffer stays resident in the process (so MemAvailable drops),
    # yet the next image reuses it: the free estimate must not shrink by its size. MemAvailable is
    # system-wide (every other process moves it), so it is held still; this process's heap is measured.
    monkeypatch.setattr(devices, "_meminfo_available", lambda: 1 << 30)
    assert tune_cpu_allocator()
    size = 512 * 2**20
    buffer = torch.ones(size // 4)
    held = devices._malloc_free_bytes()  # measured while the buffer lives: the heap may have had room already
    before = free_memory_bytes(CPU)
    del buffer
    assert devices._malloc_free_bytes() >= held + size // 2
    assert free_memory_bytes(CPU) >= before + size // 2


def test_tune_cpu_allocator_applies_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake_apply() -> bool:
        calls.append(1)
        return True

    monkeypatch.setattr(devices, "_allocator_tuned", None)
    monkeypatch.setattr(devices, "_apply_mallopt", fake_apply)
    assert tune_cpu_allocator() is True
    assert tune_cpu_allocator() is True
    assert calls == [1]


def test_tune_cpu_allocator_on_this_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    """On glibc (this project's Linux targets) every mallopt value is accepted."""
    monkeypatch.setattr(devices, "_allocator_tuned", None)
    assert tune_cpu_allocator() is True


def test_tune_cpu_allocator_tolerates_missing_libc(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_libc(name: str | None) -> object:
        raise OSError("no libc here")

    monkeypatch.setattr(devices, "_allocator_tuned", None)
    monkeypatch.setattr(devices.ctypes, "CDLL", no_libc)
    devices._libc_function.cache_clear()  # the lookup is cached: make it look again, without libc
    try:
        assert tune_cpu_allocator() is False
        assert devices._malloc_free_bytes() == 0
    finally:
        devices._libc_function.cache_clear()
