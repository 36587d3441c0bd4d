"""The Winograd C kernel's loading: the variant a CPU gets, torch's OpenMP runtime shared, failures
reported in one line, allocation failures raised as MemoryError.

The kernel is built when the package is installed (hatch_build.py; tests/test_packaging.py covers the
build), so no test here compiles anything.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from upscale_server.inference.cpu import kernel, variants, winograd
from upscale_server.inference.engine.upscaler import _is_out_of_memory


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that has loaded no kernel yet (the real one stays loaded for the other tests)."""
    monkeypatch.setattr(kernel, "_kernel", kernel._KernelState())


@pytest.mark.parametrize(
    ("flags", "machine", "expected"),
    [
        ({"avx512f", "avx512vl", "avx2", "fma", "sse2"}, "x86_64", "avx512" if kernel.PREFER_AVX512 else "avx2"),
        ({"avx512f", "avx2", "fma"}, "x86_64", "avx2"),  # AVX-512F without VL: the AVX2 build
        ({"avx2", "fma"}, "x86_64", "avx2"),
        ({"avx2"}, "x86_64", "portable"),  # AVX2 without FMA
        ({"sse2", "sse4_2"}, "x86_64", "portable"),
        (set(), "x86_64", "portable"),
        ({"avx512f", "avx512vl", "avx2", "fma"}, "aarch64", "portable"),  # only x86 has the ISA builds
        ({"fp", "asimd"}, "aarch64", "portable"),
    ],
)
def test_the_variant_follows_the_cpu_flags(flags: set[str], machine: str, expected: str) -> None:
    assert kernel.choose_variant(flags, machine).name == expected


def test_avx512_can_be_passed_over() -> None:
    flags = {"avx512f", "avx512vl", "avx2", "fma"}
    assert variants.choose(flags, "x86_64", prefer_avx512=False).name == "avx2"
    assert variants.choose(flags, "x86_64", prefer_avx512=True).name == "avx512"


def test_the_loaded_variant_is_reported_and_can_be_chosen() -> None:
    default = kernel.variant()
    assert default == kernel.choose_variant(kernel.cpu_flags()).name
    try:
        assert kernel.load(variant="portable") is kernel.load()
        assert kernel.variant() == "portable"
    finally:
        kernel.load(variant=default)
    assert kernel.variant() == default
    with pytest.raises(ValueError, match="unknown kernel variant 'sse9'"):
        kernel.load(variant="sse9")


@pytest.mark.usefixtures("fresh")
def test_without_a_built_kernel_it_is_unavailable_with_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(kernel, "BUILT_DIR", tmp_path)  # an install that had no C compiler
    with caplog.at_level("INFO", logger="upscale_server.inference.cpu.kernel"):
        assert kernel.available() is False
    assert "using direct convolutions" in caplog.text
    reason = kernel.unavailable_reason()
    assert reason is not None and len(reason.splitlines()) == 1
    assert "not built at install time" in reason and "reinstall: pip install -e ." in reason
    assert kernel.variant() is None


@pytest.mark.usefixtures("fresh")
def test_without_torchs_openmp_runtime_it_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel, "openmp_runtimes", lambda maps=None: [])
    reason = kernel.unavailable_reason()
    assert reason is not None and "no OpenMP runtime" in reason
    # Remembered: the default choice is not retried on every call.
    monkeypatch.setattr(kernel, "openmp_runtimes", lambda maps=None: ["/nowhere/libgomp.so.1"])
    assert kernel.unavailable_reason() == reason


def test_openmp_runtimes_are_read_from_the_maps() -> None:
    maps = textwrap.dedent(
        """\
        7f00-7f01 r-xp 00000000 08:01 1 /venv/torch/lib/libgomp.so.1
        7f01-7f02 r--p 00010000 08:01 1 /venv/torch/lib/libgomp.so.1
        7f02-7f03 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libiomp5.so
        7f03-7f04 r-xp 00000000 08:01 3 /usr/lib/libgompish-not-a-runtime.txt
        7f04-7f05 rw-p 00000000 00:00 0
        7f05-7f06 r-xp 00000000 08:01 4 /venv/torch/lib/libtorch_cpu.so
        """
    )
    assert kernel.openmp_runtimes(maps) == ["/venv/torch/lib/libgomp.so.1", "/usr/lib/x86_64-linux-gnu/libiomp5.so"]


def test_a_conv_maps_exactly_one_openmp_runtime_torchs() -> None:
    """In a clean process: after a convolution through the kernel, torch's runtime is the only one."""
    script = textwrap.dedent(
        """
        import json, torch
        from upscale_server.inference.cpu import kernel, winograd
        conv = torch.nn.Conv2d(32, 32, 3, 1, 1)
        winograd.conv(torch.randn(1, 16, 16, 32), winograd.WinogradConv.of(conv))
        print(json.dumps({"variant": kernel.variant(), "runtimes": kernel.openmp_runtimes()}))
        """
    )
    process = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=False, timeout=120
    )
    assert process.returncode == 0, process.stderr
    result = json.loads(process.stdout.strip().splitlines()[-1])
    assert result["variant"] is not None
    (runtime,) = result["runtimes"]
    assert Path(runtime).resolve().is_relative_to(Path(torch.__file__).resolve().parent.parent), runtime


@pytest.mark.parametrize("variant", [v.name for v in variants.buildable()])
def test_the_kernel_links_no_openmp_runtime_of_its_own(variant: str) -> None:
    """Loaded without torch's runtime in global scope, the library's GOMP_* symbols stay unresolved."""
    library = kernel.library_path(variants.BY_NAME[variant])
    script = f"import ctypes\ntry:\n    ctypes.CDLL({str(library)!r})\nexcept OSError as e:\n    print(e)\n"
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=60)
    assert process.returncode == 0, process.stderr
    assert "undefined symbol: GOMP_" in process.stdout or "undefined symbol: omp_" in process.stdout


@pytest.fixture
def alloc_budget() -> Iterator[ctypes.CDLL]:
    """The loaded kernel with its allocation test hook; every allocation allowed again afterwards."""
    lib = kernel.load()
    try:
        yield lib
    finally:
        lib.wino_set_alloc_budget(-1)


@pytest.mark.parametrize("budget", [0, 2])
def test_a_failed_allocation_raises_memory_error(alloc_budget: ctypes.CDLL, budget: int) -> None:
    """Budget 0 fails the first allocation; 2 lets the output transform's per-channel constants
    through and fails its per-thread buffers (inside the parallel region)."""
    torch.manual_seed(7)
    layer = winograd.WinogradConv.of(torch.nn.Conv2d(8, 8, 3, 1, 1))
    x = torch.randn(1, 12, 12, 8)
    m = torch.randn(36, winograd.tiles(1, 12, 12), 8)
    out = torch.empty(1, 12, 12, 8)
    if budget == 0:
        alloc_budget.wino_set_alloc_budget(0)
        with pytest.raises(MemoryError, match="out of memory") as raised:
            winograd.transform_input(x, torch.empty(36, winograd.tiles(1, 12, 12), 8), 0)
        assert _is_out_of_memory(raised.value)  # the engine retries with smaller tiles
    alloc_budget.wino_set_alloc_budget(budget)
    with pytest.raises(MemoryError, match=r"out of memory \(wino_output"):
        winograd.transform_output(m, out, layer.bias)
    alloc_budget.wino_set_alloc_budget(-1)
    torch.testing.assert_close(winograd.conv(x, layer), winograd.conv(x, layer))  # works again


def test_the_command_prints_the_variant_or_one_line_of_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert kernel.main() == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"Winograd kernel: {kernel.variant()} (") and err == ""
    assert str(kernel.library_path(variants.BY_NAME[kernel.variant() or ""])) in out

    monkeypatch.setattr(kernel, "_kernel", kernel._KernelState())
    monkeypatch.setattr(kernel, "BUILT_DIR", tmp_path)
    assert kernel.main() == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("Winograd kernel: unavailable: ")
